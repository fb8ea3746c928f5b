"""The embedding pass of `densecurate ground`: one CLIP image embedding per written sample and model.

``ROOT/embeddings/MODEL/NNNNN.parquet`` (key, model, normalised embedding in fp16), computed once per
image and CLIP model and read by every field's grounding; then ``ROOT/duplicates/MODEL.parquet``, the
exact (sha256) and near-duplicate (cosine) clusters over every embedding of the model.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline.core.progress import report_items
from pipeline.core.runner import run_stage
from pipeline.core.stage import Actors, Stage, StageRun, StageSummary, TableJob, fingerprint, shards_table
from pipeline.core.workers import ModelWorker
from pipeline.grounding.near_duplicates import DuplicateSearch, duplicate_clusters
from pipeline.store.guards import require_complete
from pipeline.store.parquet_meta import finished_output, write_table_atomic
from pipeline.store.shard_reading import read_shard_stats
from pipeline.store.verify import checked_samples
from schemas.ground_config import GroundConfig
from schemas.layout import DatasetLayout
from schemas.tables import DUPLICATES_SCHEMA, EMBEDDINGS_SCHEMA, STATUS_OK
from trainer.clip_model import clip_folder_name, clip_weights_identity, require_clip_model

DECODE_THREADS_PER_GPU = 8  # JPEG decoding and preprocessing threads of a GPU actor


@dataclass(frozen=True, kw_only=True)
class EmbedJob(TableJob):
    """One shard's images to embed with the stage's CLIP model."""

    model_name: str
    shard_tar: Path


def read_embeddings(path: Path) -> tuple[list[str], np.ndarray]:
    """Keys and embeddings (float32, n x d) of one embeddings table."""
    table = pq.read_table(path, columns=["key", "embedding"])
    keys = table.column("key").to_pylist()
    flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return keys, flat.astype(np.float32).reshape(len(keys), -1) if keys else np.zeros((0, 0), np.float32)


class ClipWorker(ModelWorker):
    """Holds one CLIP model (``model_name``: its folder name): the base of the embedding and grounding workers."""

    def __init__(self, config: GroundConfig, model_name: str, cpu_threads: int | None = None) -> None:
        from trainer.clip_model import ClipModel

        super().__init__(cpu_threads)
        self.clip = ClipModel(config.clip.model, config.clip.pretrained, config.device)
        self.batch_size = config.batch_size
        self.model_name = model_name


class EmbedWorker(ClipWorker):
    """Embeds whole shards with its CLIP model (a Ray actor in the stage)."""

    def __init__(self, config: GroundConfig, model_name: str, cpu_threads: int | None = None) -> None:
        super().__init__(config, model_name, cpu_threads)
        threads = self.cpu_threads or (DECODE_THREADS_PER_GPU if self.clip.device.type == "cuda" else 1)
        self.decoder = ThreadPoolExecutor(max_workers=threads)

    def _pixels(self, jpeg: bytes) -> Any:
        from PIL import Image

        side = 2 * self.clip.image_size
        with Image.open(io.BytesIO(jpeg)) as im:
            im.draft("RGB", (side, side))  # a JPEG much larger than the model's input decodes at a reduced size
            return self.clip.preprocess(im.convert("RGB"))

    def embed_shard(self, job: EmbedJob) -> dict[str, Any]:
        """Write the job's embeddings table; returns its stats."""
        import torch

        keys, jpegs = [], []
        for key, members in checked_samples(job.shard_tar):
            keys.append(key)
            jpegs.append(members["jpg"])
        vectors = []
        for start in range(0, len(jpegs), self.batch_size):
            pixels = list(self.decoder.map(self._pixels, jpegs[start : start + self.batch_size]))
            vectors.append(self.clip.encode_pixels(torch.stack(pixels)).half().numpy())
            report_items(len(pixels))
        embeddings = np.concatenate(vectors) if vectors else np.zeros((0, self.clip.embed_dim), np.float16)
        rows = [{"key": k, "model": self.model_name, "embedding": e} for k, e in zip(keys, embeddings, strict=True)]
        stats = {"count": len(rows), "dim": int(embeddings.shape[1])}
        write_table_atomic(
            job.out, rows, EMBEDDINGS_SCHEMA, {"fingerprint": job.fingerprint, "stats": stats}, per_shard=True
        )
        return stats


