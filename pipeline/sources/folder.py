"""A tree of images, each with optional same-stem ``.txt`` (caption) and ``.json`` (metadata)."""

from __future__ import annotations

from pathlib import Path

from pipeline.records import InputRecord, make_key

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


def list_folder(root: Path, *, source: str, kind: str) -> list[InputRecord]:
    """Every image file under ``root``; the original id is its relative path without suffix."""
    records = []
    for path in root.rglob("*"):
        if path.suffix.lower() not in IMAGE_SUFFIXES or path.is_dir():
            continue
        original_id = path.relative_to(root).with_suffix("").as_posix()
        txt, js = path.with_suffix(".txt"), path.with_suffix(".json")
        skip = None
        if path.is_symlink():
            # A link may point anywhere on the machine; only real files under the root are read.
            skip = ("not_regular_file", f"{path} is a symbolic link")
        records.append(
            InputRecord(
                key=make_key(source, original_id),
                source=source,
                original_id=original_id,
                location=str(path),
                kind=kind,
                path=path,
                txt_path=txt if txt.is_file() and not txt.is_symlink() else None,
                json_path=js if js.is_file() and not js.is_symlink() else None,
                preset_skip=skip,
            )
        )
    return records
