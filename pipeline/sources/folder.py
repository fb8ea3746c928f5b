"""A tree of images, each with optional same-stem ``.txt`` (caption) and ``.json`` (metadata)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pipeline.sources.files import listed_file, over_limit
from pipeline.sources.records import DEFAULT_LIMITS, InputRecord, ReadLimits, make_key

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


def _sidecar(path: Path, root: Path, limit: int) -> tuple[Path | None, tuple[str, str] | None]:
    """The sidecar file to read (None: absent, or not a regular file inside the source) and its skip if too large."""
    try:
        real, found = listed_file(path, root)
    except OSError:  # absent (the usual case) or not examinable
        return None, None
    if real is None:
        return None, None
    if found.st_size > limit:
        return None, ("bad_metadata", over_limit(str(path), found.st_size, limit, "--max-sidecar-bytes"))
    return real, None


def name_bucket(name: str, buckets: int) -> int:
    """The bucket of a file name among ``buckets``: a hash of the name alone."""
    digest = hashlib.sha1(os.fsencode(name)).digest()
    return int.from_bytes(digest[:8], "big") % buckets


def list_folder_dir(
    root: Path,
    folder: Path,
    *,
    source: str,
    kind: str,
    limits: ReadLimits = DEFAULT_LIMITS,
    bucket: tuple[int, int] | None = None,
) -> list[InputRecord]:
    """Every image file directly in ``folder`` (inside the source ``root``; with ``bucket`` (b, of),
    those whose name is in bucket b); the original id is its path relative to ``root`` without suffix.

    Only regular files are read: a link is followed only to a regular file inside ``root``; a FIFO,
    a device or a link elsewhere is skipped as ``not_regular_file``, a file over
    ``limits.max_file_bytes`` as ``file_too_large``, a sidecar over ``limits.max_sidecar_bytes`` as
    ``bad_metadata``. Sidecars that are not regular files inside ``root`` are ignored.
    """
    real_root = root.resolve()
    records = []
    for path in folder.iterdir():
        if path.suffix.lower() not in IMAGE_SUFFIXES or (bucket and name_bucket(path.name, bucket[1]) != bucket[0]):
            continue
        if path.is_dir():
            continue
        original_id = path.relative_to(root).with_suffix("").as_posix()
        skip = None
        try:
            real, found = listed_file(path, real_root)
        except OSError as exc:  # vanished or unreadable since the directory was listed
            real, found = None, ("read_error", f"cannot examine {path}: {exc}")
        if real is None:
            skip = found
        elif found.st_size > limits.max_file_bytes:
            skip = ("file_too_large", over_limit(str(path), found.st_size, limits.max_file_bytes, "--max-file-bytes"))
        txt, txt_skip = _sidecar(path.with_suffix(".txt"), real_root, limits.max_sidecar_bytes)
        js, js_skip = _sidecar(path.with_suffix(".json"), real_root, limits.max_sidecar_bytes)
        records.append(
            InputRecord(
                key=make_key(source, original_id),
                source=source,
                original_id=original_id,
                location=str(path),
                kind=kind,
                path=real or path,
                txt_path=txt,
                json_path=js,
                preset_skip=skip or js_skip or txt_skip,
                limits=limits,
            )
        )
    return records
