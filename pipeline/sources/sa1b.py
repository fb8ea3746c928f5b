"""SA-1B as published: tars of ``sa_N.jpg`` + ``sa_N.json``, or their extracted folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.records import DEFAULT_LIMITS, InputRecord, ReadLimits, SkipRecord
from pipeline.sources.folder import list_folder
from pipeline.sources.tar_source import list_tar_dir


def list_sa1b(src: Path, *, source: str, limits: ReadLimits = DEFAULT_LIMITS) -> list[InputRecord]:
    """Records of an SA-1B tar, a directory of such tars, or an extracted directory."""
    if not src.is_dir() or any(src.glob("*.tar")):
        return list_tar_dir(src, source=source, kind="sa1b", limits=limits)
    return list_folder(src, source=source, kind="sa1b", limits=limits)


def sa1b_meta(annotation_file: dict[str, Any]) -> dict[str, Any]:
    """``image`` fields and the number of masks; the masks themselves are not copied."""
    image = annotation_file.get("image")
    if not isinstance(image, dict):
        raise SkipRecord("bad_metadata", "SA-1B json has no 'image' object")
    meta = {k: image.get(k) for k in ("image_id", "width", "height", "file_name")}
    meta["num_masks"] = len(annotation_file.get("annotations") or [])
    return meta
