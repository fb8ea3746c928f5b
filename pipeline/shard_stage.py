"""The shard stage: sources -> ``ROOT/shards/NNNNN.{tar,parquet}`` + ``NNNNN_stats.json``."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from pipeline.imaging import process_image
from pipeline.records import InputRecord, SkipRecord, clean_text
from pipeline.runner import run_stage
from pipeline.shard_writer import ShardWriter
from pipeline.sources import list_inputs
from pipeline.sources.reading import SampleReader
from pipeline.stage import ShardFilesJob, Stage, StageRun, StageSummary, Tasks, fingerprint, shards_table
from schemas.layout import DatasetLayout, shard_stem
from schemas.shard_config import ImageSettings, ShardConfig


@dataclass(frozen=True, kw_only=True)
class ShardJob(ShardFilesJob):
    """One output shard: its input records and how to process them."""

    records: tuple[InputRecord, ...]
    image: ImageSettings


def _inputs_digest(records: Sequence[InputRecord]) -> str:
    """What the shard is made from: each record's key, location and listing-time skip."""
    return "".join(json.dumps([rec.key, rec.location, rec.preset_skip]) for rec in records)


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
    extra = {"shard": shard_stem(job.index), "inputs_fingerprint": job.fingerprint, "settings": job.image.model_dump()}
    with ShardWriter(job.files, extra) as writer, SampleReader() as reader:
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
    return writer.stats


@dataclass
class ShardSummary(StageSummary):
    """Totals over every shard of the run (reused ones included)."""

    root: Path
    inputs: int = 0
    written: int = 0
    skipped_by_reason: Counter[str] = field(default_factory=Counter)

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_reason.values())

    @property
    def images_processed(self) -> int:
        return self.run.items_processed

    @property
    def images_per_second(self) -> float:
        return self.images_processed / self.seconds if self.seconds > 0 else 0.0

    def render(self) -> Table:
        """Written, skipped by reason, shards, speed."""
        skipped = [(f"  skipped: {reason}", str(n)) for reason, n in sorted(self.skipped_by_reason.items())]
        speed = f"{self.images_processed} images in {self.seconds:.1f} s = {self.images_per_second:.1f} images/s"
        rows = [
            ("inputs", str(self.inputs)),
            ("written", str(self.written)),
            ("skipped", str(self.skipped)),
            *skipped,
            self.shards_row(),
            ("speed", speed),
        ]
        return shards_table(f"shard stage -> {self.root}/shards", rows)


class ShardStage(Stage[ShardJob, ShardSummary]):
    """List the sources, chunk the records into shards, write each shard in a Ray task."""

    label = "shards"
    item_label = "images"
    guards_finished = True
    takes_replace = True

    def __init__(self, srcs: Sequence[Path], root: Path, config: ShardConfig) -> None:
        self.srcs, self.config = srcs, config
        self.catalog = DatasetLayout(root.resolve())
        self.ray_address = config.ray_address
        self.local_cpus = config.workers
        self.inputs = tuple(srcs)
        self.outputs = (self.catalog.shards_dir,)
        self.replace, self.repair = config.replace, config.repair
        self.records = 0

    def plan(self) -> list[ShardJob]:
        """Chunk the (sorted) records into shards of ``shard_size``."""
        records = list_inputs(self.srcs, self.config.sources)
        self.records = len(records)
        size, image = self.config.shard_size, self.config.image
        # The read limits count only when changed, so shards made before they existed stay valid.
        limits = self.config.sources.model_dump_json(
            include={"max_file_bytes", "max_sidecar_bytes"}, exclude_defaults=True
        )
        settings = image.model_dump_json() + (limits if limits != "{}" else "")
        jobs = []
        for index, start in enumerate(range(0, len(records), size)):
            chunk = tuple(records[start : start + size])
            jobs.append(
                ShardJob(
                    index=index,
                    out_dir=self.catalog.shards_dir,
                    fingerprint=fingerprint(settings, _inputs_digest(chunk)),
                    items=len(chunk),
                    records=chunk,
                    image=image,
                )
            )
        return jobs

    def work(self) -> Tasks:
        return Tasks(write_shard, workers=self.config.workers)

    def dependents(self, indices: set[int]) -> list[Path]:
        return self.catalog.tables_of_shards(indices)

    def summarize(self, run: StageRun[ShardJob]) -> ShardSummary:
        summary = ShardSummary(run, root=self.catalog.root, inputs=self.records)
        for stats in run.stats:
            summary.written += stats["successes"]
            summary.skipped_by_reason.update(stats["skipped_by_reason"])
        return summary


def run_shard_stage(srcs: Sequence[Path], root: Path, config: ShardConfig) -> ShardSummary:
    """List the sources, write every unfinished shard under ``root`` on Ray, and summarise."""
    return run_stage(ShardStage(srcs, root, config))
