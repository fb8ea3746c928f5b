"""The features stage: curated shards -> ``FEATS/NNNNN.tar`` of VAE posteriors and T5 states.

Each sample is ``KEY.feat.safetensors`` (``vae``: 8 x h x w mean+std, ``t5``: tokens x dim, fp16),
``KEY.txt`` and ``KEY.json``; ``FEATS/null_caption.safetensors`` holds the empty caption's T5 states
for caption dropout. Each shard's stats and each sample's JSON record the settings that made it
(``trainer.feature_settings``: VAE, text encoder, resolution, T5 max length), which training checks. A
sample without caption text is encoded with the empty caption and counted as ``missing_captions``. One
Ray actor per GPU (one CPU actor without GPUs) holds the encoders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.progress import report_items
from pipeline.core.runner import run_stage
from pipeline.core.stage import Actors, ShardFilesJob, Stage, StageRun, StageSummary, fingerprint
from pipeline.core.workers import ModelWorker
from pipeline.store.guards import require_complete
from pipeline.store.shard_reading import stats_of
from pipeline.store.shard_writer import ShardWriter
from pipeline.store.verify import checked_samples
from schemas.atomic import atomic_output
from schemas.errors import MissingInputError
from schemas.features_config import FeaturesConfig
from schemas.layout import shard_files_in
from schemas.tables import FEATURES_SCHEMA
from trainer.feature_settings import SETTINGS_KEY, FeatureSettings
from trainer.features import NULL_CAPTION_FILE, Features


@dataclass(frozen=True, kw_only=True)
class FeaturesJob(ShardFilesJob):
    """One shard of ``source_dir`` to encode into a feature shard of the same index."""

    source_dir: Path


class FeaturesWorker(ModelWorker):
    """Holds the encoders; encodes whole shards (a Ray actor in the stage)."""

    def __init__(self, config: FeaturesConfig, cpu_threads: int | None = None) -> None:
        from trainer.features import FeatureEncoder

        super().__init__(cpu_threads)
        self.config = config
        self.settings = FeatureSettings.of(config.vae, config.text_encoder, config.resolution, config.max_tokens)
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
        with atomic_output(out_dir / NULL_CAPTION_FILE) as tmp:
            save_file({"t5": null.contiguous()}, str(tmp))

    def encode_shard(self, job: FeaturesJob) -> dict[str, Any]:
        """Encode every sample of the job's shard and commit the feature shard; returns its stats."""
        samples = list(checked_samples(shard_files_in(job.source_dir, job.index).tar))
        extra = {
            "source_shard": job.index,
            "inputs_fingerprint": job.fingerprint,
            SETTINGS_KEY: self.settings.record(),
            "missing_captions": sum(not caption_of(members) for _, members in samples),
        }
        size = self.config.batch_size
        with ShardWriter(job.files, extra, schema=FEATURES_SCHEMA) as writer:
            for start in range(0, len(samples), size):
                batch = samples[start : start + size]
                captions = [caption_of(m) for _, m in batch]
                features = self.encoder.encode([m["jpg"] for _, m in batch], captions)
                self._encode_further_captions(batch, features)
                report_items(len(batch))
                for (key, members), caption, feats in zip(batch, captions, features, strict=True):
                    meta = {**json.loads(members.get("json", b"{}")), SETTINGS_KEY: self._describe(feats)}
                    files = {"feat.safetensors": feats.to_bytes(), "txt": caption, "json": json.dumps(meta)}
                    row = {"caption": caption, "n_tokens": feats.t5.shape[0], "n_captions": None}
                    if "captions.json" in members:
                        files["captions.json"] = members["captions.json"]
                        row["n_captions"] = 1 + len(feats.extra_t5)
                    writer.add_sample(key, files, row)
        return writer.stats

    def _encode_further_captions(self, batch: list[tuple[str, dict[str, bytes]]], features: list[Features]) -> None:
        """Each sample's captions after the first (``KEY.captions.json``), encoded in one pass into ``extra_t5``."""
        further = [
            [c["text"] for c in json.loads(m["captions.json"])[1:]] if "captions.json" in m else [] for _, m in batch
        ]
        states = iter(self.encoder.encode_texts([t for texts in further for t in texts]) if any(further) else [])
        for texts, feats in zip(further, features, strict=True):
            feats.extra_t5 = [next(states) for _ in texts]

    def _describe(self, feats: Features) -> dict[str, Any]:
        return {**self.settings.record(), "vae_shape": list(feats.vae.shape), "t5_shape": list(feats.t5.shape)}


def caption_of(members: dict[str, bytes]) -> str:
    """The sample's caption text; "" when it has none (no ``txt`` member, or only whitespace)."""
    text = members.get("txt", b"").decode(errors="replace")
    return text if text.strip() else ""


@dataclass
class FeaturesSummary(StageSummary):
    """Samples encoded, those without caption text, and shards (reused ones included)."""

    out_dir: Path

    @property
    def samples(self) -> int:
        return sum(stats["successes"] for stats in self.run.stats)

    @property
    def missing(self) -> int:
        """Samples without caption text, encoded with the empty caption."""
        return sum(stats.get("missing_captions", 0) for stats in self.run.stats)

    def render(self) -> str:
        shards = f"{self.shards} shards ({self.shards_reused} already done)"
        missing = f" ({self.missing} without caption: encoded as the empty caption)" if self.missing else ""
        return f"features: {self.samples} samples{missing} in {shards} -> {self.out_dir}"


class FeaturesStage(Stage[FeaturesJob, FeaturesSummary]):
    """Encode every finished shard of a folder (curated shards, or a root's shards) on encoder actors."""

    label = "features"
    item_label = "samples"
    accepts_replace = True

    def __init__(self, source_dir: Path, out_dir: Path, config: FeaturesConfig) -> None:
        self.source_dir, self.out_dir = source_dir.resolve(), out_dir.resolve()
        self.config = config
        self.ray_address = config.ray_address
        self.inputs, self.outputs = (self.source_dir,), (self.out_dir,)
        self.replace, self.repair = config.replace, config.repair

    def plan(self) -> list[FeaturesJob]:
        """A job per finished shard of the source folder."""
        settings = self.config.model_dump_json(include={"vae", "text_encoder", "resolution", "max_tokens"})
        jobs = []
        for index in require_complete(self.source_dir).finished:
            stats = stats_of(shard_files_in(self.source_dir, index))
            jobs.append(
                FeaturesJob(
                    index=index,
                    out_dir=self.out_dir,
                    fingerprint=fingerprint(settings, stats["inputs_fingerprint"]),
                    items=stats["successes"],
                    source_dir=self.source_dir,
                )
            )
        if not jobs:
            raise MissingInputError(f"no finished shards in {self.source_dir}: run `densecurate curate` first")
        return jobs

    def work(self) -> Actors:
        c = self.config
        return Actors(
            FeaturesWorker,
            (c,),
            "encode_shard",
            c.workers,
            gpus_per_worker=c.gpus_per_worker,
            device=c.device,
            setup="write_null_caption",
            setup_args=(self.out_dir,),
            setup_output=self.out_dir / NULL_CAPTION_FILE,
        )

    def summarize(self, run: StageRun[FeaturesJob]) -> FeaturesSummary:
        return FeaturesSummary(run, out_dir=self.out_dir)


def run_features_stage(source_dir: Path, out_dir: Path, config: FeaturesConfig) -> FeaturesSummary:
    """Encode every finished shard of ``source_dir`` that ``out_dir`` does not hold yet."""
    return run_stage(FeaturesStage(source_dir, out_dir, config))
