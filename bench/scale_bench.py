"""Internet scale: the shard stage planned from input files against every record listed in the driver.

    python bench/scale_bench.py [--sizes 10000 100000 1000000] [--run-sizes 10000 100000]
                                [--density-sizes 100000 1000000] [--plan-inputs 40000] [--planners old new]
                                [--per-tar 5000] [--workers N] [--dir DIR]

Data, written once under ``--dir`` (default bench/data/scale) and reused: SA-1B-style tars of ``--per-tar``
samples each (``sa_N.jpg``, one of 16 tiny 64x64 JPEGs; ``sa_N.json``, an SA-1B annotation with two masks);
a size of n samples is the first n / per-tar tars, each passed as one input. For ``density``, a Parquet of
n alt-text-like captions (``bench/density_bench.py``'s generator).

Rows, each measured in a fresh subprocess (peak RSS is that process's ``ru_maxrss``: the driver's own;
Ray workers are other processes):
  * plan (old): every record listed in the driver (``pipeline.sources.list_inputs``) and chunked into
    record-carrying shard jobs with their fingerprints, as the shard stage planned before (the baseline);
  * plan (new): ``ShardStage.plan()``, one job per input file; also over ``--plan-inputs`` input files (hard
    links to one tar in a folder: LAION-400M downloaded by img2dataset is about 40,000 tars);
  * run (old | new): the whole shard stage on a local Ray of ``--workers`` CPUs into a fresh root, through the
    same runner and shard writer; old runs the record-carrying plan. Images/s per worker is the throughput
    per core;
  * density: ``densecurate density`` streamed over ``--workers`` Ray processes (captions/s, driver and
    largest worker peak RSS).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from rich.console import Console
from rich.table import Table

from pipeline.core.runner import run_stage
from pipeline.core.stage import ShardFilesJob, Stats, Tasks, fingerprint
from pipeline.sources import list_inputs
from pipeline.sources.records import InputRecord
from pipeline.stages.shard import ShardStage, inputs_digest, write_records
from schemas.layout import shard_stem
from schemas.shard_config import ImageSettings, ShardConfig

DEFAULT_DIR = Path(__file__).resolve().parent / "data" / "scale"


def tiny_jpegs(count: int = 16) -> list[bytes]:
    """``count`` distinct 64x64 noise JPEGs (the smallest the stage keeps by default)."""
    rng = random.Random(0)
    out = []
    for _ in range(count):
        image = Image.frombytes("RGB", (64, 64), rng.randbytes(64 * 64 * 3))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=80)
        out.append(buf.getvalue())
    return out


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_tar(path: Path, first_id: int, n: int, jpegs: list[bytes]) -> None:
    """An SA-1B-style tar of ``n`` samples with ids from ``first_id``."""
    tmp = path.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tf:
        for image_id in range(first_id, first_id + n):
            annotation = {
                "image": {"image_id": image_id, "width": 64, "height": 64, "file_name": f"sa_{image_id}.jpg"},
                "annotations": [{"id": 1, "area": 10}, {"id": 2, "area": 20}],
            }
            _add(tf, f"sa_{image_id}.jpg", jpegs[image_id % len(jpegs)])
            _add(tf, f"sa_{image_id}.json", json.dumps(annotation).encode())
    tmp.rename(path)


def tars_for(folder: Path, samples: int, per_tar: int, console: Console) -> list[Path]:
    """The first ``samples / per_tar`` tars of the pool, written when missing."""
    folder.mkdir(parents=True, exist_ok=True)
    jpegs = tiny_jpegs()
    paths = []
    for index in range(max(1, samples // per_tar)):
        path = folder / f"sa_{index:06d}.tar"
        if not path.exists():
            console.print(f"writing {path}")
            write_tar(path, index * per_tar, per_tar, jpegs)
        paths.append(path)
    return paths


@dataclass(frozen=True, kw_only=True)
class RecordsJob(ShardFilesJob):
    """A shard job of the former planner: it carries its records."""

    records: tuple[InputRecord, ...]
    image: ImageSettings


def write_records_job(job: RecordsJob) -> Stats:
    extra = {"shard": shard_stem(job.index), "inputs_fingerprint": job.fingerprint, "settings": job.image.model_dump()}
    return write_records(job.records, job.files, extra, job.image)


class RecordsShardStage(ShardStage):
    """The former plan (every record listed here, chunked into shards) run by the current runner and writer."""

    def plan(self) -> list[RecordsJob]:  # type: ignore[override]
        records = list_inputs(list(self.srcs), self.config.sources)
        size, settings = self.config.shard_size, self._settings()
        jobs = []
        for index, start in enumerate(range(0, len(records), size)):
            chunk = tuple(records[start : start + size])
            jobs.append(
                RecordsJob(
                    index=index,
                    out_dir=self.catalog.shards_dir,
                    fingerprint=fingerprint(settings, inputs_digest(chunk)),
                    items=len(chunk),
                    records=chunk,
                    image=self.config.image,
                )
            )
        return jobs

    def work(self) -> Tasks:
        return Tasks(write_records_job, workers=self.config.workers)

    def summarize(self, run: Any) -> Any:
        return run


def _config(workers: int) -> ShardConfig:
    return ShardConfig(shard_size=1000, workers=workers, image=ImageSettings(resize=0))


def measure(what: str, tars: list[Path], root: Path, workers: int) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    config = _config(workers)
    stage = (RecordsShardStage if what.endswith("old") else ShardStage)(tars, root, config)
    started = time.perf_counter()
    if what.startswith("plan"):
        jobs = stage.plan()
        result = {"jobs": len(jobs)}
    else:
        run_stage(stage)
        result = {"shards": len(list((root / "shards").glob("*_stats.json")))}
    result["seconds"] = time.perf_counter() - started
    result["driver_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def run_fresh(what: str, tars: list[Path], root: Path, workers: int) -> dict[str, Any]:
    spec = json.dumps({"what": what, "tars": [str(t) for t in tars], "root": str(root), "workers": workers})
    done = subprocess.run([sys.executable, __file__, "--measure", spec], capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def shard_rows(args: argparse.Namespace, console: Console) -> Table:
    table = Table(
        "samples", "input tars", "what", "jobs / shards", "seconds", "images/s", "images/s per worker",
        "driver peak RSS",
        title=f"shard stage: planner from input files (new) vs every record in the driver (old); "
        f"{args.workers} workers, {os.cpu_count()} CPUs",
    )  # fmt: skip
    for n in sorted(set(args.sizes) | set(args.run_sizes)):
        tars = tars_for(args.dir / "tars", n, args.per_tar, console)
        whats = [f"plan {p}" for p in args.planners if n in args.sizes]
        whats += [f"run {p}" for p in args.planners if n in args.run_sizes]
        for what in whats:
            root = args.dir / "roots" / what.replace(" ", "_")
            shutil.rmtree(root, ignore_errors=True)
            console.print(f"{n:,} samples: {what}")
            r = run_fresh(what, tars, root, args.workers)
            shutil.rmtree(root, ignore_errors=True)
            speed = n / r["seconds"]
            running = what.startswith("run")
            table.add_row(
                f"{n:,}",
                str(len(tars)),
                what,
                str(r.get("jobs", r.get("shards"))),
                f"{r['seconds']:.2f}",
                f"{speed:,.0f}" if running else "-",
                f"{speed / args.workers:,.0f}" if running else "-",
                f"{r['driver_rss_mib']:.0f} MiB",
            )
    return table


def linked_inputs(folder: Path, count: int, tar: Path) -> Path:
    """A folder of ``count`` hard links to one tar: as many input files as a LAION-400M download, for planning."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        link = folder / f"{index:06d}.tar"
        if not link.exists():
            os.link(tar, link)
    return folder


