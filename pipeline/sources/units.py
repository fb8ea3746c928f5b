"""Input units: the pieces of a source that are listed independently, each inside its own shard task.

The driver plans from units only (one ``stat`` per tar or Parquet file, the names in each folder,
each Parquet footer): a tar file, the image files directly in one folder (one of its buckets when it
holds more than ``FOLDER_UNIT_SHARDS`` shards of images: files go to a bucket by a hash of their
name), or up to ``PARTS_PER_INPUT`` shards of rows of one Parquet row group. Records are listed by
``list_unit`` where the unit is processed, so planning time and driver memory grow with the number
of input files, not samples.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.records import InputRecord, ReadLimits
from pipeline.sources.detect import detect_format
from pipeline.sources.errors import SourceError
from pipeline.sources.files import kind_of, listed_file
from pipeline.sources.folder import IMAGE_SUFFIXES, list_folder_dir
from pipeline.sources.parquet_table import check_columns, list_parquet_rows
from pipeline.sources.tar_source import list_tar_records, tar_problem
from schemas.layout import PARTS_PER_INPUT
from schemas.shard_config import SourceSettings

# A folder with more images than this many shards is split into buckets (one unit each), so its
# images are written in parallel.
FOLDER_UNIT_SHARDS = 8
_BUCKET = re.compile(r"(folder:.*)#(\d+)/(\d+)")


@dataclass(frozen=True)
class InputUnit:
    """One independently listed piece of a source.

    ``uid`` names it for the plan (stable across runs); ``stamp`` changes when its file changes
    (size and mtime of a tar or table, mtime of a folder: files added, removed or renamed).
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


def _image_folders(root: Path) -> list[tuple[str, os.stat_result, int]]:
    """Every folder under ``root`` (links to folders not followed) that names image files, sorted,
    with its stat and how many image names it holds; only names are read here, no file is examined."""
    found: list[tuple[str, os.stat_result, int]] = []
    pending = [root]
    while pending:
        folder = pending.pop()
        images = 0
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(Path(entry.path))
                    elif Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                        images += 1
        except OSError as exc:  # its images would be lost without a record: refuse instead
            raise SourceError(
                f"cannot list the folder {folder} ({exc.strerror}): fix its permissions, or move it out of the source"
            ) from None
        if images:
            found.append((folder.relative_to(root).as_posix(), folder.stat(), images))
    return sorted(found, key=lambda item: item[0])


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
    for rel, st, images in _image_folders(src):
        uid = f"folder:{root}//{rel}"
        buckets = known.get(uid) or math.ceil(images / (FOLDER_UNIT_SHARDS * shard_size))
        if buckets == 1:
            units.append(InputUnit(uid, _stamp(st), source, kind, src / rel, settings, root=src))
            continue
        for b in range(buckets):
            units.append(
                InputUnit(
                    f"{uid}#{b}/{buckets}", _stamp(st), source, kind, src / rel, settings, root=src, bucket=(b, buckets)
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
) -> list[InputUnit]:
    """The units of one source path, in a deterministic order (``known``: see ``folder_buckets``)."""
    known = known or {}
    if not src.exists():
        raise SourceError(f"input {src} does not exist")
    if not (src.is_dir() or src.is_file()):
        raise SourceError(f"input {src} is a {kind_of(src.stat().st_mode)}, not a folder or a regular file")
    fmt = settings.format if settings.format != "auto" else detect_format(src)
    source = settings.source_name or fmt
    if fmt == "folder":
        if not src.is_dir():
            raise SourceError(f"--format folder needs a directory, got the file {src}")
        return _folder_units(src, source, "folder", settings, shard_size, known)
    if fmt == "sa1b":
        if not src.is_dir() or any(src.glob("*.tar")):
            return _tar_units(src, source, "sa1b", settings)
        return _folder_units(src, source, "sa1b", settings, shard_size, known)
    if fmt == "img2dataset":
        return _tar_units(src, source, "img2dataset", settings)
    if fmt == "parquet":
        return _parquet_units(src, source, settings, PARTS_PER_INPUT * shard_size)
    raise SourceError(f"unknown format {fmt!r}")


def plan_units(
    srcs: list[Path], settings: SourceSettings, shard_size: int, known: Mapping[str, int] | None = None
) -> list[InputUnit]:
    """Every unit of every source; sources in sorted path order."""
    paths = sorted({Path(s).resolve() for s in srcs})
    return [unit for src in paths for unit in plan_source(src, settings, shard_size, known)]


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
