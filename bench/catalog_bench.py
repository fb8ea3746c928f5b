"""The DuckDB catalog over many shards: refresh, `densecurate stats` and typical queries at 10,000s of files.

    python bench/catalog_bench.py [--shards 1000 10000] [--rows 10] [--repeat 3] [--dir DIR] [--clock cpu]

For each shard count N it builds a synthetic dataset root (under ``--dir``, reused when it already has N shards;
default a temporary folder) with the Parquet a real run leaves: ``shards/NNNNN.parquet`` (``SAMPLES_SCHEMA``,
the columns the shard stage writes) with its ``NNNNN_stats.json`` (no tars: nothing timed here opens them), one
caption field ``captions/bench/NNNNN.parquet`` (``CAPTIONS_SCHEMA`` with the caption stage's file metadata) and
its ``density/bench/NNNNN.parquet`` (``DENSITY_SCHEMA`` with the score stage's metadata, scored from the current
captions, so nothing is stale), then ``vocab/bench.parquet`` by ``pipeline.stages.score.write_vocab``. ``--rows``
rows per samples file (default 10; one in ten skipped). The per-shard files are written with ``pq.write_table``
and the metadata ``write_table_atomic`` stores, in a process pool.

Timed in this process (interpreter start and imports not counted), best and median of ``--repeat`` runs, in
wall seconds (``--clock cpu``: this process's CPU seconds, all threads, steadier on a shared machine):
  * refresh, new: ``pipeline.store.catalog.refresh_catalog`` with no catalog present (it is deleted before each run)
  * refresh, again: ``refresh_catalog`` over the catalog it wrote, no file changed (what a stage's end does
    when that stage wrote nothing)
  * stats: ``pipeline.report.stats_queries.print_stats``, the function `densecurate stats ROOT` calls (its output
    discarded): the staleness check and every stats query of the views the root has
  * query by source: ``pipeline.store.catalog.run_query`` (what `densecurate query ROOT SQL` calls) with
    ``QUERY_BY_SOURCE``, the catalog current
  * query join: ``run_query`` with ``QUERY_JOIN`` (captions joined to samples on key), the catalog current
  * query, new shard: ``run_query`` with ``QUERY_BY_SOURCE`` right after one more shard's Parquet and stats
    file were written (as a running shard stage does); the extra shards are removed afterwards
Each query opens the catalog as the CLI does (the check that it is current included).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from pipeline.report.stats_queries import print_stats
from pipeline.stages.score import write_vocab
from pipeline.store.catalog import refresh_catalog, run_query
from schemas.layout import DatasetLayout, shard_stem
from schemas.tables import (
    CAPTIONS_SCHEMA,
    DENSITY_SCHEMA,
    PARQUET_META_KEY,
    SAMPLES_SCHEMA,
    STATUS_OK,
    STATUS_SKIPPED,
)

FIELD = "bench"
SOURCES = ("laion", "cc12m", "sa1b", "folder")
NOUNS = ("dog", "cat", "tree", "car", "house", "boat", "bird", "road", "sky", "chair", "table", "woman")
QUERY_BY_SOURCE = "SELECT source, count(*) AS n FROM samples WHERE status = 'ok' GROUP BY source ORDER BY source"
QUERY_JOIN = (
    "SELECT s.source, count(*) AS captions, round(avg(c.num_tokens), 1) AS mean_tokens "
    "FROM captions c JOIN samples s USING (key) WHERE c.status = 'ok' GROUP BY s.source ORDER BY s.source"
)
STEPS = ("refresh, new", "refresh, again", "stats", "query by source", "query join", "query, new shard")


def fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def write_table(path: Path, rows: list[dict[str, Any]], schema: pa.Schema, meta: dict[str, Any] | None) -> None:
    """``rows`` as Parquet, with ``meta`` in the file metadata as ``write_table_atomic`` stores it."""
    table = pa.Table.from_pylist(rows, schema=schema)
    if meta is not None:
        table = table.replace_schema_metadata({PARQUET_META_KEY: json.dumps(meta).encode()})
    pq.write_table(table, path)


def write_samples(layout: DatasetLayout, index: int, rows: int) -> list[str]:
    """Shard ``index``'s samples Parquet and stats file, as the shard stage writes them; returns the ok keys."""
    stem = shard_stem(index)
    samples = []
    for i in range(rows):
        key = f"{stem}{i:04d}"
        ok = i % 10 != 9  # one in ten skipped, as too small
        samples.append(
            {
                "key": key,
                "status": STATUS_OK if ok else STATUS_SKIPPED,
                "reason": None if ok else "too_small",
                "error": None if ok else "image is 32x32, under min_size 64",
                "source": SOURCES[(index + i) % len(SOURCES)],
                "original_id": f"{index}-{i}",
                "location": f"/data/input/{stem}.tar::{i:04d}.jpg",
                "alt_text": f"a {NOUNS[i % len(NOUNS)]} near a {NOUNS[(i + index) % len(NOUNS)]}",
                "original_width": 1024,
                "original_height": 768,
                "width": 512 if ok else None,
                "height": 384 if ok else None,
                "jpeg_bytes": 40_000 + i if ok else None,
                "sha256": hashlib.sha256(key.encode()).hexdigest() if ok else None,
                "meta_json": json.dumps({"url": f"https://example.com/{key}.jpg"}),
            }
        )
    files = layout.shard_files(index)
    write_table(files.parquet, samples, SAMPLES_SCHEMA, None)
    ok_keys = [s["key"] for s in samples if s["status"] == STATUS_OK]
    skipped = rows - len(ok_keys)
    stats = {
        "count": rows,
        "successes": len(ok_keys),
        "skipped": skipped,
        "skipped_by_reason": {"too_small": skipped} if skipped else {},
        "status_dict": {"success": len(ok_keys), **({"too_small": skipped} if skipped else {})},
        "start_time": 0.0,
        "end_time": 1.0,
        "duration": 1.0,
        "shard": stem,
        "inputs_fingerprint": fingerprint("shard", index),
        "settings": {},
    }
    files.stats.write_text(json.dumps(stats, indent=2, sort_keys=True))
    return ok_keys


