"""Make real and deliberately broken image files for the tests (from real photos)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image
from skimage import data as skdata

EXIF_ORIENTATION = 0x0112


def jpeg_bytes(im: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", **kwargs)
    return buf.getvalue()


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def photo_image(size: tuple[int, int] | None = None) -> Image.Image:
    """The coffee photo (RGB), optionally resized to ``size``."""
    im = Image.fromarray(skdata.coffee())
    return im.resize(size, Image.Resampling.LANCZOS) if size else im


def truncated_jpeg() -> bytes:
    data = jpeg_bytes(photo_image())
    return data[: len(data) // 2]


def cmyk_jpeg() -> bytes:
    return jpeg_bytes(photo_image().convert("CMYK"))


def sixteen_bit_png() -> tuple[bytes, np.ndarray]:
    """A 16-bit greyscale PNG (mode I;16) and the 8-bit levels it encodes."""
    levels = skdata.camera()
    im = Image.fromarray(levels.astype(np.uint16) * 257)
    assert im.mode.startswith("I;16")
    return png_bytes(im), levels


def transparent_rgba_png() -> bytes:
    """A photo whose left half is fully transparent."""
    rgba = photo_image().convert("RGBA")
    alpha = np.full((rgba.height, rgba.width), 255, np.uint8)
    alpha[:, : rgba.width // 2] = 0
    rgba.putalpha(Image.fromarray(alpha))
    return png_bytes(rgba)


def palette_png_with_transparency() -> bytes:
    im = photo_image().convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    im.info["transparency"] = 0
    return png_bytes(im)


def animated_gif(colors=((255, 0, 0), (0, 0, 255), (0, 255, 0))) -> bytes:
    frames = [Image.new("RGB", (160, 120), c) for c in colors]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def exif_rotated_jpeg() -> bytes:
    """A landscape (300x200) JPEG whose EXIF says: rotate 90 degrees to display (portrait)."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    return jpeg_bytes(photo_image((300, 200)), exif=exif)


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A valid greyscale PNG of ``width x height`` black pixels: under 1 MB on disk, ``w*h`` bytes decoded."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
