"""Input units: the pieces of a source that are listed independently, each inside its own shard task.

The driver plans from units only (one ``stat`` per tar or Parquet file, one per image or sidecar in a
folder, each Parquet footer): a tar file, the image files directly in one folder (one of its buckets
when it holds more than ``FOLDER_UNIT_SHARDS`` shards of images: files go to a bucket by a hash of
their name), or up to ``PARTS_PER_INPUT`` shards of rows of one Parquet row group. Records are
listed by ``list_unit`` where the unit is processed, so planning time and driver memory grow with
the number of input files, not samples.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.sources.detect import FormatChoice, choose_format
from pipeline.sources.errors import SourceError
from pipeline.sources.files import kind_of, listed_file
from pipeline.sources.folder import IMAGE_SUFFIXES, list_folder_dir
from pipeline.sources.parquet_table import check_columns, list_parquet_rows
from pipeline.sources.records import InputRecord, ReadLimits
from pipeline.sources.tar_source import list_tar_records, tar_problem
from schemas.layout import PARTS_PER_INPUT
from schemas.shard_config import SourceSettings

# A folder with more images than this many shards is split into buckets (one unit each), so its
# images are written in parallel.
FOLDER_UNIT_SHARDS = 8
_BUCKET = re.compile(r"(folder:.*)#(\d+)/(\d+)")
_SIDECAR_SUFFIXES = frozenset({".txt", ".json"})
_DIGEST_BITS = 128


@dataclass(frozen=True)
class InputUnit:
    """One independently listed piece of a source.

    ``uid`` names it for the plan (stable across runs); ``stamp`` changes when its files change
    (size and mtime of a tar or table; for a folder, the name, size and mtime of each image and
    sidecar directly in it, so a file edited in place is seen). ``dir_stamp`` is a folder's own size
    and mtime, which stamped it before its files did (see ``UnitJob.legacy_fingerprint``).
    ``path`` is a tar, a folder (its own files; ``root`` is the source folder original ids are
    relative to) or a Parquet table (``rows``: row group, first and stop row within it).
    ``bucket`` (b, of) keeps only a folder's files whose name hashes to bucket b of ``of``.
    ``problem`` marks a tar that is never opened (not a regular file inside its source).
    """

    uid: str
    stamp: str
    source: str
    kind: str  # folder | sa1b | img2dataset | parquet: the records' kind
    path: Path
    settings: SourceSettings
    read_path: Path | None = None
    root: Path | None = None
    rows: tuple[int, int, int] | None = None
    bucket: tuple[int, int] | None = None
    problem: tuple[str, str] | None = None
    dir_stamp: str | None = None

    @property
    def limits(self) -> ReadLimits:
        return ReadLimits(self.settings.max_file_bytes, self.settings.max_sidecar_bytes)


def _stamp(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}"


def _tar_units(src: Path, source: str, kind: str, settings: SourceSettings) -> list[InputUnit]:
    """One unit per tar: ``src`` itself, or every ``*.tar`` directly in the folder ``src`` (sorted)."""
    if not src.is_dir():
        real = src.resolve()
        return [InputUnit(f"tar:{real}", _stamp(real.stat()), source, kind, src, settings, read_path=real)]
    root = src.resolve()
    units = []
    for tar_path in sorted(src.glob("*.tar")):
        try:
            real, found = listed_file(tar_path, root)
        except OSError as exc:
            real, found = None, ("bad_tar", f"cannot examine {tar_path}: {exc}")
        if real is None:
            units.append(InputUnit(f"tar:{tar_path}", "", source, kind, tar_path, settings, problem=found))
        else:
            units.append(InputUnit(f"tar:{tar_path}", _stamp(found), source, kind, tar_path, settings, read_path=real))
    return units


@dataclass(frozen=True)
class _ImageFolder:
    """A folder naming image files: its path relative to the source, how many, and its stamps."""

    rel: str
    images: int
    stamp: str
    dir_stamp: str


def _file_digest(entry: os.DirEntry[str]) -> int:
    """A hash of a file's name, size and mtime (its target's, for a link that has one); 0 once it is gone."""
    try:
        st = entry.stat()
    except OSError:  # a link that loops or leads nowhere: its own
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:  # removed since the folder was listed
            return 0
    data = b"%s\0%d\0%d" % (os.fsencode(entry.name), st.st_size, st.st_mtime_ns)
    return int.from_bytes(hashlib.blake2b(data, digest_size=_DIGEST_BITS // 8).digest(), "big")


def _scan_folder(folder: Path, pending: list[Path]) -> tuple[int, int]:
    """How many image names ``folder`` holds and a digest of its images and sidecars (their names,
    sizes and mtimes, in any order); its subfolders (links not followed) go to ``pending``."""
    images = digest = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                pending.append(Path(entry.path))
                continue
            suffix = os.path.splitext(entry.name)[1]  # Path(...).suffix costs more than the stat
            if suffix.lower() in IMAGE_SUFFIXES:
                images += 1
            elif suffix not in _SIDECAR_SUFFIXES:
                continue
            digest = (digest + _file_digest(entry)) % (1 << _DIGEST_BITS)
    return images, digest


def _image_folders(root: Path) -> list[_ImageFolder]:
    """Every folder under ``root`` (links to folders not followed) that names image files, sorted.

    One ``stat`` per image or sidecar, for the stamp; no file is opened.
    """
    found: list[_ImageFolder] = []
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            images, digest = _scan_folder(folder, pending)
        except OSError as exc:  # its images would be lost without a record: refuse instead
            raise SourceError(
                f"cannot list the folder {folder} ({exc.strerror}): fix its permissions, or move it out of the source"
            ) from None
        if images:
            rel = folder.relative_to(root).as_posix()
            found.append(_ImageFolder(rel, images, f"files:{digest:032x}", _stamp(folder.stat())))
    return sorted(found, key=lambda item: item.rel)


def folder_buckets(uids: Iterable[str]) -> dict[str, int]:
    """How many buckets each folder was split into when first planned (from the units' uids)."""
    known = {}
    for uid in uids:
        if match := _BUCKET.fullmatch(uid):
            known[match.group(1)] = int(match.group(3))
        elif uid.startswith("folder:"):
            known[uid] = 1
    return known


def _folder_units(
    src: Path, source: str, kind: str, settings: SourceSettings, shard_size: int, known: Mapping[str, int]
) -> list[InputUnit]:
    """One unit per folder naming images, or per bucket of a large one; a folder keeps the number of
    buckets it was first planned with (``known``), so files added later never move to another unit."""
    root = src.resolve()
    units = []
    for folder in _image_folders(src):
        uid = f"folder:{root}//{folder.rel}"
        buckets = known.get(uid) or math.ceil(folder.images / (FOLDER_UNIT_SHARDS * shard_size))
        for b in range(buckets):
            units.append(
                InputUnit(
                    uid if buckets == 1 else f"{uid}#{b}/{buckets}",
                    folder.stamp,
                    source,
                    kind,
                    src / folder.rel,
                    settings,
                    root=src,
                    bucket=None if buckets == 1 else (b, buckets),
                    dir_stamp=folder.dir_stamp,
                )
            )
    return units


def _parquet_units(src: Path, source: str, settings: SourceSettings, rows_per_unit: int) -> list[InputUnit]:
    """One unit per ``rows_per_unit`` rows of each row group, from the file's footer alone."""
    try:
        meta = pq.ParquetFile(src).metadata
    except (OSError, ValueError) as exc:
        raise SourceError(f"{src} is not a readable Parquet table ({exc})") from None
    check_columns(src, meta.schema.to_arrow_schema().names, settings)
    real = src.resolve()
    stamp = _stamp(real.stat())
    units = []
    for group in range(meta.num_row_groups):
        n = meta.row_group(group).num_rows
        for start in range(0, n, rows_per_unit):
            stop = min(n, start + rows_per_unit)
            uid = f"parquet:{real}#{group}:{start}-{stop}"
            units.append(InputUnit(uid, stamp, source, "parquet", src, settings, rows=(group, start, stop)))
    return units


def plan_source(
    src: Path, settings: SourceSettings, shard_size: int, known: Mapping[str, int] | None = None
) -> tuple[list[InputUnit], FormatChoice]:
    """The units of one source path, in a deterministic order (``known``: see ``folder_buckets``),
    and how it is read."""
    if not src.exists():
        raise SourceError(f"input {src} does not exist")
    if not (src.is_dir() or src.is_file()):
        raise SourceError(f"input {src} is a {kind_of(src.stat().st_mode)}, not a folder or a regular file")
    choice = choose_format(src, settings.format)
    fmt = choice.format
    source = settings.source_name or fmt
    if fmt == "parquet":
        return _parquet_units(src, source, settings, PARTS_PER_INPUT * shard_size), choice
    if fmt not in ("folder", "sa1b", "img2dataset"):
        raise SourceError(f"unknown format {fmt!r}")
    if fmt == "folder" and not src.is_dir():
        raise SourceError(f"--format folder needs a directory, got the file {src}")
    if not src.is_dir() or choice.from_tars:
        return _tar_units(src, source, fmt, settings), choice
    return _folder_units(src, source, fmt, settings, shard_size, known or {}), choice


def plan_sources(
    srcs: list[Path], settings: SourceSettings, shard_size: int, known: Mapping[str, int] | None = None
) -> tuple[list[InputUnit], list[FormatChoice]]:
    """Every unit of every source (sources in sorted path order), and how each source is read."""
    paths = sorted({Path(os.path.realpath(s)) for s in srcs})
    planned = [plan_source(src, settings, shard_size, known) for src in paths]
    return [unit for units, _ in planned for unit in units], [choice for _, choice in planned]


def plan_units(
    srcs: list[Path], settings: SourceSettings, shard_size: int, known: Mapping[str, int] | None = None
) -> list[InputUnit]:
    """Every unit of every source; sources in sorted path order."""
    return plan_sources(srcs, settings, shard_size, known)[0]


def list_unit(unit: InputUnit) -> list[InputRecord]:
    """The unit's records, sorted by original id (then location); unusable ones carry their skip reason."""
    if unit.problem is not None:
        code, detail = unit.problem
        records = [tar_problem(unit.path, unit.source, unit.kind, "", detail, code=code)]
    elif unit.rows is not None:
        records = list_parquet_rows(unit.path, unit.rows, source=unit.source, settings=unit.settings)
    elif unit.root is not None:
        records = list_folder_dir(
            unit.root, unit.path, source=unit.source, kind=unit.kind, limits=unit.limits, bucket=unit.bucket
        )
    else:
        records = list_tar_records(
            unit.path, source=unit.source, kind=unit.kind, limits=unit.limits, read_path=unit.read_path
        )
    return sorted(records, key=lambda r: (r.original_id, r.location))