def write_field(layout: DatasetLayout, index: int, keys: list[str]) -> None:
    """Shard ``index``'s caption table of FIELD and its density table, with their stages' file metadata."""
    captions = []
    for j, key in enumerate(keys):
        text = f"A photo of a {NOUNS[j % len(NOUNS)]} next to a {NOUNS[(j + 3) % len(NOUNS)]} under the sky."
        captions.append(
            {
                "key": key,
                "captioner": FIELD,
                "status": "ok",
                "caption": text,
                "raw_caption": text,
                "num_tokens": 14 + j % 5,
                "finish_reason": "eos",
                "truncated": False,
                "repetition": 0.0,
                "repetitive": False,
                "empty": False,
                "seconds": 0.05,
                "model": "bench/captioner",
                "revision": "main",
                "prompt_id": "short",
                "prompt": "Describe the image.",
                "temperature": 0.0,
                "top_p": 1.0,
                "seed": 0,
                "max_new_tokens": 64,
                "engine": "transformers",
                "device": "cpu",
                "gpus": 0.0,
            }
        )
    caption_fp = fingerprint("captions", index)
    caption_meta = {
        "fingerprint": caption_fp,
        "rows_fingerprint": caption_fp,
        "sample": None,
        "stats": {"count": len(captions), "ok": len(captions), "reused": 0},
    }
    write_table(layout.caption_file(FIELD, index), captions, CAPTIONS_SCHEMA, caption_meta)
    density = []
    for c in captions:
        nouns = [w for w in c["caption"].lower().rstrip(".").split() if w in NOUNS]
        density.append(
            {"key": c["key"], "field": FIELD, "missing": False, "n_tokens": 12, "n_nouns": len(nouns), "nouns": nouns}
        )
    density_meta = {
        "fingerprint": fingerprint("density", index),
        "source_fingerprint": caption_fp,  # scored from the captions the field holds now: not stale
        "stats": {"count": len(density), "missing": 0, "total_nouns": sum(d["n_nouns"] for d in density)},
        "spacy": "bench",
    }
    write_table(layout.density_file(FIELD, index), density, DENSITY_SCHEMA, density_meta)


def write_shards(root: Path, indices: range, rows: int) -> None:
    layout = DatasetLayout(root)
    for index in indices:
        write_field(layout, index, write_samples(layout, index, rows))


