"""Shard-stage throughput on SA-1B-sized JPEGs, against a naive baseline measured in the same run.

    python bench/shard_bench.py [--folder DIR] [--count 64] [--resize 512]

Rows: the naive baseline (full decode, LANCZOS resize, JPEG encode) and our per-image path
(`pipeline.sources.imaging.process_image`: draft-mode decode, then resize and encode), each in a process
pool of 1 and 2 workers; then the whole shard stage on a local Ray (tar + Parquet + stats written)
with 1 and 2 workers. Without --folder it uses the benchmark data's images/sa1b_fastsam when present
(real SA-1B photos; see docs/BENCHMARK_DATA.md), else makes 2250x1500 JPEGs from scikit-image's photos.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bench_data import bench_data
from PIL import Image, ImageOps
from rich.console import Console
from rich.table import Table

from pipeline.sources.imaging import process_image
from schemas.shard_config import ImageSettings, ShardConfig

SA1B_SAMPLE = bench_data("images", "sa1b_fastsam")


def naive_resize(path: str, resize: int = 512) -> int:
    """The baseline: decode every pixel, LANCZOS to the short side, encode JPEG q95."""
    im = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    scale = resize / min(im.size)
    im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95)
    return len(buf.getvalue())


def ours(path: str, resize: int = 512) -> int:
    return len(process_image(Path(path).read_bytes(), ImageSettings(resize=resize)).data)


def make_inputs(folder: Path | None, count: int, out: Path) -> tuple[list[Path], str]:
    """``count`` JPEG files in ``out`` (copies of the sources, cycled)."""
    out.mkdir(parents=True, exist_ok=True)
    if folder is None and SA1B_SAMPLE.is_dir():
        folder = SA1B_SAMPLE
    if folder is not None:
        sources = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
        origin = str(folder)
    else:
        from skimage import data

        sources = []
        for name in ("astronaut", "chelsea", "coffee", "rocket"):
            p = out / f"src_{name}.jpg"
            Image.fromarray(getattr(data, name)()).resize((2250, 1500), Image.Resampling.BICUBIC).save(p, quality=90)
            sources.append(p)
        origin = "scikit-image photos upscaled to 2250x1500"
    files = []
    for i in range(count):
        dst = out / f"img_{i:05d}.jpg"
        shutil.copyfile(sources[i % len(sources)], dst)
        files.append(dst)
    for p in out.glob("src_*.jpg"):
        p.unlink()
    return files, origin


def time_pool(fn, files: list[Path], workers: int, resize: int) -> float:
    paths = [str(p) for p in files]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(fn, paths[:workers], [resize] * workers))  # warm the workers
        started = time.perf_counter()
        list(pool.map(fn, paths, [resize] * len(paths), chunksize=1))
        return time.perf_counter() - started


def time_stage(folder: Path, workers: int, resize: int, tmp: Path) -> float:
    """Seconds of the whole stage (Ray already started; its workers warmed by a first, untimed run)."""
    from pipeline.stages.shard import run_shard_stage

    config = ShardConfig.model_validate({"image": {"resize": resize}, "shard_size": 8, "workers": workers})
    run_shard_stage([folder], tmp / f"warmup_w{workers}", config)
    return run_shard_stage([folder], tmp / f"root_w{workers}", config).seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="folder of large JPEGs (default: see module doc)")
    parser.add_argument("--count", type=int, default=64, help="images per measurement")
    parser.add_argument("--resize", type=int, default=512)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        files, origin = make_inputs(args.folder, args.count, tmp / "images")
        with Image.open(files[0]) as first:
            size = f"{first.width}x{first.height}"
        rows = []
        for workers in (1, 2):
            base = time_pool(naive_resize, files, workers, args.resize)
            mine = time_pool(ours, files, workers, args.resize)
            rows.append(("naive baseline (process pool)", workers, base, base))
            rows.append(("densecurate process_image (process pool)", workers, mine, base))
        from pipeline.core.ray_cluster import init_ray

        init_ray(num_cpus=2)
        for workers in (1, 2):
            stage = time_stage(tmp / "images", workers, args.resize, tmp)
            base = next(r[2] for r in rows if r[0].startswith("naive") and r[1] == workers)
            rows.append(("densecurate shard stage (Ray, tar+parquet)", workers, stage, base))

    table = Table(title=f"{len(files)} JPEGs ({size}, {origin}) -> short side {args.resize}, {os.cpu_count()} CPUs")
    for col in ("method", "workers", "seconds", "images/s", "images/s per core", "vs naive"):
        table.add_column(col)
    for method, workers, seconds, base in rows:
        rate = len(files) / seconds
        table.add_row(
            method, str(workers), f"{seconds:.2f}", f"{rate:.1f}", f"{rate / workers:.1f}", f"{base / seconds:.2f}x"
        )
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
