"""Input sources: list records deterministically, then read each one back inside a shard task."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from pipeline.records import InputRecord, ReadLimits
from pipeline.sources.detect import detect_format
from pipeline.sources.errors import SourceError
from pipeline.sources.files import kind_of
from pipeline.sources.folder import list_folder
from pipeline.sources.img2dataset import list_img2dataset
from pipeline.sources.parquet_table import list_parquet
from pipeline.sources.sa1b import list_sa1b
from schemas.shard_config import SourceSettings


def list_source(src: Path, settings: SourceSettings) -> list[InputRecord]:
    """All records of one source path, sorted by original id (then location)."""
    if not src.exists():
        raise SourceError(f"input {src} does not exist")
    if not (src.is_dir() or src.is_file()):
        st_mode = src.stat().st_mode
        raise SourceError(f"input {src} is a {kind_of(st_mode)}, not a folder or a regular file")
    fmt = settings.format if settings.format != "auto" else detect_format(src)
    source = settings.source_name or fmt
    limits = ReadLimits(settings.max_file_bytes, settings.max_sidecar_bytes)
    if fmt == "folder":
        if not src.is_dir():
            raise SourceError(f"--format folder needs a directory, got the file {src}")
        records = list_folder(src, source=source, kind="folder", limits=limits)
    elif fmt == "sa1b":
        records = list_sa1b(src, source=source, limits=limits)
    elif fmt == "img2dataset":
        records = list_img2dataset(src, source=source, limits=limits)
    elif fmt == "parquet":
        records = list_parquet(src, source=source, settings=settings)
    else:
        raise SourceError(f"unknown format {fmt!r}")
    return sorted(records, key=lambda r: (r.original_id, r.location))


def list_inputs(srcs: Sequence[Path], settings: SourceSettings) -> list[InputRecord]:
    """Every record of every source, in a deterministic order; repeated keys are marked skipped.

    Sources are taken in sorted path order, so a rerun maps the same inputs to the same shards.
    """
    records: list[InputRecord] = []
    for src in sorted({Path(s).resolve() for s in srcs}):
        records.extend(list_source(src, settings))
    return _mark_duplicate_keys(records)


def _mark_duplicate_keys(records: list[InputRecord]) -> list[InputRecord]:
    """Every record after the first with a given key is skipped as ``duplicate_key``.

    Keys are injective in the original id (see ``make_key``), so a repeat is the same id listed
    twice (``x.jpg`` next to ``x.png``, two table rows with one path); the detail also names a
    different id should two ids ever share a hashed key.
    """
    first: dict[str, InputRecord] = {}
    out = []
    for rec in records:
        seen = first.get(rec.key)
        if seen is not None and rec.preset_skip is None:
            detail = f"key {rec.key} already belongs to {seen.location}"
            if seen.original_id != rec.original_id:
                detail += f" (original id {seen.original_id!r}, not {rec.original_id!r}: a key hash collision)"
            rec = replace(rec, preset_skip=("duplicate_key", detail))
        first.setdefault(rec.key, rec)
        out.append(rec)
    return out
