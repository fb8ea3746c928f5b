"""Keys repeated across the whole dataset, found with DuckDB over the shards' tables after the shard stage.

Keys are injective in the original id (see ``make_key``), so a repeat is the same id listed twice
(``x.jpg`` next to ``x.png``, two table rows naming one file, one SA-1B id in two tars) or, in
theory, two ids sharing a hashed key. The first occurrence, in shard order then row order, is
kept; every later one that was written is marked ``duplicate_key``: its row is skipped, its
members leave the tar. When a first occurrence is gone (its input removed or changed), the marks
are made again as a run over the remaining inputs would make them: the earliest marked row left
is read again from its input, and the later ones name it. Only the shards holding such rows are
rewritten.
"""

from __future__ import annotations

import shutil
import tarfile
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq

from pipeline.sources.records import SkipRecord
from pipeline.sources.tar_end import require_tar_end
from pipeline.store.catalog import sql_string
from pipeline.store.shard_writer import WRITER_STATS, ShardWriter, read_stats
from schemas.atomic import temp_path
from schemas.layout import shard_files_in
from schemas.tables import STATUS_OK

# DuckDB's memory for the search; beyond it DuckDB spills to ``shards/`` (at 400M keys the count per key
# does not fit a head node), so the driver's memory does not grow with the dataset.
MEMORY_LIMIT = "128MB"
DUPLICATE_KEY = "duplicate_key"
# Keys whose 64-bit hash occurs more than once, or on a row marked as a duplicate (its first occurrence
# may be gone): 8 bytes per key to count, not the key itself.
CANDIDATE_HASHES = """
SELECT h FROM (SELECT hash(key) AS h, reason FROM read_parquet({files}))
GROUP BY h HAVING count(*) > 1 OR bool_or(reason = '{duplicate}')
"""
# The rows of those keys that a mark concerns (shard order, then row order): each after the first
# occurrence of its key that is written or marked, and a marked first occurrence (whose first is gone).
MARK_CANDIDATES = """
WITH rows AS (
    SELECT key, status, reason, error, original_id, location,
           CAST(regexp_extract(filename, '(\\d+)\\.parquet$', 1) AS BIGINT) AS shard,
           file_row_number AS row
    FROM read_parquet({files}, filename = true, file_row_number = true)
    WHERE hash(key) IN (SELECT h FROM candidates)
),
ranked AS (
    SELECT *,
           row_number() OVER w AS nth,
           first_value(original_id) OVER w AS first_id,
           first_value(location) OVER w AS first_location
    FROM rows
    WINDOW w AS (PARTITION BY key ORDER BY shard, row)
)
SELECT shard, row, key, status, reason, error, nth, original_id, first_id, first_location FROM ranked
WHERE reason = '{duplicate}' OR (nth > 1 AND status = '{ok}')
ORDER BY shard, row
"""

# A written record: its tar members and Parquet row.
Sample = tuple[dict[str, bytes | str], dict[str, Any]]
# Reads rows of shard ``index`` (row number: key) again from their input: what each is now.
Restore = Callable[[int, dict[int, str]], dict[int, Sample | SkipRecord]]


@dataclass
class KeyChanges:
    """Per shard index, the rows to mark ``duplicate_key`` (or whose mark must name another first
    occurrence), with the detail, and the marked rows no earlier row holds the key of now, with their key."""

    marks: dict[int, dict[int, str]] = field(default_factory=lambda: defaultdict(dict))
    restores: dict[int, dict[int, str]] = field(default_factory=lambda: defaultdict(dict))

    def shards(self) -> list[int]:
        return sorted(self.marks.keys() | self.restores.keys())

    def __bool__(self) -> bool:
        return bool(self.marks or self.restores)


def _detail(key: str, original_id: str, first_id: str, first_location: str) -> str:
    detail = f"key {key} already belongs to {first_location}"
    if first_id != original_id:
        detail += f" (original id {first_id!r}, not {original_id!r}: a key hash collision)"
    return detail


