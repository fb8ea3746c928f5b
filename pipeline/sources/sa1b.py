"""SA-1B as published: tars of ``sa_N.jpg`` + ``sa_N.json``, or their extracted folders."""

from __future__ import annotations

from typing import Any

from pipeline.sources.records import SkipRecord


def sa1b_meta(annotation_file: dict[str, Any]) -> dict[str, Any]:
    """``image`` fields and the number of masks; the masks themselves are not copied."""
    image = annotation_file.get("image")
    if not isinstance(image, dict):
        raise SkipRecord("bad_metadata", "SA-1B json has no 'image' object")
    meta = {k: image.get(k) for k in ("image_id", "width", "height", "file_name")}
    meta["num_masks"] = len(annotation_file.get("annotations") or [])
    return meta
