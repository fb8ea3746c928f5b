"""Stage outputs that carry their own fingerprint and stats in the Parquet file metadata.

Every Parquet file a stage writes carries a CRC32 checksum per page, which a deep check verifies.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.store.ray_node import ray_node_id
from schemas.atomic import atomic_output
from schemas.tables import PARQUET_META_KEY


def write_parquet(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` with a checksum on every page."""
    pq.write_table(table, path, write_page_checksum=True)


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def read_meta(path: Path) -> dict[str, Any] | None:
    """The stage metadata of a Parquet file, or None when missing or unreadable."""
    if not path.is_file():
        return None
    try:
        return json.loads(pq.ParquetFile(path).schema_arrow.metadata[PARQUET_META_KEY])
    except (OSError, KeyError, TypeError, ValueError, pa.ArrowException):
        return None


def finished_output(path: Path, fingerprint: str, expected_rows: int | None = None) -> dict[str, Any] | None:
    """The stats of ``path`` when it was made with ``fingerprint`` (and has ``expected_rows``), else None."""
    meta = read_meta(path)
    if meta is None or meta.get("fingerprint") != fingerprint:
        return None
    if expected_rows is not None and meta["stats"]["count"] != expected_rows:
        return None
    return meta["stats"]


def write_table_atomic(
    path: Path, rows: list[dict[str, Any]], schema: pa.Schema, meta: dict[str, Any], *, per_shard: bool = False
) -> None:
    """Write ``rows`` with ``meta`` in the file metadata, atomically; ``per_shard``: a stage job's output,
    in a folder the runner has cleaned of stale temporary files (so the folder is not listed again),
    whose metadata also records the Ray node that wrote it (``node_id``, None outside Ray)."""
    if per_shard:
        meta = {**meta, "node_id": ray_node_id()}
    table = pa.Table.from_pylist(rows, schema=schema).replace_schema_metadata(
        {PARQUET_META_KEY: json.dumps(meta).encode()}
    )
    with atomic_output(path, clean_stale=not per_shard) as tmp:
        write_parquet(table, tmp)
