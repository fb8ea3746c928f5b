"""The shard stage: sources -> ``ROOT/shards/NNNNN.{tar,parquet}`` + ``NNNNN_stats.json``."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.catalog import refresh_catalog
from pipeline.imaging import process_image
from pipeline.ray_runner import TaskLauncher, cluster_cpus, init_ray, run_shard_jobs
from pipeline.records import InputRecord, SkipRecord, clean_text
from pipeline.shard_writer import ShardWriter, finished_stats, prune_outputs
from pipeline.sources import list_inputs
from pipeline.sources.reading import SampleReader
from schemas.layout import DatasetLayout, shard_stem
from schemas.shard_config import ImageSettings, ShardConfig


@dataclass(frozen=True)
class ShardJob:
    """One output shard: its index, its input records and how to process them."""

    index: int
    records: tuple[InputRecord, ...]
    root: Path
    image: ImageSettings
    fingerprint: str  # of the inputs and settings; a finished shard must match it to be reused


def _fingerprint(records: Sequence[InputRecord], image: ImageSettings) -> str:
    h = hashlib.sha256(image.model_dump_json().encode())
    for rec in records:
        h.update(json.dumps([rec.key, rec.location, rec.preset_skip]).encode())
    return h.hexdigest()


def plan_shards(records: Sequence[InputRecord], root: Path, config: ShardConfig) -> list[ShardJob]:
    """Chunk the (already sorted) records into shards of ``config.shard_size``."""
    size = config.shard_size
    chunks = [tuple(records[i : i + size]) for i in range(0, len(records), size)]
    return [
        ShardJob(index=i, records=chunk, root=root, image=config.image, fingerprint=_fingerprint(chunk, config.image))
        for i, chunk in enumerate(chunks)
    ]


def finished_shard(job: ShardJob) -> dict[str, Any] | None:
    """Stats of the job's shard if it is complete and was made from the same inputs and settings."""
    return finished_stats(DatasetLayout(job.root).shard_files(job.index), job.fingerprint)


def _sample_json(rec: InputRecord, img, meta: dict[str, Any]) -> str:
    return json.dumps(
        {
            "key": rec.key,
            "source": rec.source,
            "original_id": clean_text(rec.original_id),
            "original_width": img.original_width,
            "original_height": img.original_height,
            "width": img.width,
            "height": img.height,
            "sha256": img.sha256,
            "source_meta": meta,
        },
        sort_keys=True,
        default=str,
    )


def write_shard(job: ShardJob) -> dict[str, Any]:
    """Process every record of one shard and commit its three files; returns the shard's stats."""
    writer = ShardWriter(DatasetLayout(job.root).shard_files(job.index))
    try:
        with SampleReader() as reader:
            for rec in job.records:
                where = {
                    "source": rec.source,
                    "original_id": clean_text(rec.original_id),
                    "location": clean_text(rec.location),
                }
                try:
                    sample = reader.load(rec)
                    img = process_image(sample.image, job.image)
                except SkipRecord as skip:
                    writer.add_skipped(rec.key, skip.code, skip.detail, where)
                    continue
                except Exception as exc:  # a record must never stop the job; keep the reason
                    writer.add_skipped(rec.key, "unexpected_error", f"{type(exc).__name__}: {exc}", where)
                    continue
                members: dict[str, bytes | str] = {"jpg": img.data, "json": _sample_json(rec, img, sample.meta)}
                if sample.alt_text:
                    members["txt"] = sample.alt_text
                row = {
                    **where,
                    "alt_text": sample.alt_text,
                    "original_width": img.original_width,
                    "original_height": img.original_height,
                    "width": img.width,
                    "height": img.height,
                    "jpeg_bytes": len(img.data),
                    "sha256": img.sha256,
                    "meta_json": json.dumps(sample.meta, sort_keys=True, default=str),
                }
                writer.add_sample(rec.key, members, row)
        return writer.commit(
            {"shard": shard_stem(job.index), "inputs_fingerprint": job.fingerprint, "settings": job.image.model_dump()}
        )
    except BaseException:
        writer.abort()
        raise


@dataclass
class ShardSummary:
    """Totals over every shard of the run (reused ones included)."""

    inputs: int = 0
    written: int = 0
    skipped_by_reason: Counter[str] = field(default_factory=Counter)
    shards: int = 0
    shards_reused: int = 0
    images_processed: int = 0
    seconds: float = 0.0

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_reason.values())

    @property
    def images_per_second(self) -> float:
        return self.images_processed / self.seconds if self.seconds > 0 else 0.0


def run_shard_stage(srcs: Sequence[Path], root: Path, config: ShardConfig) -> ShardSummary:
    """List the sources, write every unfinished shard under ``root`` on Ray, and summarise."""
    records = list_inputs(srcs, config.sources)
    root = root.resolve()
    jobs = plan_shards(records, root, config)
    prune_outputs(DatasetLayout(root).shards_dir, {job.index for job in jobs})
    init_ray(config.ray_address, None if config.ray_address else config.workers)
    run = run_shard_jobs(
        jobs,
        TaskLauncher(write_shard, capacity=config.workers or cluster_cpus()),
        finished=finished_shard,
        items_in=lambda job: len(job.records),
    )
    summary = ShardSummary(
        inputs=len(records),
        shards=len(jobs),
        shards_reused=run.reused,
        images_processed=run.items_processed,
        seconds=run.seconds,
    )
    for stats in run.stats:
        summary.written += stats["successes"]
        summary.skipped_by_reason.update(stats["skipped_by_reason"])
    root.mkdir(parents=True, exist_ok=True)
    refresh_catalog(DatasetLayout(root))
    return summary
