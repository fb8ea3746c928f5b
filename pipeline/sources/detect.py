"""Guess a source's format from what is on disk (`--format auto`)."""

from __future__ import annotations

import re
import tarfile
from pathlib import Path

from pipeline.sources.errors import SourceError
from pipeline.sources.files import listed_file

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


def _regular(path: Path, root: Path) -> Path | None:
    """The regular file inside ``root`` that ``path`` stands for, or None."""
    try:
        return listed_file(path, root)[0]
    except OSError:
        return None


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
        # Only a regular tar inside the folder is opened: a FIFO named x.tar would block the open.
        root = src.resolve()
        first = next((real for tar in tars if (real := _regular(tar, root)) is not None), None)
        return "sa1b" if first is not None and _tar_looks_like_sa1b(first) else "img2dataset"
    if any(SA1B_NAME.match(p.name) for p in src.glob("sa_*.json")):
        return "sa1b"
    return "folder"
