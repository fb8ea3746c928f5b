"""Guess a source's format from what is on disk (`--format auto`)."""

from __future__ import annotations

import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.sources.errors import SourceError
from pipeline.sources.files import listed_file
from pipeline.sources.folder import IMAGE_SUFFIXES

SA1B_NAME = re.compile(r"^sa_\d+\.(jpg|json)$")
TAR_FORMATS = ("sa1b", "img2dataset")


@dataclass(frozen=True)
class FormatChoice:
    """How a source is read: its ``format`` and, for a folder, whether as the tars directly in it
    (``from_tars``) or as the images of its tree; ``images``/``tars`` are what a folder was judged on."""

    path: Path
    format: str  # folder | sa1b | img2dataset | parquet
    from_tars: bool = False
    images: int = 0
    tars: int = 0

    def describe(self) -> str:
        """``folder (20 images; 1 tar not read)``: the choice and what it leaves unread."""
        counts = [(self.images, "image"), (self.tars, "tar")]
        (read, noun), (unread, other) = counts[::-1] if self.from_tars else counts
        left = f"; {_plural(unread, other)} not read" if unread else ""
        return f"{self.format} ({_plural(read, noun)}{left})"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


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


def _tars_look_like_sa1b(src: Path) -> bool:
    """Whether the first regular tar directly in the folder ``src`` holds SA-1B names.

    Only a regular tar inside the folder is opened: a FIFO named x.tar would block the open.
    """
    root = src.resolve()
    first = next((real for tar in sorted(src.glob("*.tar")) if (real := _regular(tar, root)) is not None), None)
    return first is not None and _tar_looks_like_sa1b(first)


def _count_inputs(src: Path) -> tuple[int, int]:
    """How many image files the folder tree ``src`` holds (links to folders not followed) and how many
    ``*.tar`` lie directly in it: what reading it as images, or as tars, would read. Names only."""
    images = tars = 0
    pending = [src]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(Path(entry.path))
                    elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
                        images += 1
                    elif folder == src and entry.name.endswith(".tar"):
                        tars += 1
        except OSError:  # a folder that cannot be listed is refused when its images are planned
            continue
    return images, tars


def _choose_auto(src: Path) -> FormatChoice:
    """The format of a folder under ``--format auto``: tars or images, whichever it holds more of."""
    images, tars = _count_inputs(src)
    if images and images == tars:
        raise SourceError(
            f"{src} holds as many images as tars ({images} each): pass --format folder to read the images, "
            "or --format img2dataset (or sa1b) to read the tars"
        )
    if tars > images:
        fmt = "sa1b" if _tars_look_like_sa1b(src) else "img2dataset"
        return FormatChoice(src, fmt, from_tars=True, images=images, tars=tars)
    sa1b = any(SA1B_NAME.match(p.name) for p in src.glob("sa_*.json"))
    return FormatChoice(src, "sa1b" if sa1b else "folder", images=images, tars=tars)


def choose_format(src: Path, fmt: str) -> FormatChoice:
    """How to read ``src`` with ``--format fmt`` (``auto``: judged from what is on disk).

    A folder of the SA-1B format is read as its tars when it holds at least as many tars as images.
    """
    if src.is_file():
        if fmt != "auto":
            return FormatChoice(src, fmt)
        if src.suffix == ".parquet":
            return FormatChoice(src, "parquet")
        if src.suffix == ".tar":
            return FormatChoice(src, "sa1b" if _tar_looks_like_sa1b(src) else "img2dataset")
        raise SourceError(f"cannot tell the format of {src}; pass --format")
    if fmt == "auto":
        return _choose_auto(src)
    if fmt == "sa1b":
        images, tars = _count_inputs(src)
        return FormatChoice(src, fmt, from_tars=bool(tars) and tars >= images)
    return FormatChoice(src, fmt, from_tars=fmt in TAR_FORMATS)
