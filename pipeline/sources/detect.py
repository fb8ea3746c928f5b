"""Guess a source's format from what is on disk (`--format auto`)."""

from __future__ import annotations

import re
import tarfile
from pathlib import Path

from pipeline.sources.errors import SourceError

SA1B_NAME = re.compile(r"^sa_\d+\.(jpg|json)$")


def _tar_looks_like_sa1b(path: Path) -> bool:
    try:
        with tarfile.open(path, mode="r:") as tf:
            for member in tf:
                if member.isfile():
                    return bool(SA1B_NAME.match(Path(member.name).name))
    except (tarfile.TarError, OSError):
        return False
    return False


def detect_format(src: Path) -> str:
    """Return ``folder``, ``sa1b``, ``img2dataset`` or ``parquet`` for a path."""
    if src.is_file():
        if src.suffix == ".parquet":
            return "parquet"
        if src.suffix == ".tar":
            return "sa1b" if _tar_looks_like_sa1b(src) else "img2dataset"
        raise SourceError(f"cannot tell the format of {src}; pass --format")
    tars = sorted(src.glob("*.tar"))
    if tars:
        return "sa1b" if _tar_looks_like_sa1b(tars[0]) else "img2dataset"
    if any(SA1B_NAME.match(p.name) for p in src.glob("sa_*.json")):
        return "sa1b"
    return "folder"
