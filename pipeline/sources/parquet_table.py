"""A Parquet table with a local image-path column and an optional caption column."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline.sources.errors import SourceError
from pipeline.sources.records import InputRecord, ReadLimits, make_key
from schemas.shard_config import SourceSettings


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def check_columns(src: Path, columns: list[str], settings: SourceSettings) -> None:
    """Refuse a table that lacks the image (or id) column."""
    wanted = [settings.image_column, settings.id_column]
    missing = [c for c in wanted if c is not None and c not in columns]
    if missing:
        raise SourceError(f"{src} has no column {missing[0]!r} (columns: {', '.join(columns)})")


def list_parquet_rows(
    src: Path, rows: tuple[int, int, int], *, source: str, settings: SourceSettings
) -> list[InputRecord]:
    """One record per row of ``rows`` (row group, first and stop row in it); relative paths are
    taken from the table's folder.

    The image paths are not examined here (the table may name millions, maybe on storage only the
    workers see): the shard task refuses a path that is not a regular file (links followed: a table
    names paths anywhere) or is over ``--max-file-bytes`` before reading it.
    """
    group, start, stop = rows
    limits = ReadLimits(settings.max_file_bytes, settings.max_sidecar_bytes)
    table_file = pq.ParquetFile(src)
    first_row = sum(table_file.metadata.row_group(g).num_rows for g in range(group)) + start
    table = table_file.read_row_group(group).slice(start, stop - start)
    columns = table.column_names
    check_columns(src, columns, settings)
    caption_col = settings.caption_column if settings.caption_column in columns else None
    records = []
    for row_index, row in enumerate(table.to_pylist(), start=first_row):
        raw_path = row.get(settings.image_column)
        path = Path(raw_path) if raw_path else None
        if path is not None and not path.is_absolute():
            path = src.parent / path
        if settings.id_column:
            original_id = str(row[settings.id_column])
        elif raw_path:
            original_id = Path(raw_path).with_suffix("").as_posix().lstrip("/")
        else:
            original_id = f"row{row_index}"
        meta = {k: _json_safe(v) for k, v in row.items() if k not in (settings.image_column, caption_col)}
        records.append(
            InputRecord(
                key=make_key(source, original_id),
                source=source,
                original_id=original_id,
                location=str(path) if path else f"{src}#row{row_index}",
                kind="parquet",
                path=path,
                alt_text=row.get(caption_col) if caption_col else None,
                meta=meta,
                preset_skip=None if path else ("missing_path", f"row {row_index} has no image path"),
                limits=limits,
            )
        )
    return records