def build_root(root: Path, shards: int, rows: int) -> None:
    """Write the synthetic root, unless ``root`` already is one of ``shards`` shards."""
    layout = DatasetLayout(root)
    if layout.vocab_file(FIELD).is_file() and len(layout.shard_indices()) == shards:
        return
    shutil.rmtree(root, ignore_errors=True)
    for folder in (layout.shards_dir, layout.captions_dir(FIELD), layout.density_dir(FIELD)):
        folder.mkdir(parents=True)
    workers = os.cpu_count() or 1
    step = -(-shards // (4 * workers))
    with ProcessPoolExecutor(workers) as pool:
        chunks = [range(start, min(start + step, shards)) for start in range(0, shards, step)]
        list(pool.map(write_shards, [root] * len(chunks), chunks, [rows] * len(chunks)))
    write_vocab(layout, FIELD, min_count=1)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(clock: Callable[[], float], fn: Callable[[], object], before: Callable[[], object] | None = None) -> float:
    """Seconds of ``fn()`` by ``clock`` (``before()`` not counted)."""
    if before is not None:
        before()
    started = clock()
    fn()
    return clock() - started


def quiet_stats(root: Path) -> None:
    """`densecurate stats ROOT` with its tables and warnings discarded."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        print_stats(root)


def measure(root: Path, shards: int, rows: int, repeat: int, clock: Callable[[], float]) -> dict[str, list[float]]:
    """Seconds of each of STEPS by ``clock``, ``repeat`` runs each."""
    layout = DatasetLayout(root)
    times: dict[str, list[float]] = {step: [] for step in STEPS}
    for _ in range(repeat):
        times["refresh, new"].append(
            timed(clock, lambda: refresh_catalog(layout), lambda: layout.catalog_path.unlink(missing_ok=True))
        )
    for _ in range(repeat):
        times["refresh, again"].append(timed(clock, lambda: refresh_catalog(layout)))
    for _ in range(repeat):
        times["stats"].append(timed(clock, lambda: quiet_stats(root)))
    for _ in range(repeat):
        times["query by source"].append(timed(clock, lambda: run_query(root, QUERY_BY_SOURCE)))
    for _ in range(repeat):
        times["query join"].append(timed(clock, lambda: run_query(root, QUERY_JOIN)))
    extra = range(shards, shards + repeat)
    for index in extra:
        times["query, new shard"].append(
            timed(clock, lambda: run_query(root, QUERY_BY_SOURCE), lambda i=index: write_samples(layout, i, rows))
        )
    for index in extra:
        for path in layout.shard_files(index).all():
            path.unlink(missing_ok=True)
    refresh_catalog(layout)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[10_000], help="shard counts to measure")
    parser.add_argument("--rows", type=int, default=10, help="rows per shard's samples file")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each timed step (best and median shown)")
    parser.add_argument("--dir", type=Path, help="where the roots are written and kept (default: a temporary folder)")
    parser.add_argument(
        "--clock", choices=CLOCKS, default="wall", help="wall time, or this process's CPU time (all its threads)"
    )
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        for shards in args.shards:
            root = (args.dir or Path(tmp_dir)) / f"root_{shards}"
            started = time.perf_counter()
            build_root(root, shards, args.rows)
            built = time.perf_counter() - started
            n_files = sum(1 for _ in root.rglob("*.parquet"))
            times = measure(root, shards, args.rows, args.repeat, CLOCKS[args.clock])
            ok = sum(n for _, n in run_query(root, QUERY_BY_SOURCE)[1])
            results.append((shards, n_files, built, ok, times))

    table = Table(
        title=f"catalog over N shards ({args.rows} rows per samples file): {args.clock} seconds, best / median of "
        f"{args.repeat} runs, {os.cpu_count()} CPUs"
    )
    for col in ("shards", "Parquet files", "ok rows", "build", *STEPS):
        table.add_column(col, justify="right")
    for shards, n_files, built, ok, times in results:
        cells = [f"{min(t):.2f} / {statistics.median(t):.2f}" for t in times.values()]
        table.add_row(f"{shards:,}", f"{n_files:,}", f"{ok:,}", f"{built:.1f}", *cells)
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