def write_duplicates(layout: DatasetLayout, model_name: str, jobs: list[EmbedJob], config: GroundConfig) -> dict:
    """Cluster the exact and near-duplicates among the model's embeddings into ``duplicates/MODEL.parquet``,
    unless the file is already made from these embeddings and settings; returns its stats."""
    target = layout.duplicates_file(model_name)
    settings = config.duplicates.model_dump_json()
    digest = fingerprint(settings, "".join(job.fingerprint for job in jobs))
    if (stats := finished_output(target, digest)) is not None:
        return stats
    keys: list[str] = []
    vectors = []
    sha: dict[str, str] = {}
    for job in jobs:
        job_keys, job_vectors = read_embeddings(job.out)
        keys += job_keys
        vectors.append(job_vectors)
        samples = pq.read_table(layout.shard_files(job.index).parquet, columns=["key", "status", "sha256"])
        sha.update((r["key"], r["sha256"]) for r in samples.to_pylist() if r["status"] == STATUS_OK)
    matrix = np.concatenate([v for v in vectors if v.size]) if any(v.size for v in vectors) else np.zeros((0, 1))
    search = DuplicateSearch(**config.duplicates.model_dump())
    rows = [
        {**row, "model": model_name} for row in duplicate_clusters(keys, matrix, [sha.get(k) for k in keys], search)
    ]
    stats = {
        "count": len(rows),
        "images": len(keys),
        "clusters": sum(r["kept"] for r in rows),
        "duplicates": sum(not r["kept"] for r in rows),
    }
    write_table_atomic(target, rows, DUPLICATES_SCHEMA, {"fingerprint": digest, "stats": stats})
    return stats


@dataclass
class EmbedSummary(StageSummary):
    """Images embedded and the duplicates found."""

    model_name: str
    duplicates: dict[str, int]

    @property
    def images(self) -> int:
        return sum(stats["count"] for stats in self.run.stats)

    def render(self) -> Any:
        rows = [
            ("images", f"{self.images:,}"),
            ("duplicate clusters", f"{self.duplicates['clusters']:,}"),
            ("samples marked duplicate", f"{self.duplicates['duplicates']:,} (one kept per cluster)"),
            self.shards_row(),
        ]
        return shards_table(f"embeddings {self.model_name}", rows)


class EmbedStage(Stage[EmbedJob, EmbedSummary]):
    """Embed every finished shard's images with one CLIP model; then find its duplicates."""

    label = "embed"
    item_label = "images"

    def __init__(self, root: Path, config: GroundConfig) -> None:
        self.config = config
        self.catalog = DatasetLayout(root.resolve())
        self.model_name = clip_folder_name(config.clip.model, config.clip.pretrained)
        self.ray_address = config.ray_address
        self.inputs = (self.catalog.shards_dir,)
        self.outputs = (self.catalog.embeddings_dir(self.model_name),)
        self.repair = config.repair
        self.duplicates: dict[str, int] = {}

    def check(self) -> None:
        require_clip_model(self.config.clip.model)

    def plan(self) -> list[EmbedJob]:
        layout = self.catalog
        settings = clip_weights_identity(self.config.clip.model, self.config.clip.pretrained)
        jobs = []
        for index in require_complete(layout.shards_dir).finished:
            stats = read_shard_stats(layout, index)
            jobs.append(
                EmbedJob(
                    index=index,
                    out_dir=self.outputs[0],
                    fingerprint=fingerprint(settings, stats["inputs_fingerprint"]),
                    items=stats["successes"],
                    expected_rows=stats["successes"],
                    model_name=self.model_name,
                    shard_tar=layout.shard_files(index).tar,
                )
            )
        return jobs

    def work(self) -> Actors:
        c = self.config
        return Actors(
            EmbedWorker,
            (c, self.model_name),
            "embed_shard",
            c.workers,
            gpus_per_worker=c.gpus_per_worker,
            device=c.device,
        )

    def finish(self, run: StageRun[EmbedJob]) -> None:
        jobs = sorted((r.job for r in run.results), key=lambda job: job.index)
        self.duplicates = write_duplicates(self.catalog, self.model_name, jobs, self.config)

    def summarize(self, run: StageRun[EmbedJob]) -> EmbedSummary:
        return EmbedSummary(run, model_name=self.model_name, duplicates=self.duplicates)


def run_embed_stage(root: Path, config: GroundConfig) -> EmbedSummary:
    """Embed every shard of ``root`` not embedded yet with the config's CLIP model, then find duplicates."""
    return run_stage(EmbedStage(root, config))