def _candidate_rows(shards_dir: Path) -> list[tuple[Any, ...]]:
    """The rows of ``MARK_CANDIDATES`` over the shards' tables (DuckDB under ``MEMORY_LIMIT``)."""
    files = sql_string(str(shards_dir / "*.parquet"))
    spill = temp_path(shards_dir / ".duplicate-keys")  # removed by the next run if this one is killed
    try:
        with duckdb.connect(config={"memory_limit": MEMORY_LIMIT, "temp_directory": str(spill)}) as con:
            candidates = CANDIDATE_HASHES.format(files=files, duplicate=DUPLICATE_KEY)
            con.execute(f"CREATE TEMP TABLE candidates AS {candidates}").fetchall()
            ((count,),) = con.execute("SELECT count(*) FROM candidates").fetchall()
            query = MARK_CANDIDATES.format(files=files, ok=STATUS_OK, duplicate=DUPLICATE_KEY)
            return con.sql(query).fetchall() if count else []
    finally:
        shutil.rmtree(spill, ignore_errors=True)


def key_changes(shards_dir: Path) -> KeyChanges:
    """What marking must change in the finished shards of ``shards_dir`` (nothing when the marks are current)."""
    changes = KeyChanges()
    if not any(shards_dir.glob("*.parquet")):
        return changes
    for shard, row, key, status, reason, error, nth, original_id, first_id, first_location in _candidate_rows(
        shards_dir
    ):
        if nth == 1:  # a marked row whose first occurrence is gone
            changes.restores[shard][row] = key
            continue
        detail = _detail(key, original_id, first_id, first_location)
        if status == STATUS_OK or (reason == DUPLICATE_KEY and error != detail):
            changes.marks[shard][row] = detail
    return changes


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
        require_tar_end(tf.fileobj, tf.offset)  # a shard cut short must not lose its later samples here
    return samples


def _outcome(
    row: dict[str, Any], members: dict[str, bytes] | None, mark: str | None, restored: Sample | SkipRecord | None
) -> Sample | SkipRecord:
    """What a row of a rewritten shard becomes: ``restored`` (read again), marked (``mark``: the detail),
    or as it was (``members``: its tar members when it was written)."""
    if restored is not None:
        return restored
    if mark is not None:
        return SkipRecord(DUPLICATE_KEY, mark)
    if members is None:
        return SkipRecord(row["reason"], row["error"])
    return members, {k: v for k, v in row.items() if k not in ("key", "status", "reason", "error")}


def _rewrite(
    shards_dir: Path, index: int, marks: dict[int, str], restored: dict[int, Sample | SkipRecord]
) -> Counter[str]:
    """Rewrite one shard with the rows of ``marks`` skipped as ``duplicate_key`` (naming their first
    occurrence) and the rows of ``restored`` as they are now; returns how the rows' outcomes changed
    (per skip reason, ``ok`` for written: rows gained minus rows lost).

    The stats file (what marks the shard finished) goes first, so a run killed meanwhile leaves an
    unfinished shard that the next run writes again.
    """
    files = shard_files_in(shards_dir, index)
    stats = read_stats(files)
    changed: Counter[str] = Counter()
    if stats is None:
        return changed
    rows = pq.read_table(files.parquet).to_pylist()
    samples = iter(_tar_samples(files.tar))  # one per ok row, in row order
    extra: dict[str, Any] = {k: v for k, v in stats.items() if k not in WRITER_STATS}
    files.stats.unlink()
    with ShardWriter(files, extra) as writer:
        for number, row in enumerate(rows):
            members = next(samples) if row["status"] == STATUS_OK else None
            outcome = _outcome(row, members, marks.get(number), restored.get(number))
            if isinstance(outcome, SkipRecord):
                where = {k: row[k] for k in ("source", "original_id", "location")}
                writer.add_skipped(row["key"], outcome.code, outcome.detail, where)
            else:
                writer.add_sample(row["key"], *outcome)
            changed[row["reason"] or STATUS_OK] -= 1
            changed[writer.rows[-1]["reason"] or STATUS_OK] += 1
    return changed


def mark_duplicate_keys(shards_dir: Path, restore: Restore) -> Counter[str]:
    """Mark every later occurrence of a key in the finished shards of ``shards_dir`` and restore (by
    ``restore``) each marked row whose first occurrence is gone; returns how the rows' outcomes changed
    (per skip reason, ``ok`` for written: rows gained minus rows lost)."""
    changes = key_changes(shards_dir)
    changed: Counter[str] = Counter()
    for index in changes.shards():
        rows = changes.restores.get(index, {})
        restored = restore(index, rows) if rows else {}
        changed.update(_rewrite(shards_dir, index, changes.marks.get(index, {}), restored))
    return changed
