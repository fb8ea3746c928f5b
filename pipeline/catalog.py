"""The DuckDB catalog: views over the dataset root's Parquet, stored in ``ROOT/catalog.duckdb``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from schemas.layout import DatasetLayout

READ_ALL = "SELECT * FROM read_parquet({files}, union_by_name = true)"
# Density rows plus, from the vocabulary, how many of each caption's nouns are valid.
DENSITY_WITH_VALID = """
WITH d AS (SELECT * FROM read_parquet({files}, union_by_name = true)),
valid AS (
    SELECT x.field, x.key, count(*) AS n_valid_nouns
    FROM (SELECT field, key, unnest(nouns) AS noun FROM d) x
    JOIN vocab v ON v.field = x.field AND v.noun = x.noun AND v.valid
    GROUP BY ALL
)
SELECT d.*, coalesce(valid.n_valid_nouns, 0) AS n_valid_nouns,
       CASE WHEN d.n_nouns > 0 THEN coalesce(valid.n_valid_nouns, 0) / d.n_nouns END AS valid_share
FROM d LEFT JOIN valid USING (field, key)
"""


@dataclass(frozen=True)
class View:
    """A catalog view over the Parquet files matching ``glob`` (relative to the root)."""

    name: str
    glob: str
    select: str = READ_ALL
    requires: tuple[str, ...] = ()


VIEWS: tuple[View, ...] = (
    View("samples", "shards/*.parquet"),
    View("captions", "captions/*/*.parquet"),
    View("vocab", "vocab/*.parquet"),
    View("density", "density/*/*.parquet", DENSITY_WITH_VALID, requires=("vocab",)),
)


def sql_string(text: str) -> str:
    """``text`` as a DuckDB string literal."""
    return "'" + text.replace("'", "''") + "'"


def _available_views(layout: DatasetLayout) -> dict[str, str]:
    root = layout.root.resolve()
    found: dict[str, str] = {}
    for view in VIEWS:
        if any(root.glob(view.glob)) and all(r in found for r in view.requires):
            found[view.name] = str(root / view.glob)
    return found


def refresh_catalog(layout: DatasetLayout) -> Path:
    """Rewrite the catalog with one view per table that has files; swapped in atomically."""
    views = _available_views(layout)
    target = layout.catalog_path
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    with duckdb.connect(str(tmp)) as con:
        for view in VIEWS:
            if view.name in views:
                select = view.select.format(files=sql_string(views[view.name]))
                con.execute(f"CREATE VIEW {view.name} AS {select}")
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


def connect(root: Path) -> duckdb.DuckDBPyConnection:
    """A read-only connection to the root's catalog, refreshed first when tables appeared or moved."""
    layout = DatasetLayout(root)
    if not layout.root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist")
    if not (layout.catalog_path.is_file() and _catalog_is_current(layout)):
        refresh_catalog(layout)
    return duckdb.connect(str(layout.catalog_path), read_only=True)


def run_query(root: Path, sql: str, params: list[Any] | None = None) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run ``sql`` on a read-only connection to the root's catalog; returns column names and rows."""
    with connect(root) as con:
        cursor = con.execute(sql, params or [])
        columns = [d[0] for d in cursor.description] if cursor.description else []
        return columns, cursor.fetchall()
