"""`densecurate stats`: the common questions about a dataset root, as DuckDB queries on the catalog."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from pipeline.catalog import connect
from pipeline.report import warn_if_stale
from pipeline.table_output import print_rows

# (title, the view it needs, SQL)
STATS_QUERIES: tuple[tuple[str, str, str], ...] = (
    (
        "samples by status",
        "samples",
        "SELECT status, reason, count(*) AS n FROM samples GROUP BY ALL ORDER BY status, n DESC",
    ),
    (
        "samples by source",
        "samples",
        "SELECT source, count(*) FILTER (WHERE status = 'ok') AS written, "
        "count(*) FILTER (WHERE status = 'skipped') AS skipped FROM samples GROUP BY ALL ORDER BY source",
    ),
    (
        "captions by captioner",
        "captions",
        "SELECT captioner, count(*) AS n, count(*) FILTER (WHERE status = 'ok') AS ok, "
        "count(*) FILTER (WHERE truncated) AS truncated, count(*) FILTER (WHERE repetitive) AS repetitive, "
        "count(*) FILTER (WHERE empty) AS empty, round(avg(num_tokens), 1) AS mean_tokens "
        "FROM captions GROUP BY ALL ORDER BY captioner",
    ),
    (
        "nouns per image by field",
        "density",
        "SELECT field, count(*) AS captions, round(avg(n_nouns), 2) AS mean_nouns, "
        "median(n_nouns) AS median_nouns, round(avg(n_valid_nouns), 2) AS mean_valid_nouns, "
        "round(avg(valid_share), 3) AS mean_valid_share, round(avg(n_tokens), 1) AS mean_words "
        "FROM density GROUP BY ALL ORDER BY field",
    ),
    (
        "top nouns by field",
        "vocab",
        "SELECT field, noun, count FROM (SELECT *, row_number() OVER (PARTITION BY field ORDER BY count DESC, noun) "
        "AS rank FROM vocab) WHERE rank <= 10 ORDER BY field, rank",
    ),
)


def print_stats(root: Path) -> None:
    """Run every query whose view exists and print its table."""
    console = Console()
    warn_if_stale(root)
    with connect(root) as con:
        views = {name for (name,) in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        for title, view, sql in STATS_QUERIES:
            if view not in views:
                continue
            console.rule(title)
            cursor = con.execute(sql)
            print_rows([d[0] for d in cursor.description], cursor.fetchall())
