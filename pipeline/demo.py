"""The offline demo on the bundled sample."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from pipeline.catalog import run_query
from pipeline.sample_data import write_sample_folder
from pipeline.shard_stage import run_shard_stage
from pipeline.table_output import print_rows
from schemas.shard_config import ShardConfig


def run_demo(out: Path, *, workers: int = 2) -> Path:
    """Shard the sample photos into ``out/dataset`` and show what was written and skipped."""
    from pipeline.cli import print_shard_summary

    console = Console()
    photos = write_sample_folder(out / "sample_photos")
    root = out / "dataset"
    console.rule("shard: sample photos -> webdataset shards")
    summary = run_shard_stage([photos], root, ShardConfig(shard_size=4, workers=workers))
    print_shard_summary(summary, root)
    sql = "SELECT status, reason, count(*) AS n FROM samples GROUP BY ALL ORDER BY status, reason"
    console.rule(f'densecurate query {root} "{sql}"')
    print_rows(*run_query(root, sql))
    sql = "SELECT key, width, height, alt_text FROM samples WHERE status = 'ok' ORDER BY key LIMIT 5"
    console.rule("a few written samples")
    print_rows(*run_query(root, sql))
    console.print(f'Shards are in {root / "shards"}; query them with: densecurate query {root} "SQL"')
    return root
