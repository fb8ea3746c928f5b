"""The keys a read-only catalog query chooses (``caption --keys-query``), per shard, and what the query read.

The query runs once, on the catalog's views, when a run is planned. Its ``key`` column is split by shard (the
written samples of each shard's Parquet); the views it reads are fingerprinted (their files' names, sizes and
modification times), so a later run can say that those tables changed since the keys were chosen.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq

from pipeline.store.catalog import run_query, views_fingerprint
from schemas.errors import ConfigError
from schemas.layout import DatasetLayout
from schemas.tables import STATUS_OK


@dataclass(frozen=True)
class KeySelection:
    """What a keys query chose: its text, its keys by shard, and the fingerprints of the views it read."""

    query: str
    by_shard: dict[int, tuple[str, ...]]
    tables: dict[str, str]  # view -> hash of its files when the query ran
    chosen: int  # distinct keys the query returned
    outside: int  # of them, keys that are no written sample of the root's shards

    def keys_of(self, index: int) -> tuple[str, ...]:
        """The chosen keys of shard ``index``, sorted."""
        return self.by_shard.get(index, ())

    def shard_settings(self, index: int) -> str:
        """What the selection adds to shard ``index``'s fingerprint: its chosen keys."""
        return "keys=" + hashlib.sha256("\n".join(self.keys_of(index)).encode()).hexdigest()

    def record(self, index: int) -> dict[str, Any]:
        """What a caption file of shard ``index`` records of the selection."""
        return {"query": self.query, "tables": self.tables, "keys": len(self.keys_of(index))}


def views_read(query: str) -> list[str]:
    """The tables and views ``query`` (one that ran) names: what it read."""
    return sorted(duckdb.get_table_names(query, qualified=False))


def select_keys(layout: DatasetLayout, query: str, indices: list[int], leave_out: Path) -> KeySelection:
    """Run ``query`` on the root's catalog and split its ``key`` column over the shards ``indices``; the views
    it read are fingerprinted without the files under ``leave_out`` (the run's own output folder)."""
    columns, rows = run_query(layout.root, query)
    if "key" not in columns:
        raise ConfigError(
            f"--keys-query must return a `key` column; it returned {', '.join(columns) or 'no columns'}: e.g. "
            "SELECT key FROM grounding WHERE field = 'cheap' AND grounded_share < 0.6"
        )
    at = columns.index("key")
    chosen = {row[at] for row in rows if row[at] is not None}
    by_shard = {}
    for index in indices:
        table = pq.read_table(layout.shard_files(index).parquet, columns=["key", "status"])
        keys = [k for k, s in zip(*table.to_pydict().values(), strict=True) if s == STATUS_OK and k in chosen]
        by_shard[index] = tuple(sorted(keys))
    placed = sum(len(keys) for keys in by_shard.values())
    relative = leave_out.relative_to(layout.root).as_posix() if leave_out.is_relative_to(layout.root) else None
    tables = views_fingerprint(layout.root, views_read(query), leave_out=relative)
    return KeySelection(query, by_shard, tables, chosen=len(chosen), outside=len(chosen) - placed)


def changed_views(earlier: dict[str, Any] | None, selection: KeySelection) -> list[str]:
    """The views of ``selection`` whose files changed since ``earlier`` (a caption file's recorded selection) chose
    keys with the same query; none when there is no such earlier selection."""
    if not isinstance(earlier, dict) or earlier.get("query") != selection.query:
        return []
    before = earlier.get("tables") or {}
    return sorted(name for name, digest in selection.tables.items() if before.get(name) != digest)
