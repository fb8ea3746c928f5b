"""Input sources: list records deterministically, then read each one back inside a shard task."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from pipeline.records import InputRecord
from pipeline.sources.detect import detect_format
from pipeline.sources.folder import list_folder
from pipeline.sources.img2dataset import list_img2dataset
from pipeline.sources.parquet_table import list_parquet
from pipeline.sources.sa1b import list_sa1b
from schemas.shard_config import SourceSettings


class SourceError(ValueError):
    """An input that cannot be listed at all (missing path, unknown format)."""


def list_source(src: Path, settings: SourceSettings) -> list[InputRecord]:
    """All records of one source path, sorted by original id (then location)."""
    if not src.exists():
        raise SourceError(f"input {src} does not exist")
    fmt = settings.format if settings.format != "auto" else detect_format(src)
    source = settings.source_name or fmt
    if fmt == "folder":
        if not src.is_dir():
            raise SourceError(f"--format folder needs a directory, got the file {src}")
        records = list_folder(src, source=source, kind="folder")
    elif fmt == "sa1b":
        records = list_sa1b(src, source=source)
    elif fmt == "img2dataset":
        records = list_img2dataset(src, source=source)
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
    first_location: dict[str, str] = {}
    out = []
    for rec in records:
        if rec.key in first_location and rec.preset_skip is None:
            seen = first_location[rec.key]
            rec = replace(rec, preset_skip=("duplicate_key", f"key {rec.key} already belongs to {seen}"))
        first_location.setdefault(rec.key, rec.location)
        out.append(rec)
    return out
