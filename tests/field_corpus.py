"""A corpus whose caption fields look like the field's: partial, empty and absent captions from many sources."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from pipeline.sample_data import write_sample_folder
from tests import image_factory as mk
from tests.tar_factory import add_bytes, sa1b_annotation

# Folder photos that keep their alt text; the others lose their .txt, and one gets a blank one.
FOLDER_CAPTIONED = ("astronaut", "chelsea", "coffee", "rocket", "hubble", "camera")
FOLDER_BLANK = "coins"  # a .txt holding only white space
SA1B_IDS = (101, 102, 103)  # SA-1B has no alt text at all
# img2dataset rows: (key, alt text or None for no .txt member); LAION's empty alt texts included.
IMG2DATASET_ROWS = (
    ("000000000", "a red cup of coffee on a wooden table"),
    ("000000001", ""),
    ("000000002", None),
    ("000000003", "   "),
    ("000000004", "a saucer with a silver spoon and a cup"),
)


def write_folder_source(out: Path) -> Path:
    """The bundled photos, where only some keep a caption (and one caption is blank)."""
    write_sample_folder(out, with_bad_files=False)
    for txt in out.glob("*.txt"):
        if txt.stem == FOLDER_BLANK:
            txt.write_text("  \n")
        elif txt.stem not in FOLDER_CAPTIONED:
            txt.unlink()
    return out


def write_sa1b_tar(path: Path) -> Path:
    """SA-1B as published: images and their mask annotations, no alt text."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for image_id in SA1B_IDS:
            photo = mk.jpeg_bytes(mk.photo_image((300 + image_id, 200)))
            add_bytes(tf, f"sa_{image_id}.jpg", photo)
            add_bytes(tf, f"sa_{image_id}.json", sa1b_annotation(image_id, masks=2))
    return path


def write_img2dataset_source(out: Path) -> Path:
    """img2dataset output whose alt texts are partly empty, blank or absent."""
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / "00000.tar", "w") as tf:
        for i, (key, text) in enumerate(IMG2DATASET_ROWS):
            add_bytes(tf, f"{key}.jpg", mk.jpeg_bytes(mk.photo_image((320 + i, 240))))
            if text is not None:
                add_bytes(tf, f"{key}.txt", text.encode())
            add_bytes(tf, f"{key}.json", json.dumps({"key": key, "status": "success", "caption": text}).encode())
    return out


def write_field_corpus(base: Path) -> list[Path]:
    """The three sources under ``base``; returns them in the order to shard them."""
    return [
        write_folder_source(base / "photos"),
        write_sa1b_tar(base / "sa1b" / "sa_000000.tar"),
        write_img2dataset_source(base / "laion"),
    ]


def expected_alt_text_keys(keys: list[str]) -> set[str]:
    """Of the written keys, those whose alt text is not blank."""
    captioned = {f"folder-{stem}" for stem in FOLDER_CAPTIONED}
    captioned |= {f"img2dataset-{key}" for key, text in IMG2DATASET_ROWS if text and text.strip()}
    return captioned & set(keys)
