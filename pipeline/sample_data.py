"""The bundled sample: real photos shipped with scikit-image, with alt texts, plus a few bad files."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata

# (file name, skimage loader, alt text); formats vary on purpose (JPEG, PNG, greyscale).
SAMPLE_PHOTOS: tuple[tuple[str, Callable[[], np.ndarray], str], ...] = (
    ("astronaut.jpg", skdata.astronaut, "Astronaut Eileen Collins in her orange flight suit, NASA portrait"),
    ("chelsea.jpg", skdata.chelsea, "a tabby cat named Chelsea looking sideways"),
    ("coffee.jpg", skdata.coffee, "a cup of coffee on a saucer with a spoon"),
    ("rocket.jpg", skdata.rocket, "SpaceX Falcon 9 rocket on the launch pad"),
    ("hubble.png", skdata.hubble_deep_field, "Hubble deep field: galaxies in the night sky"),
    ("retina.jpg", skdata.retina, "human retina fundus photograph"),
    ("ihc.png", skdata.immunohistochemistry, "immunohistochemistry stained tissue under a microscope"),
    ("camera.png", skdata.camera, "black and white photo of a man with a camera on a tripod"),
    ("coins.png", skdata.coins, "old Greek coins on a dark background"),
    ("moon.png", skdata.moon, "surface of the moon"),
)


def _encoded(pixels: np.ndarray, suffix: str) -> bytes:
    buffer = io.BytesIO()
    fmt, options = ("JPEG", {"quality": 92}) if suffix == ".jpg" else ("PNG", {})
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _write_if_changed(path: Path, data: bytes) -> None:
    """Write ``data`` unless the file already holds it: a second run leaves the photos' mtimes, and with them
    the shard fingerprints, as they were."""
    if path.is_file() and path.read_bytes() == data:
        return
    path.write_bytes(data)


def write_sample_folder(out: Path, *, with_bad_files: bool = True) -> Path:
    """Write the sample photos (``.jpg``/``.png`` + ``.txt`` + ``.json``) into ``out``; returns ``out``.

    With ``with_bad_files`` it adds inputs the shard stage must skip with a reason: a zero-byte
    file, a text file named ``.jpg`` and a thumbnail below the default minimum size.
    """
    out.mkdir(parents=True, exist_ok=True)
    for name, loader, alt_text in SAMPLE_PHOTOS:
        path = out / name
        _write_if_changed(path, _encoded(loader(), path.suffix))
        _write_if_changed(path.with_suffix(".txt"), (alt_text + "\n").encode())
        meta = {"origin": f"skimage.data.{loader.__name__}", "license": "see scikit-image data/README.txt"}
        _write_if_changed(path.with_suffix(".json"), json.dumps(meta).encode())
    if with_bad_files:
        _write_if_changed(out / "empty.png", b"")
        _write_if_changed(out / "not_really.jpg", b"this is a text file, not a JPEG\n")
        thumbnail = np.asarray(Image.fromarray(skdata.chelsea()).resize((40, 30)))
        _write_if_changed(out / "thumbnail.jpg", _encoded(thumbnail, ".jpg"))
    return out
