"""The caption stage: ``ROOT/shards/NNNNN.tar`` -> ``ROOT/captions/NAME/NNNNN.parquet``.

One Ray actor per GPU (or one CPU actor) holds the model and takes whole shards. Each output is
written under a temporary name and renamed; a rerun skips finished shards; a worker that dies
mid-shard is restarted by Ray and its shard redone, so every key appears exactly once.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.catalog import refresh_catalog
from pipeline.parquet_meta import finished_output, write_atomic
from pipeline.ray_runner import ActorLauncher, init_ray, run_shard_jobs, start_model_actors
from pipeline.shard_reading import iter_shard_samples, read_shard_stats, shard_indices
from pipeline.shard_writer import prune_outputs
from schemas.caption_config import CaptionConfig
from schemas.layout import DatasetLayout
from schemas.tables import CAPTIONS_SCHEMA


@dataclass(frozen=True)
class CaptionJob:
    """One shard to caption: its tar, where the captions go, and what they must match to be reused."""

    index: int
    tar: Path
    out: Path
    expected_rows: int
    fingerprint: str


def plan_caption_jobs(root: Path, config: CaptionConfig) -> list[CaptionJob]:
    """A job per finished shard; the fingerprint covers the model, the generation settings and the shard."""
    layout = DatasetLayout(root)
    settings = config.model.model_dump_json() + config.generation.model_dump_json()
    jobs = []
    for index in shard_indices(layout):
        stats = read_shard_stats(layout, index)
        digest = hashlib.sha256((settings + stats["inputs_fingerprint"]).encode()).hexdigest()
        jobs.append(
            CaptionJob(
                index=index,
                tar=layout.shard_files(index).tar,
                out=layout.caption_file(config.name, index),
                expected_rows=stats["successes"],
                fingerprint=digest,
            )
        )
    return jobs


def finished_captions(job: CaptionJob) -> dict[str, Any] | None:
    """The stats of a complete caption file made with the same settings from the same shard, else None."""
    return finished_output(job.out, job.fingerprint, job.expected_rows)


def _row(result, config: CaptionConfig, loaded) -> dict[str, Any]:
    gen = config.generation
    checks = result.checks
    return {
        "key": result.key,
        "captioner": config.name,
        "status": result.status,
        "error": result.error,
        "caption": checks.text if checks else None,
        "raw_caption": result.raw_caption,
        "num_tokens": result.num_tokens,
        "finish_reason": result.finish_reason,
        "truncated": checks.truncated if checks else None,
        "cut_text": checks.cut_text if checks else None,
        "repetition": checks.repetition if checks else None,
        "repetitive": checks.repetitive if checks else None,
        "empty": checks.empty if checks else None,
        "seconds": result.seconds,
        "model": loaded.model_id,
        "revision": loaded.revision,
        "prompt_id": result.prompt_id,
        "prompt": result.prompt,
        "temperature": gen.temperature,
        "top_p": gen.top_p,
        "seed": gen.seed,
        "max_new_tokens": gen.max_new_tokens,
    }


def caption_stats(rows: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Counts a curator looks at first, for the summary and the file metadata."""
    ok = [r for r in rows if r["status"] == "ok"]
    errors = Counter((r["error"] or "").split(":")[0] for r in rows if r["status"] != "ok")
    return {
        "count": len(rows),
        "ok": len(ok),
        "errors_by_reason": dict(sorted(errors.items())),
        "truncated": sum(bool(r["truncated"]) for r in ok),
        "repetitive": sum(bool(r["repetitive"]) for r in ok),
        "empty": sum(bool(r["empty"]) for r in ok),
        "tokens": sum(r["num_tokens"] for r in ok),
        "seconds": seconds,
    }


class CaptionWorker:
    """Holds one model replica; captions whole shards (a Ray actor in the stage, a plain object in tests)."""

    def __init__(self, config: CaptionConfig, cpu_threads: int | None = None) -> None:
        import torch

        from captioner.generation import Captioner
        from captioner.loading import load_model

        if cpu_threads:
            torch.set_num_threads(cpu_threads)
        self.config = config
        self.loaded = load_model(config.model)
        self.captioner = Captioner(self.loaded, config.generation)

    def caption_shard(self, job: CaptionJob) -> dict[str, Any]:
        """Caption every sample of the job's shard and commit the Parquet file; returns its stats."""
        from captioner.generation import CaptionRequest

        started = time.perf_counter()
        requests = (
            CaptionRequest(key, members.get("jpg", b""), members.get("txt", b"").decode() or None)
            for key, members in iter_shard_samples(job.tar)
        )
        rows = [_row(result, self.config, self.loaded) for result in self.captioner.caption(requests)]
        rows.sort(key=lambda r: r["key"])
        stats = caption_stats(rows, time.perf_counter() - started)
        meta = {"fingerprint": job.fingerprint, "stats": stats, "settings": json.loads(self.config.model_dump_json())}
        write_atomic(job.out, rows, CAPTIONS_SCHEMA, meta)
        return stats


@dataclass
class CaptionSummary:
    """Totals over every shard of the run (reused ones included)."""

    shards: int = 0
    shards_reused: int = 0
    totals: Counter[str] = field(default_factory=Counter)
    errors_by_reason: Counter[str] = field(default_factory=Counter)
    captions_this_run: int = 0
    seconds: float = 0.0
    workers: int = 0
    device: str = "cpu"


def run_caption_stage(root: Path, config: CaptionConfig) -> CaptionSummary:
    """Caption every finished shard under ``root`` that has no valid caption file yet."""
    import ray

    root = root.resolve()
    jobs = plan_caption_jobs(root, config)
    if not jobs:
        raise FileNotFoundError(f"no finished shards under {root / 'shards'}: run `densecurate shard` first")
    from captioner.loading import check_model_available

    check_model_available(config.model)
    prune_outputs(DatasetLayout(root).captions_dir(config.name), {job.index for job in jobs})
    init_ray(config.ray_address)
    summary = CaptionSummary(shards=len(jobs))
    todo = [job for job in jobs if finished_captions(job) is None]
    actors = []
    if todo:
        actors, summary.device = start_model_actors(
            CaptionWorker,
            (config,),
            count_cap=len(todo),
            workers=config.workers,
            gpus_per_worker=config.gpus_per_worker,
            device=config.model.device,
        )
        summary.workers = len(actors)
    try:
        run = run_shard_jobs(
            jobs,
            ActorLauncher(actors, "caption_shard"),
            finished=finished_captions,
            items_in=lambda job: job.expected_rows,
            item_label="captions",
        )
    finally:
        for actor in actors:
            ray.kill(actor)
    summary.shards_reused = run.reused
    summary.captions_this_run = run.items_processed
    summary.seconds = run.seconds
    for stats in run.stats:
        summary.totals.update({k: stats[k] for k in ("count", "ok", "truncated", "repetitive", "empty", "tokens")})
        summary.errors_by_reason.update(stats["errors_by_reason"])
    refresh_catalog(DatasetLayout(root))
    return summary
