"""Keys repeated across the whole dataset, found with DuckDB over the shards' tables after the shard stage.

Keys are injective in the original id (see ``make_key``), so a repeat is the same id listed twice
(``x.jpg`` next to ``x.png``, two table rows naming one file, one SA-1B id in two tars) or, in
theory, two ids sharing a hashed key. The first occurrence, in shard order then row order, is
kept; every later one that was written is marked ``duplicate_key``: its row is skipped, its
members leave the tar. Only the shards holding a later occurrence are rewritten.
"""

from __future__ import annotations

import shutil
import tarfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq

from pipeline.catalog import sql_string
from pipeline.shard_writer import WRITER_STATS, ShardWriter, read_stats
from schemas.atomic import temp_path
from schemas.layout import shard_files_in
from schemas.tables import STATUS_OK

# DuckDB's memory for the search; beyond it DuckDB spills to ``shards/`` (at 400M keys the count per key
# does not fit a head node), so the driver's memory does not grow with the dataset.
MEMORY_LIMIT = "128MB"
# Keys whose 64-bit hash occurs more than once: 8 bytes per key to count, not the key itself.
REPEATED_HASHES = """
SELECT h FROM (SELECT hash(key) AS h FROM read_parquet({files})) GROUP BY h HAVING count(*) > 1
"""
# The rows of those keys, each after the first occurrence of its key (shard order, then row order).
LATER_OCCURRENCES = """
WITH rows AS (
    SELECT key, status, original_id, location,
           CAST(regexp_extract(filename, '(\\d+)\\.parquet$', 1) AS BIGINT) AS shard,
           file_row_number AS row
    FROM read_parquet({files}, filename = true, file_row_number = true)
    WHERE hash(key) IN (SELECT h FROM repeated)
),
ranked AS (
    SELECT *,
           row_number() OVER w AS nth,
           first_value(original_id) OVER w AS first_id,
           first_value(location) OVER w AS first_location
    FROM rows
    WINDOW w AS (PARTITION BY key ORDER BY shard, row)
)
SELECT shard, row, key, original_id, first_id, first_location FROM ranked
WHERE nth > 1 AND status = '{ok}'
ORDER BY shard, row
"""


def _detail(key: str, original_id: str, first_id: str, first_location: str) -> str:
    detail = f"key {key} already belongs to {first_location}"
    if first_id != original_id:
        detail += f" (original id {first_id!r}, not {original_id!r}: a key hash collision)"
    return detail


def later_occurrences(shards_dir: Path) -> dict[int, dict[int, str]]:
    """Per shard index, the rows (by number) whose written key an earlier row already holds, with the skip detail."""
    if not any(shards_dir.glob("*.parquet")):
        return {}
    files = sql_string(str(shards_dir / "*.parquet"))
    spill = temp_path(shards_dir / ".duplicate-keys")  # removed by the next run if this one is killed
    try:
        with duckdb.connect(config={"memory_limit": MEMORY_LIMIT, "temp_directory": str(spill)}) as con:
            con.execute(f"CREATE TEMP TABLE repeated AS {REPEATED_HASHES.format(files=files)}").fetchall()
            ((repeats,),) = con.execute("SELECT count(*) FROM repeated").fetchall()
            rows = con.sql(LATER_OCCURRENCES.format(files=files, ok=STATUS_OK)).fetchall() if repeats else []
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    found: dict[int, dict[int, str]] = defaultdict(dict)
    for shard, row, key, original_id, first_id, first_location in rows:
        found[shard][row] = _detail(key, original_id, first_id, first_location)
    return found


def _tar_samples(tar: Path) -> list[dict[str, bytes]]:
    """The samples of a shard's tar in order, each its members by extension (read into memory, never
    extracted); a key written twice is two samples."""
    samples: list[dict[str, bytes]] = []
    current = ""
    with tarfile.open(tar, mode="r:") as tf:
        for member in tf:
            handle = tf.extractfile(member)
            if handle is None:
                continue
            key, _, ext = member.name.partition(".")
            if not samples or key != current or ext in samples[-1]:
                samples.append({})
                current = key
            samples[-1][ext] = handle.read()
    return samples


def _rewrite(shards_dir: Path, index: int, marks: dict[int, str]) -> None:
    """Rewrite one shard with the rows of ``marks`` skipped as ``duplicate_key``.

    The stats file (what marks the shard finished) goes first, so a run killed meanwhile leaves an
    unfinished shard that the next run writes again.
    """
    files = shard_files_in(shards_dir, index)
    stats = read_stats(files)
    if stats is None:
        return
    rows = pq.read_table(files.parquet).to_pylist()
    samples = iter(_tar_samples(files.tar))  # one per ok row, in row order
    extra: dict[str, Any] = {k: v for k, v in stats.items() if k not in WRITER_STATS}
    files.stats.unlink()
    with ShardWriter(files, extra) as writer:
        for number, row in enumerate(rows):
            key = row["key"]
            fields = {k: v for k, v in row.items() if k not in ("key", "status", "reason", "error")}
            if row["status"] != STATUS_OK:
                writer.add_skipped(key, row["reason"], row["error"], fields)
                continue
            members = next(samples)
            if number in marks:
                where = {k: row[k] for k in ("source", "original_id", "location")}
                writer.add_skipped(key, "duplicate_key", marks[number], where)
            else:
                writer.add_sample(key, members, fields)


def mark_duplicate_keys(shards_dir: Path) -> int:
    """Mark every later occurrence of a key in the finished shards of ``shards_dir``; returns how many."""
    found = later_occurrences(shards_dir)
    for index, marks in sorted(found.items()):
        _rewrite(shards_dir, index, marks)
    return sum(len(marks) for marks in found.values())
