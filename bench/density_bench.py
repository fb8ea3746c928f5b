"""`densecurate density FILE` at scale: the streamed, multi-process reader against the former one-shot reader.

    python bench/density_bench.py [--sizes 100000 1000000] [--workers N] [--batch-rows 8192] [--dir DIR]

Data: synthetic Parquet caption files (column ``text``) of each size, short alt-text-like captions generated
from word lists (2 to 12 words, 0 to 5 nouns), with repeats as in real alt text: a quarter of the rows come
from a few thousand frequent captions ("stock photo", product names, ...) drawn Zipf-like, about 2% are
missing or blank. Files are written once under ``--dir`` (default: bench/data/density) and reused.

Methods, each in a fresh subprocess (so peak RSS is its own):
  * "notebook": what a notebook does, a whole Python process timed from outside: the column read with pandas,
    ``spacy.load`` without parser and NER, one ``nlp.pipe`` over every caption, NOUN/PROPN lemmas counted.
  * "densecurate density": the whole command, timed from outside the same way (start-up included).
  * baseline "one-shot": the former ``read_text_column`` (every value of the column in one Python list via
    DuckDB ``fetchall``) and one ``NounExtractor`` over all of it, in one process.
  * "streamed, 1 process": ``pipeline.stages.density_file.score_file`` with ``--workers 1`` (batches, in this process).
  * "streamed, N processes": the same on a local Ray, one spaCy actor per core (``--workers``, default every CPU).
Columns: captions/s (rows over the whole call's wall time: model loading and, for Ray, its start included),
the driver's peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and, for Ray, the largest peak RSS of
one worker (sampled every 0.2 s with psutil). "same row" says whether the Table-1 row equals the baseline's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from bench_data import bench_data
from rich.console import Console
from rich.table import Table

from pipeline.density.nouns import NounExtractor
from pipeline.density.table1 import Table1Row, table1_from_nouns
from pipeline.stages.density_file import DensityOptions, score_file
from schemas.score_config import NounSettings

BASELINE = "one-shot reader + 1 NounExtractor (baseline)"
NOTEBOOK = "notebook: tagger-only nlp.pipe, whole process"
COMMAND = "densecurate density, whole command"
# A notebook's noun count, run as its own process: ``python -c NOTEBOOK_SCRIPT FILE MODEL``.
NOTEBOOK_SCRIPT = """
import sys, collections, pandas, spacy
texts = [t for t in pandas.read_parquet(sys.argv[1], columns=["text"])["text"] if isinstance(t, str) and t.strip()]
nlp = spacy.load(sys.argv[2], disable=["parser", "ner"])
nouns = collections.Counter(
    t.lemma_.lower() for doc in nlp.pipe(texts, batch_size=256) for t in doc if t.pos_ in ("NOUN", "PROPN")
)
print(sum(nouns.values()), len(nouns))
"""
STREAMED_1 = "streamed, 1 process"
STREAMED_N = "streamed, {n} processes (Ray)"
ADJECTIVES = [
    "red",
    "blue",
    "green",
    "white",
    "black",
    "yellow",
    "old",
    "new",
    "small",
    "large",
    "wooden",
    "vintage",
    "modern",
    "cute",
    "happy",
    "bright",
]
NOUNS = [
    "dog",
    "cat",
    "woman",
    "man",
    "child",
    "car",
    "house",
    "tree",
    "bird",
    "boat",
    "horse",
    "bicycle",
    "dress",
    "shirt",
    "shoe",
    "table",
    "chair",
    "lamp",
    "flower",
    "garden",
    "beach",
    "street",
    "park",
    "kitchen",
    "forest",
    "mountain",
    "river",
    "city",
    "bridge",
    "window",
    "door",
    "phone",
    "laptop",
    "cake",
    "ring",
    "necklace",
    "bag",
    "hat",
    "jacket",
    "sofa",
    "bed",
    "wall",
    "logo",
    "poster",
    "painting",
    "vase",
    "cup",
    "bottle",
    "guitar",
    "ball",
]
VERBS = ["sitting", "standing", "running", "lying", "walking", "playing", "parked", "hanging"]
STOCK = [
    "Stock photo",
    "image",
    "Free shipping on orders over $50",
    "Click to enlarge",
    "Product image",
    "Photo by",
    "Untitled",
    "thumbnail",
]


def caption(rng: random.Random) -> str:
    """One alt-text-like caption: a product-ish phrase, a scene, or a fragment."""
    kind = rng.random()
    a, n, m = rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(NOUNS)
    if kind < 0.35:
        return f"{a.title()} {n} {m} {rng.randint(1, 999)}"
    if kind < 0.75:
        return f"a {a} {n} {rng.choice(VERBS)} near the {m}"
    return f"{n.title()} and {m} on a {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} in the {rng.choice(NOUNS)}"


def make_corpus(path: Path, n: int, seed: int = 0) -> None:
    """Write ``n`` captions to ``path`` (row groups of 100k)."""
    rng = random.Random(seed)
    frequent = STOCK + [caption(rng) for _ in range(3000)]
    weights = [1 / (rank + 1) for rank in range(len(frequent))]
    texts: list[str | None] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.02:
            texts.append(rng.choice([None, ""]))
        elif r < 0.27:
            texts.append(rng.choices(frequent, weights)[0])
        else:
            texts.append(caption(rng))
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.table({"text": texts, "id": range(n)}), tmp, row_group_size=100_000)
    tmp.rename(path)


def read_text_column(path: Path, column: str) -> list[str | None]:
    """The former reader: every value of the column (as text) in one list."""
    with duckdb.connect() as con:
        return [v for (v,) in con.execute(f'SELECT "{column}"::VARCHAR FROM read_parquet(?)', [str(path)]).fetchall()]


def one_shot(path: Path) -> Table1Row:
    """The former ``density``: one list, one NounExtractor over it."""
    texts = read_text_column(path, "text")
    found = NounExtractor(NounSettings()).extract(texts)
    missing = sum(1 for t in texts if not (t and t.strip()))
    return table1_from_nouns("text", (f.nouns for f in found), min_count=10, missing=missing)


class WorkerPeak:
    """Largest RSS of one Ray worker process among this process's descendants, sampled in a thread."""

    def __init__(self, every_s: float = 0.2) -> None:
        self.peak = 0
        self.every_s = every_s
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.done.wait(self.every_s):
            for proc in me.children(recursive=True):
                try:
                    if "DensityWorker" in " ".join(proc.cmdline()) or proc.name().startswith("ray::"):
                        self.peak = max(self.peak, proc.memory_info().rss)
                except psutil.Error:
                    continue

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        return self.peak


