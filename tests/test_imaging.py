"""Per-image processing: every mode to RGB, resizing, and each kind of bad input refused with a reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.sources.imaging import process_image
from pipeline.sources.records import SkipRecord
from schemas.shard_config import ImageSettings
from tests import image_factory as mk

DEFAULT = ImageSettings()


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)


def skip_code(data: bytes, settings: ImageSettings = DEFAULT) -> str:
    with pytest.raises(SkipRecord) as info:
        process_image(data, settings)
    return info.value.code


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a - b) ** 2)))


def test_large_jpeg_is_resized_to_short_side_and_matches_a_full_decode():
    big = mk.photo_image((2250, 1500))
    out = process_image(mk.jpeg_bytes(big, quality=95), DEFAULT)
    assert (out.width, out.height) == (768, 512)
    assert (out.original_width, out.original_height) == (2250, 1500)
    # Draft-mode decoding must look like the naive full decode + LANCZOS resize.
    naive = np.asarray(big.resize((768, 512), Image.Resampling.LANCZOS), dtype=np.float32)
    assert psnr(decoded(out.data), naive) > 30


def test_center_crop_makes_squares_and_resize_zero_keeps_size():
    data = mk.jpeg_bytes(mk.photo_image((900, 600)))
    out = process_image(data, ImageSettings(resize=256, crop="center"))
    assert (out.width, out.height) == (256, 256)
    kept = process_image(data, ImageSettings(resize=0))
    assert (kept.width, kept.height) == (900, 600)
    square = process_image(data, ImageSettings(resize=0, crop="center"))
    assert (square.width, square.height) == (600, 600)


def test_sha256_is_of_the_stored_bytes():
    import hashlib

    out = process_image(mk.jpeg_bytes(mk.photo_image()), DEFAULT)
    assert out.sha256 == hashlib.sha256(out.data).hexdigest()


def test_exif_rotation_is_applied():
    out = process_image(mk.exif_rotated_jpeg(), ImageSettings(resize=100))
    assert (out.original_width, out.original_height) == (200, 300)
    assert (out.width, out.height) == (100, 150)


def test_cmyk_jpeg_becomes_rgb_with_the_same_picture():
    out = process_image(mk.cmyk_jpeg(), ImageSettings(resize=0))
    reference = np.asarray(mk.photo_image(), dtype=np.float32)
    assert psnr(decoded(out.data), reference) > 25


def test_sixteen_bit_png_is_scaled_not_clipped():
    data, levels = mk.sixteen_bit_png()
    out = process_image(data, ImageSettings(resize=0))
    grey = decoded(out.data)[..., 0]
    assert abs(grey.mean() - levels.mean()) < 2  # clipping would make it (almost) all white
    assert psnr(grey, levels.astype(np.float32)) > 30


def test_transparent_pixels_are_composited_over_white():
    out = decoded(process_image(mk.transparent_rgba_png(), ImageSettings(resize=0)).data)
    left, right = out[:, : out.shape[1] // 2 - 8], out[:, out.shape[1] // 2 + 8 :]
    assert left.min() >= 240 and left.mean() > 254  # JPEG ringing only
    assert right.mean() < 200


def test_palette_png_with_transparency_is_rgb():
    out = process_image(mk.palette_png_with_transparency(), ImageSettings(resize=0))
    assert Image.open(io.BytesIO(out.data)).mode == "RGB"


def test_animated_gif_keeps_the_first_frame():
    out = decoded(process_image(mk.animated_gif(), ImageSettings(resize=0)).data)
    red, green, blue = out.reshape(-1, 3).mean(axis=0)
    assert red > 240 and green < 15 and blue < 15


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "empty_file"),
        (b"just some text pretending to be a JPEG\n", "not_an_image"),
    ],
)
def test_not_images(data, code):
    assert skip_code(data) == code


def test_truncated_jpeg_is_a_decode_error():
    assert skip_code(mk.truncated_jpeg()) == "decode_error"


def test_decompression_bomb_is_refused_before_decoding():
    bomb = mk.png_bomb(30000, 30000)
    assert len(bomb) < 2_000_000
    assert skip_code(bomb) == "too_many_pixels"


def test_pixel_cap_is_ours_and_checked_on_the_header():
    # 4000x4000 is fine for Pillow; our cap refuses it. The IDAT is valid, but only the header is read.
    with pytest.raises(SkipRecord) as info:
        process_image(mk.png_bomb(4000, 4000), ImageSettings(max_pixels=10_000_000))
    assert info.value.code == "too_many_pixels"
    assert "--max-pixels 10000000" in info.value.detail


def test_small_and_elongated_images_are_skipped():
    assert skip_code(mk.jpeg_bytes(mk.photo_image((60, 50)))) == "too_small"
    assert skip_code(mk.jpeg_bytes(mk.photo_image((1000, 200)))) == "bad_aspect"
    assert process_image(mk.jpeg_bytes(mk.photo_image((800, 200))), DEFAULT).height == 512
