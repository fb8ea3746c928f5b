"""The DuckDB catalog: views over the dataset root's Parquet, stored in ``ROOT/catalog.duckdb``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import duckdb

from schemas.layout import DatasetLayout

# view name -> Parquet glob relative to the dataset root
VIEW_GLOBS: dict[str, str] = {"samples": "shards/*.parquet", "captions": "captions/*/*.parquet"}


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _available_views(layout: DatasetLayout) -> dict[str, str]:
    root = layout.root.resolve()
    return {name: str(root / glob) for name, glob in VIEW_GLOBS.items() if any(root.glob(glob))}


def refresh_catalog(layout: DatasetLayout) -> Path:
    """Rewrite the catalog with one view per table that has files; swapped in atomically."""
    views = _available_views(layout)
    target = layout.catalog_path
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    with duckdb.connect(str(tmp)) as con:
        for name, pattern in views.items():
            con.execute(
                f"CREATE VIEW {name} AS SELECT * FROM read_parquet({_sql_string(pattern)}, union_by_name = true)"
            )
        con.execute("CREATE TABLE catalog_info (info VARCHAR)")
        con.execute("INSERT INTO catalog_info VALUES (?)", [json.dumps(views, sort_keys=True)])
    os.replace(tmp, target)
    return target


def _catalog_is_current(layout: DatasetLayout) -> bool:
    try:
        with duckdb.connect(str(layout.catalog_path), read_only=True) as con:
            (stored,) = con.execute("SELECT info FROM catalog_info").fetchone()
    except (duckdb.Error, TypeError):
        return False
    return json.loads(stored) == _available_views(layout)


def run_query(root: Path, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run ``sql`` on a read-only connection to the root's catalog; returns column names and rows."""
    layout = DatasetLayout(root)
    if not layout.root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist")
    if not (layout.catalog_path.is_file() and _catalog_is_current(layout)):
        refresh_catalog(layout)
    with duckdb.connect(str(layout.catalog_path), read_only=True) as con:
        cursor = con.execute(sql)
        columns = [d[0] for d in cursor.description] if cursor.description else []
        return columns, cursor.fetchall()
