"""`densecurate compare` at scale: seconds and peak memory against a pyarrow + Python baseline, same run.

    python bench/compare_bench.py [--sizes 10000,100000,1000000] [--shard-size 10000]

For each size it writes a synthetic dataset root with three scored fields on the same keys: `alt_text`
(4 nouns per caption) and two captioners (10 and 14 nouns per caption), nouns drawn from a Zipf(1.1)
vocabulary of 50,000 words so that the valid-noun rule has a long tail to cut; caption rows carry
seconds and GPUs. Then, each in a fresh process (peak RSS is per process):

  * baseline: read the density and caption Parquet with pyarrow and compute the same figures in Python
    (the hand computation the tests use: key intersection, noun counts per field, means);
  * densecurate: `pipeline.report.compare.compare_fields` (DuckDB over the catalog views).

Both must agree on every field's nouns and valid nouns per image (checked). Columns: seconds, peak RSS,
and the ratio of the baseline's seconds to densecurate's.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from schemas.tables import CAPTIONS_SCHEMA, DENSITY_SCHEMA

FIELDS = {"alt_text": 4, "model-a": 10, "model-b": 14}  # nouns per caption
VOCABULARY = 50_000
MIN_COUNT = 10


def _write_root(root: Path, size: int, shard_size: int) -> None:
    rng = np.random.default_rng(0)
    words = np.array([f"noun{i}" for i in range(VOCABULARY)])
    keys = [f"bench-{i:09d}" for i in range(size)]
    for field, per_caption in FIELDS.items():
        counts: Counter[str] = Counter()
        for shard, start in enumerate(range(0, size, shard_size)):
            chunk = keys[start : start + shard_size]
            drawn = (rng.zipf(1.1, (len(chunk), per_caption)) - 1) % VOCABULARY
            nouns = [list(words[row]) for row in drawn]
            for row in nouns:
                counts.update(row)
            density = {
                "key": chunk,
                "field": [field] * len(chunk),
                "missing": [False] * len(chunk),
                "n_tokens": [3 * per_caption] * len(chunk),
                "n_nouns": [per_caption] * len(chunk),
                "nouns": nouns,
            }
            out = root / "density" / field / f"{shard:05d}.parquet"
            out.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table(density, schema=DENSITY_SCHEMA), out)
            if field != "alt_text":
                _write_captions(root, field, shard, chunk, rng)
        vocab = pa.table(
            {
                "noun": list(counts),
                "count": list(counts.values()),
                "valid": [c > MIN_COUNT for c in counts.values()],
                "min_count": [MIN_COUNT] * len(counts),
                "field": [field] * len(counts),
            }
        )
        (root / "vocab").mkdir(exist_ok=True)
        pq.write_table(vocab, root / "vocab" / f"{field}.parquet")


def _write_captions(root: Path, field: str, shard: int, keys: list[str], rng: np.random.Generator) -> None:
    n = len(keys)
    columns = {name: [None] * n for name in CAPTIONS_SCHEMA.names}
    flags = rng.random((3, n)) < 0.05
    columns |= {
        "key": keys,
        "captioner": [field] * n,
        "status": ["ok"] * n,
        "num_tokens": rng.integers(80, 250, n).tolist(),
        "truncated": flags[0].tolist(),
        "repetitive": flags[1].tolist(),
        "empty": flags[2].tolist(),
        "seconds": rng.uniform(0.01, 0.05, n).tolist(),
        "device": ["NVIDIA H100 80GB HBM3"] * n,
        "gpus": [1.0] * n,
    }
    out = root / "captions" / field / f"{shard:05d}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=CAPTIONS_SCHEMA), out)


def _baseline(root: Path) -> dict[str, tuple[float, float]]:
    """Nouns and valid nouns per image on the common keys, with pyarrow and Python."""
    density = {
        f: {r["key"]: r["nouns"] for p in sorted((root / "density" / f).glob("*.parquet")) for r in _rows(p)}
        for f in FIELDS
    }
    common = set.intersection(*(set(rows) for rows in density.values()))
    figures = {}
    for f, rows in density.items():
        lists = [rows[k] for k in common]
        counts = Counter(n for nouns in lists for n in nouns)
        valid = sum(counts[n] > MIN_COUNT for nouns in lists for n in nouns)
        figures[f] = (sum(map(len, lists)) / len(lists), valid / len(lists))
        if f != "alt_text":
            seconds = [
                r["seconds"] * r["gpus"]
                for p in (root / "captions" / f).glob("*.parquet")
                for r in _rows(p)
                if r["key"] in common
            ]
            figures[f] += (sum(seconds) / len(seconds),)
    return figures


def _rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def _densecurate(root: Path) -> dict[str, tuple[float, float]]:
    from pipeline.report.compare import compare_fields

    return {c.field: (c.nouns_per_image, c.valid_nouns_per_image) for c in compare_fields(root, list(FIELDS))}


def _measure(method: str, root: Path) -> None:
    """Run one method in this process and print its seconds, peak RSS and figures as JSON."""
    started = time.perf_counter()
    figures = _baseline(root) if method == "baseline" else _densecurate(root)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_mb": peak, "figures": figures}))


def _run(method: str, root: Path) -> dict:
    cmd = [sys.executable, __file__, "--measure", method, "--root", str(root)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--measure", choices=["baseline", "densecurate"], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        _measure(args.measure, args.root)
        return
    table = Table(title="densecurate compare: 3 fields on identical keys (seconds, peak RSS)")
    for column in ("keys", "method", "seconds", "peak RSS MB", "vs baseline"):
        table.add_column(column, justify="right")
    for size in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "root"
            _write_root(root, size, args.shard_size)
            base, ours = _run("baseline", root), _run("densecurate", root)
            for f, (nouns, valid, *_) in base["figures"].items():
                got = ours["figures"][f]
                assert abs(got[0] - nouns) < 1e-9 and abs(got[1] - valid) < 1e-9, (f, got, nouns, valid)
            table.add_row(
                f"{size:,}", "pyarrow + Python (baseline)", f"{base['seconds']:.2f}", f"{base['peak_mb']:.0f}", "1.00x"
            )
            ratio = base["seconds"] / ours["seconds"]
            table.add_row(
                "", "densecurate compare", f"{ours['seconds']:.2f}", f"{ours['peak_mb']:.0f}", f"{ratio:.2f}x"
            )
    Console(width=130).print(table)


if __name__ == "__main__":
    main()
