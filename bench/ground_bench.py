"""The ground stage's work per worker: the embedding pass in images/s, grounding in nouns/s, and how the
near-duplicate search scales with the number of embeddings.

    python bench/ground_bench.py [--arch tiny|ViT-L-14|...] [--images 256] [--dup-sizes 1000 10000 100000]

Inputs: real photos (the benchmark data's images/openimages_ccby_cc3m_test and images/sa1b_fastsam, see
docs/BENCHMARK_DATA.md; the bundled sample photos when those are missing), cycled to --images files and
sharded at 512 px by the shard stage, each with a real dense caption as its alt text (the IIW/DOCCI captions
of dense_captions/iiw, cycled; the pairing is arbitrary: the figures are throughput, not quality). The
shard and score stages run first (not timed); then the workers of the ground stage run in this process.

Model: --arch tiny is `densecurate models make-tiny`'s random-weight CLIP (the CPU regression figure); any
other open_clip architecture (ViT-L-14) is built with random weights (nothing is downloaded) on the GPU
when there is one.

Rows, each with its baseline measured in the same run:
  * embedding pass: `EmbedWorker.embed_shard` (batched, threaded JPEG decoding at reduced size) against
    "one at a time": full-size decode, preprocess and encode of one image per forward pass;
  * grounding: `GroundWorker` (calibration of the field's vocabulary once, then per shard sentence scores
    and per-noun dot products) against "prompts per caption": each caption's nouns' prompts encoded anew;
  * near-duplicate search: `duplicate_clusters` on n random unit vectors (d = 512, threshold 0.95), exact
    (IndexFlatIP) and IVF at the largest n; the exact search at n is the baseline of the IVF row.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_data import bench_data, photos
from rich.console import Console
from rich.table import Table

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

CAPTION_FILES = sorted(bench_data("dense_captions", "iiw").glob("*.jsonl"))
DUP_DIM = 512
DUP_THRESHOLD = 0.95


def dense_captions() -> list[str]:
    captions = []
    for path in CAPTION_FILES:
        for line in path.read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            captions += [row[f] for f in ("IIW", "DOCCI") if isinstance(row.get(f), str) and row[f].strip()]
    return captions or ["A red car is parked on a street next to a tree. A man walks a dog on the pavement."]


def build_root(work: Path, count: int) -> Path:
    """A scored dataset root of ``count`` photos with dense alt texts (shard and score stages)."""
    from pipeline.stages.score import run_score_stage
    from pipeline.stages.shard import run_shard_stage
    from schemas.score_config import ScoreConfig
    from schemas.shard_config import ShardConfig

    folder = work / "photos"
    folder.mkdir(parents=True)
    images, captions = photos(), dense_captions()
    for i in range(count):
        shutil.copy(images[i % len(images)], folder / f"{i:06d}.jpg")
        (folder / f"{i:06d}.txt").write_text(captions[i % len(captions)])
    root = work / "root"
    run_shard_stage([folder], root, ShardConfig(shard_size=max(1, count // 4)))
    run_score_stage(root, ScoreConfig())
    return root


def clip_model_name(arch: str, work: Path) -> str:
    if arch != "tiny":
        return arch
    from trainer.tiny import make_tiny_clip

    return "local-dir:" + str(make_tiny_clip(work / "tiny"))


def time_embedding(root: Path, config, *, baseline_limit: int) -> tuple[float, float, int, str]:
    """Images/s of the embed worker over every shard, and of the one-at-a-time baseline on the first images."""
    import io

    import torch
    from PIL import Image

    from pipeline.stages.embed import EmbedStage, EmbedWorker
    from pipeline.store.shard_reading import iter_shard_samples

    stage = EmbedStage(root, config)
    jobs = stage.plan()
    worker = EmbedWorker(config, stage.model_name, cpu_threads=os.cpu_count())
    worker.embed_shard(jobs[0])  # warm-up (and CUDA kernels)
    started = time.perf_counter()
    for job in jobs:
        worker.embed_shard(job)
    images = sum(job.items for job in jobs)
    ours = images / (time.perf_counter() - started)
    jpegs = [m["jpg"] for job in jobs for _, m in iter_shard_samples(job.shard_tar)][:baseline_limit]
    clip = worker.clip
    started = time.perf_counter()
    for jpeg in jpegs:
        pixels = clip.preprocess(Image.open(io.BytesIO(jpeg)).convert("RGB")).unsqueeze(0)
        clip.encode_pixels(pixels)
    if clip.device.type == "cuda":
        torch.cuda.synchronize()
    baseline = len(jpegs) / (time.perf_counter() - started)
    return ours, baseline, images, str(clip.device)


def time_grounding(root: Path, config, *, baseline_limit: int) -> tuple[float, float, float, int]:
    """Nouns/s of the ground worker (calibration included) and of the prompts-per-caption baseline."""
    import pyarrow.parquet as pq

    from pipeline.grounding.scores import ensemble, noun_prompts
    from pipeline.stages.ground import GroundingStage, GroundWorker

    stage = GroundingStage(root, config)
    jobs = stage.plan()
    worker = GroundWorker(config, stage.model_name, cpu_threads=os.cpu_count())
    started = time.perf_counter()
    worker.calibrate(stage.calibrations)
    calibration_s = time.perf_counter() - started
    nouns = 0
    started = time.perf_counter()
    for job in jobs:
        nouns += worker.ground_shard(job)["total_nouns"]
    ours = nouns / (time.perf_counter() - started + calibration_s)
    rows = [r for job in jobs for r in pq.read_table(job.density).to_pylist() if r["nouns"]][:baseline_limit]
    templates = config.grounding.noun_prompts
    counted = 0
    started = time.perf_counter()
    for row in rows:
        texts = worker.clip.encode_texts(noun_prompts(row["nouns"], templates), config.batch_size).numpy()
        ensemble(texts, len(templates))
        counted += len(row["nouns"])
    baseline = counted / (time.perf_counter() - started)
    return ours, baseline, calibration_s, nouns


def time_duplicate_search(n: int, *, exact_limit: int, seed: int = 0) -> tuple[float, int]:
    """Seconds for ``duplicate_clusters`` on n random unit vectors, and the rows it returned (expected: 0)."""
    from pipeline.grounding.near_duplicates import DuplicateSearch, duplicate_clusters

    rng = np.random.default_rng(seed)
    embeddings = rng.standard_normal((n, DUP_DIM), dtype=np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    keys = [f"{i:09d}" for i in range(n)]
    search = DuplicateSearch(DUP_THRESHOLD, exact_limit=exact_limit, seed=seed)
    started = time.perf_counter()
    rows = duplicate_clusters(keys, embeddings, [None] * n, search)
    return time.perf_counter() - started, len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="tiny", help="tiny, or an open_clip architecture (random weights)")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--baseline-limit", type=int, default=64, help="images / captions the baselines take")
    parser.add_argument("--dup-sizes", type=int, nargs="*", default=[1_000, 10_000, 100_000])
    args = parser.parse_args()

    from pipeline.core.ray_cluster import init_ray
    from schemas.ground_config import GroundConfig

    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        init_ray()
        root = build_root(work, args.images)
        config = GroundConfig.model_validate(
            {"clip": {"model": clip_model_name(args.arch, work)}, "batch_size": args.batch_size}
        )
        embed, embed_base, images, device = time_embedding(root, config, baseline_limit=args.baseline_limit)
        ground, ground_base, calibration_s, nouns = time_grounding(root, config, baseline_limit=args.baseline_limit)
    table = Table("pass", "method", "rate", "vs baseline", title=f"ground stage, {args.arch} on {device}")
    table.add_row("embedding", "one at a time (baseline)", f"{embed_base:,.1f} images/s", "1.00x")
    table.add_row(
        "embedding", f"EmbedWorker, batch {args.batch_size}", f"{embed:,.1f} images/s", f"{embed / embed_base:.2f}x"
    )
    table.add_row("grounding", "prompts per caption (baseline)", f"{ground_base:,.0f} nouns/s", "1.00x")
    table.add_row(
        "grounding",
        f"GroundWorker (calibration {calibration_s:.1f} s included)",
        f"{ground:,.0f} nouns/s",
        f"{ground / ground_base:.2f}x",
    )
    console.print(table)
    console.print(f"{images} images, {nouns} nouns")
    dup = Table("embeddings", "index", "seconds", "rows", title=f"near-duplicate search, d = {DUP_DIM}")
    for n in args.dup_sizes:
        seconds, rows = time_duplicate_search(n, exact_limit=n)
        dup.add_row(f"{n:,}", "exact (IndexFlatIP)", f"{seconds:.2f}", str(rows))
    if args.dup_sizes:
        n = max(args.dup_sizes)
        seconds, rows = time_duplicate_search(n, exact_limit=n - 1)
        dup.add_row(f"{n:,}", "IVF (nprobe 16)", f"{seconds:.2f}", str(rows))
    console.print(dup)


if __name__ == "__main__":
    main()