def plan_inputs_rows(args: argparse.Namespace, console: Console) -> Table:
    table = Table(
        "input tars", "jobs", "seconds", "driver peak RSS",
        title="planning from input files alone (hard links to one tar, each planned from its stat)",
    )  # fmt: skip
    tar = tars_for(args.dir / "tars", args.per_tar, args.per_tar, console)[0]
    for count in args.plan_inputs:
        folder = linked_inputs(args.dir / f"linked_{count}", count, tar)
        console.print(f"{count:,} input tars: plan new")
        r = run_fresh("plan new", [folder], args.dir / "roots" / "linked", args.workers)
        table.add_row(f"{count:,}", f"{r['jobs']:,}", f"{r['seconds']:.2f}", f"{r['driver_rss_mib']:.0f} MiB")
    return table


def density_rows(args: argparse.Namespace, console: Console) -> Table:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from density_bench import make_corpus
    from density_bench import run_fresh as density_fresh

    table = Table(
        "captions", "seconds", "captions/s", "driver peak RSS", "worker peak RSS",
        title=f"densecurate density, streamed over {args.workers} Ray processes (batches of 8,192)",
    )  # fmt: skip
    for n in args.density_sizes:
        path = args.dir / f"captions_{n}.parquet"
        if not path.exists():
            console.print(f"writing {path}")
            make_corpus(path, n)
        console.print(f"{n:,} captions: density")
        r = density_fresh("ray", path, args.workers, 8192)
        worker = f"{r['worker_rss_mib']:.0f} MiB" if r["worker_rss_mib"] else "-"
        table.add_row(
            f"{n:,}", f"{r['seconds']:.1f}", f"{n / r['seconds']:,.0f}", f"{r['driver_rss_mib']:.0f} MiB", worker
        )
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000], help="planning sizes")
    p.add_argument("--run-sizes", type=int, nargs="*", default=[10_000, 100_000], help="whole-stage sizes")
    p.add_argument("--density-sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    p.add_argument("--plan-inputs", type=int, nargs="*", default=[40_000], help="input files to plan, new planner")
    p.add_argument("--planners", nargs="+", choices=["old", "new"], default=["old", "new"])
    p.add_argument("--per-tar", type=int, default=5000)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    p.add_argument("--measure", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        spec = json.loads(args.measure)
        tars = [Path(t) for t in spec["tars"]]
        print(json.dumps(measure(spec["what"], tars, Path(spec["root"]), spec["workers"])))
        return
    console = Console(width=140)
    tables = []
    if args.sizes or args.run_sizes:
        tables.append(shard_rows(args, console))
    if args.plan_inputs:
        tables.append(plan_inputs_rows(args, console))
    if args.density_sizes:
        tables.append(density_rows(args, console))
    for table in tables:
        console.print(table)


if __name__ == "__main__":
    main()
