"""img2dataset output (LAION and others): webdataset tars of ``KEY.jpg``/``KEY.txt``/``KEY.json``.

Downloading the URLs stays img2dataset's job; this source re-shards and resizes what it fetched.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.records import DEFAULT_LIMITS, InputRecord, ReadLimits
from pipeline.sources.tar_source import list_tar_dir


def list_img2dataset(src: Path, *, source: str, limits: ReadLimits = DEFAULT_LIMITS) -> list[InputRecord]:
    """Records of one img2dataset tar or of every tar in its output directory."""
    return list_tar_dir(src, source=source, kind="img2dataset", limits=limits)
