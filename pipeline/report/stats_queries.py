"""`densecurate stats`: the common questions about a dataset root, as DuckDB queries on the catalog."""

from __future__ import annotations

from pathlib import Path

from pipeline.report.console import warn_if_stale
from pipeline.report.table_output import print_rows, table_console
from pipeline.store.catalog import connect, damaged_files

# (title, the views it needs separated by spaces (``view.column``: a column that view must have), SQL)
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
        "GPU-hours by caption field (a merged field's: what its sources spent on its keys)",
        "captions captions.gpu_seconds captions.source",
        "SELECT captioner AS field, string_agg(DISTINCT source, ', ' ORDER BY source) AS merged_from, "
        "count(*) AS captions, round(sum(coalesce(gpu_seconds, seconds * gpus)) / 3600, 4) AS gpu_hours, "
        "round(sum(seconds) / 3600, 4) AS worker_hours, string_agg(DISTINCT device, ', ' ORDER BY device) AS devices "
        "FROM captions GROUP BY ALL ORDER BY captioner",
    ),
    (
        "GPU-hours by model (captioners' own rows)",
        "captions captions.gpu_seconds captions.source",
        "SELECT model, coalesce(model_sha256[:12], revision) AS weights, engine_version, count(*) AS captions, "
        "round(sum(coalesce(gpu_seconds, seconds * gpus)) / 3600, 4) AS gpu_hours, "
        "round(sum(seconds) / 3600, 4) AS worker_hours FROM captions WHERE source IS NULL "
        "GROUP BY ALL ORDER BY model, weights",
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
        "grounded concept density by field",
        "grounding duplicates",
        "SELECT g.field, any_value(g.model) AS clip_model, count(*) FILTER (WHERE NOT g.missing) AS captions, "
        "round(avg(g.n_grounded_nouns) FILTER (WHERE NOT g.missing), 2) AS grounded_nouns_per_image, "
        "round(sum(g.n_grounded_nouns) / nullif(sum(g.n_nouns), 0), 3) AS grounded_share, "
        "round(quantile_cont(g.clip_score, 0.1), 2) AS clip_p10, round(quantile_cont(g.clip_score, 0.5), 2) "
        "AS clip_median, round(quantile_cont(g.clip_score, 0.9), 2) AS clip_p90, "
        "round(avg(CASE WHEN dup.kept = false THEN 1 ELSE 0 END), 3) AS near_duplicate_share "
        "FROM grounding g LEFT JOIN duplicates dup ON dup.key = g.key AND dup.model = g.model "
        "GROUP BY ALL ORDER BY g.field",
    ),
    (
        "duplicates by CLIP model",
        "duplicates",
        "SELECT model, count(DISTINCT cluster) AS clusters, count(*) FILTER (WHERE NOT kept) AS duplicates, "
        "count(*) FILTER (WHERE kind = 'exact') AS exact, count(*) FILTER (WHERE kind = 'semantic') AS semantic "
        "FROM duplicates GROUP BY ALL ORDER BY model",
    ),
    (
        "top nouns by field",
        "vocab",
        "SELECT field, noun, count FROM (SELECT *, row_number() OVER (PARTITION BY field ORDER BY count DESC, noun) "
        "AS rank FROM vocab) WHERE rank <= 10 ORDER BY field, rank",
    ),
    (
        "what was run on this root (the latest 20 runs; `SELECT * FROM runs` for all)",
        "runs",
        "SELECT strftime(started_at, '%Y-%m-%d %H:%M:%S') AS started_utc, command, name, shards, shards_reused, "
        "written, round(epoch(ended_at) - epoch(started_at), 1) AS seconds, device, round(gpu_seconds, 1) AS "
        "gpu_seconds, left(settings_fingerprint, 12) AS settings FROM runs ORDER BY started_at DESC LIMIT 20",
    ),
)


def print_stats(root: Path) -> None:
    """List the files the views leave out (their footer does not read), then run every query whose view exists and
    print its table."""
    console = table_console()
    warn_if_stale(root)
    with connect(root) as con:
        if damaged := damaged_files(con):
            console.rule("damaged files (left out of the figures below)")
            print_rows(
                ["file", "rewritten by"],
                [
                    (path, f"densecurate {stage} --repair" if stage else "nothing: a record of a past run, remove it")
                    for path, stage in damaged.items()
                ],
            )
        views = {name for (name,) in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        columns = {
            f"{view}.{column}"
            for view, column in con.execute(
                "SELECT table_name, column_name FROM duckdb_columns() WHERE NOT internal"
            ).fetchall()
        }
        for title, needed, sql in STATS_QUERIES:
            if not set(needed.split()) <= views | columns:
                continue
            console.rule(title)
            cursor = con.execute(sql)
            print_rows([d[0] for d in cursor.description], cursor.fetchall())