def measure(method: str, path: Path, workers: int, batch_rows: int) -> dict[str, Any]:
    """Run one method here (a fresh subprocess) and return its numbers."""
    watcher = WorkerPeak() if method == "ray" else None
    started = time.perf_counter()
    if method == "baseline":
        row = one_shot(path)
    else:
        row = score_file(
            path, DensityOptions(column="text", workers=1 if method == "one" else workers, batch_rows=batch_rows)
        )
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "row": row.as_json(),
        "driver_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_rss_mib": watcher.stop() / 2**20 if watcher else None,
    }


def run_whole(method: str, path: Path) -> dict[str, Any]:
    """The notebook's script or the densecurate command as one process, its wall time measured from outside."""
    if method == "notebook":
        argv = [sys.executable, "-c", NOTEBOOK_SCRIPT, str(path), NounSettings().spacy_model]
    else:
        argv = [sys.executable, "-m", "densecurate", "density", str(path), "--column", "text", "--format", "json"]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{method} on {path} failed:\n{done.stderr[-2000:]}")
    return {"seconds": seconds, "row": None, "driver_rss_mib": None, "worker_rss_mib": None}


def run_fresh(method: str, path: Path, workers: int, batch_rows: int) -> dict[str, Any]:
    if method in ("notebook", "command"):
        return run_whole(method, path)
    argv = [sys.executable, __file__, "--measure", method, str(path), "--workers", str(workers)]
    done = subprocess.run([*argv, "--batch-rows", str(batch_rows)], capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{method} on {path} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument(
        "--whole",
        action="store_true",
        help="compare whole processes instead: a notebook's tagger-only nlp.pipe against `densecurate density`",
    )
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch-rows", type=int, default=8192)
    p.add_argument("--dir", type=Path, default=bench_data("density"))
    p.add_argument("--measure", nargs=2, metavar=("METHOD", "FILE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]), args.workers, args.batch_rows)))
        return
    console = Console(width=130)
    table = Table(
        "captions", "method", "seconds", "captions/s", "driver peak RSS", "worker peak RSS", "same row", "vs first",
        title=f"densecurate density: streamed vs one-shot ({os.cpu_count()} CPUs, batch {args.batch_rows:,})",
    )  # fmt: skip
    args.dir.mkdir(parents=True, exist_ok=True)
    for n in args.sizes:
        path = args.dir / f"captions_{n}.parquet"
        if not path.exists():
            console.print(f"writing {path}")
            make_corpus(path, n)
        results = {}
        methods = (
            (("notebook", NOTEBOOK), ("command", COMMAND))
            if args.whole
            else (("baseline", BASELINE), ("one", STREAMED_1), ("ray", STREAMED_N))
        )
        first = methods[0][0]
        for method, label in methods:
            console.print(f"{n:,} captions: {label.format(n=args.workers)}")
            results[method] = run_fresh(method, path, args.workers, args.batch_rows)
            r = results[method]
            worker = f"{r['worker_rss_mib']:.0f} MiB" if r["worker_rss_mib"] else "-"
            driver = f"{r['driver_rss_mib']:.0f} MiB" if r["driver_rss_mib"] else "-"
            same = "-" if r["row"] is None else "yes" if r["row"] == results[first]["row"] else "NO"
            speedup = f"{results[first]['seconds'] / r['seconds']:.2f}x"
            table.add_row(
                f"{n:,}", label.format(n=args.workers), f"{r['seconds']:.1f}", f"{n / r['seconds']:,.0f}", driver,
                worker, same, speedup,
            )  # fmt: skip
        if results[first]["row"] is not None:
            console.print(json.dumps({"captions": n, **results[first]["row"]}))
    console.print(table)


if __name__ == "__main__":
    main()
