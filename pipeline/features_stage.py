"""The features stage: curated shards -> ``FEATS/NNNNN.tar`` of VAE posteriors and T5 states.

Each sample is ``KEY.feat.safetensors`` (``vae``: 8 x h x w mean+std, ``t5``: tokens x dim, fp16),
``KEY.txt`` and ``KEY.json``; ``FEATS/null_caption.safetensors`` holds the empty caption's T5 states
for caption dropout. One Ray actor per GPU (one CPU actor without GPUs) holds the encoders.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.ray_runner import ActorLauncher, StageRun, init_ray, run_shard_jobs, start_model_actors
from pipeline.shard_reading import iter_shard_samples
from pipeline.shard_writer import ShardWriter, finished_stats, prune_outputs, read_stats, temp_path
from schemas.features_config import FeaturesConfig
from schemas.layout import shard_files_in
from schemas.tables import FEATURES_SCHEMA
from trainer.features import NULL_CAPTION_FILE


@dataclass(frozen=True)
class FeaturesJob:
    index: int
    source_dir: Path
    out_dir: Path
    expected: int
    fingerprint: str


def plan_features_jobs(source_dir: Path, out_dir: Path, config: FeaturesConfig) -> list[FeaturesJob]:
    """A job per finished shard of ``source_dir`` (curated shards, or the dataset's shards)."""
    settings = config.model_dump_json(include={"vae", "text_encoder", "resolution", "max_tokens"})
    jobs = []
    for stats_file in sorted(source_dir.glob("*_stats.json")):
        index = int(stats_file.name.removesuffix("_stats.json"))
        stats = read_stats(shard_files_in(source_dir, index))
        if stats is None:
            continue
        digest = hashlib.sha256((settings + stats["inputs_fingerprint"]).encode()).hexdigest()
        jobs.append(FeaturesJob(index, source_dir, out_dir, stats["successes"], digest))
    return jobs


class FeaturesWorker:
    """Holds the encoders; encodes whole shards (a Ray actor in the stage)."""

    def __init__(self, config: FeaturesConfig, cpu_threads: int | None = None) -> None:
        import torch

        from trainer.features import FeatureEncoder

        if cpu_threads:
            torch.set_num_threads(cpu_threads)
        self.config = config
        self.encoder = FeatureEncoder(
            config.vae,
            config.text_encoder,
            resolution=config.resolution,
            max_tokens=config.max_tokens,
            device=config.device,
        )

    def write_null_caption(self, out_dir: Path) -> None:
        """The empty caption's T5 states, for caption dropout in training."""
        from safetensors.torch import save_file

        (null,) = self.encoder.encode_texts([""])
        target = out_dir / NULL_CAPTION_FILE
        tmp = temp_path(target)
        save_file({"t5": null.contiguous()}, str(tmp))
        os.replace(tmp, target)

    def encode_shard(self, job: FeaturesJob) -> dict[str, Any]:
        """Encode every sample of the job's shard and commit the feature shard; returns its stats."""
        samples = list(iter_shard_samples(shard_files_in(job.source_dir, job.index).tar))
        writer = ShardWriter(shard_files_in(job.out_dir, job.index), schema=FEATURES_SCHEMA)
        size = self.config.batch_size
        try:
            for start in range(0, len(samples), size):
                batch = samples[start : start + size]
                captions = [m.get("txt", b"").decode() for _, m in batch]
                features = self.encoder.encode([m["jpg"] for _, m in batch], captions)
                for (key, members), caption, feats in zip(batch, captions, features, strict=True):
                    meta = {**json.loads(members.get("json", b"{}")), "features": self._describe(feats)}
                    files = {"feat.safetensors": feats.to_bytes(), "txt": caption, "json": json.dumps(meta)}
                    row = {"caption": caption, "n_tokens": feats.t5.shape[0]}
                    writer.add_sample(key, files, row)
            return writer.commit({"source_shard": job.index, "inputs_fingerprint": job.fingerprint})
        except BaseException:
            writer.abort()
            raise

    def _describe(self, feats) -> dict[str, Any]:
        c = self.config
        return {
            "vae": c.vae,
            "text_encoder": c.text_encoder,
            "resolution": c.resolution,
            "vae_shape": list(feats.vae.shape),
            "t5_shape": list(feats.t5.shape),
        }


def run_features_stage(source_dir: Path, out_dir: Path, config: FeaturesConfig) -> StageRun:
    """Encode every finished shard of ``source_dir`` that ``out_dir`` does not hold yet."""
    import ray

    source_dir, out_dir = source_dir.resolve(), out_dir.resolve()
    jobs = plan_features_jobs(source_dir, out_dir, config)
    if not jobs:
        raise FileNotFoundError(f"no finished shards in {source_dir}: run `densecurate curate` first")
    init_ray(config.ray_address)
    out_dir.mkdir(parents=True, exist_ok=True)
    prune_outputs(out_dir, {job.index for job in jobs})
    todo = [j for j in jobs if finished_stats(shard_files_in(out_dir, j.index), j.fingerprint) is None]
    actors, _ = start_model_actors(
        FeaturesWorker,
        (config,),
        count_cap=len(todo),
        workers=config.workers,
        gpus_per_worker=config.gpus_per_worker,
        device=config.device,
    )
    try:
        ray.get(actors[0].write_null_caption.remote(out_dir))
        return run_shard_jobs(
            jobs,
            ActorLauncher(actors, "encode_shard"),
            finished=lambda j: finished_stats(shard_files_in(j.out_dir, j.index), j.fingerprint),
            items_in=lambda j: j.expected,
            label="features",
            item_label="samples",
        )
    finally:
        for actor in actors:
            ray.kill(actor)
