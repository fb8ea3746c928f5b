"""The merge stage: per key, the best caption among several fields -> ``ROOT/captions/NAME/NNNNN.parquet``.

The merged field has a captioner's tables (``CAPTIONS_SCHEMA``), so score, ground, compare, curate and features
read it unchanged. Each key's row is the winning field's row (its caption and provenance; alt text's: the alt
text, status ok, no model) with ``captioner`` the merged name and ``source`` naming that field. ``seconds`` and
``gpu_seconds`` are what every source spent on the key (a cheap captioner on every key plus a strong one on some:
the cascade's cost; alt text costs nothing), ``gpus`` the most GPUs a source's worker held for it and ``device``
the sources' devices, comma-separated. "Best" is the most grounded nouns, the most valid nouns or the highest
CLIP score among the sources with a caption for the key; ties go to the field listed first. A key no source has a
caption for gets an error row (``no_caption: ...``, no source). One Ray task per shard; a rerun redoes the shards
whose sources' texts, density, vocabulary or grounding changed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
from rich.table import Table

from pipeline.core.runner import run_stage
from pipeline.core.stage import Stage, StageRun, StageSummary, TableJob, Tasks, file_digest, fingerprint, shards_table
from pipeline.store.catalog import sql_string
from pipeline.store.field_texts import require_field
from pipeline.store.freshness import current_density, current_grounding
from pipeline.store.guards import require_complete
from pipeline.store.parquet_meta import write_table_atomic
from schemas.errors import ConfigError, MissingInputError
from schemas.layout import DatasetLayout
from schemas.merge_config import MergeConfig
from schemas.score_config import ALT_TEXT_FIELD
from schemas.tables import CAPTIONS_SCHEMA, STATUS_OK

NO_CAPTION = "no_caption"


@dataclass(frozen=True, kw_only=True)
class MergeJob(TableJob):
    """One shard: its sources' tables under ``root``; the merged rows go to ``captions/NAME/NNNNN.parquet``."""

    root: Path
    name: str
    fields: tuple[str, ...]
    by: str


def _score_sql(layout: DatasetLayout, name: str, index: int, by: str) -> str:
    """Per key of the field's shard: whether its caption is missing, and its score by the rule."""
    density = sql_string(str(layout.density_file(name, index)))
    if by == "valid_nouns":
        vocab = sql_string(str(layout.vocab_file(name)))
        return f"""
            WITH d AS (SELECT key, missing, nouns FROM read_parquet({density})),
            valid AS (SELECT x.key, count(*) AS n FROM (SELECT key, unnest(nouns) AS noun FROM d) x
                      JOIN (SELECT noun FROM read_parquet({vocab}) WHERE valid) v USING (noun) GROUP BY x.key)
            SELECT d.key, d.missing, coalesce(valid.n, 0)::DOUBLE FROM d LEFT JOIN valid USING (key)"""
    column = "n_grounded_nouns" if by == "grounded_nouns" else "clip_score"
    grounding = sql_string(str(layout.grounding_file(name, index)))
    return f"""
        SELECT d.key, d.missing OR g.missing, g.{column}::DOUBLE
        FROM read_parquet({density}) d LEFT JOIN read_parquet({grounding}) g USING (key)"""


def _caption_rows(layout: DatasetLayout, name: str, index: int) -> dict[str, dict[str, Any]]:
    """The field's rows of the shard by key, as caption rows (alt text: the shard's written samples' alt text)."""
    if name != ALT_TEXT_FIELD:
        rows = pq.read_table(layout.caption_file(name, index)).to_pylist()
        return {r["key"]: {c: r.get(c) for c in CAPTIONS_SCHEMA.names} for r in rows}
    table = pq.read_table(layout.shard_files(index).parquet, columns=["key", "status", ALT_TEXT_FIELD])
    return {
        r["key"]: {
            **dict.fromkeys(CAPTIONS_SCHEMA.names),
            "key": r["key"],
            "status": STATUS_OK,
            "caption": r[ALT_TEXT_FIELD],
            "seconds": 0.0,
            "gpu_seconds": 0.0,
            "gpus": 0.0,
        }
        for r in table.to_pylist()
        if r["status"] == STATUS_OK
    }


def _spent(row: dict[str, Any]) -> tuple[float, float]:
    """``(seconds, GPU-seconds)`` a row cost (rows written before ``gpu_seconds`` existed: seconds x GPUs)."""
    seconds = row.get("seconds") or 0.0
    gpu_seconds = row.get("gpu_seconds")
    return seconds, gpu_seconds if gpu_seconds is not None else seconds * (row.get("gpus") or 0.0)


def merged_row(key: str, job: MergeJob, rows: dict[str, dict], scores: dict[str, tuple]) -> dict[str, Any]:
    """The key's merged row: the best-scored source's row, or an error row when no source has a caption."""
    candidates = [
        (score, -order, name)
        for order, name in enumerate(job.fields)
        if key in scores.get(name, {}) and not scores[name][key][0] and (score := scores[name][key][1]) is not None
    ]
    having = [rows[name][key] for name in job.fields if key in rows[name]]
    spent = [_spent(row) for row in having]
    devices = sorted({row["device"] for row in having if row.get("device")})
    cost = {
        "seconds": sum(s for s, _ in spent),
        "gpu_seconds": sum(g for _, g in spent),
        "gpus": max((row.get("gpus") or 0.0 for row in having), default=0.0),
        "device": ", ".join(devices) or None,
        "captioner": job.name,
    }
    if not candidates:
        return {
            **dict.fromkeys(CAPTIONS_SCHEMA.names),
            **cost,
            "key": key,
            "status": "error",
            "error": f"{NO_CAPTION}: none of {', '.join(job.fields)} has a caption for this key",
        }
    winner = max(candidates)[2]
    return {**rows[winner][key], **cost, "source": winner}


def merge_shard(job: MergeJob) -> dict[str, Any]:
    """Write the job's merged caption table; returns its stats."""
    layout = DatasetLayout(job.root)
    rows = {name: _caption_rows(layout, name, job.index) for name in job.fields}
    scores: dict[str, dict[str, tuple]] = {}
    with duckdb.connect() as con:
        for name in job.fields:
            found = con.execute(_score_sql(layout, name, job.index, job.by)).fetchall()
            scores[name] = {key: (bool(missing), score) for key, missing, score in found}
    keys = sorted(set().union(*(r.keys() for r in rows.values())))
    merged = [merged_row(key, job, rows, scores) for key in keys]
    won = Counter(r["source"] for r in merged if r["source"] is not None)
    stats = {
        "count": len(merged),
        "ok": sum(r["status"] == STATUS_OK for r in merged),
        "won_by": {name: won.get(name, 0) for name in job.fields},
        "no_caption": sum(r["source"] is None for r in merged),
        "seconds": sum(r["seconds"] for r in merged),
        "gpu_seconds": sum(r["gpu_seconds"] for r in merged),
    }
    meta = {"fingerprint": job.fingerprint, "stats": stats, "merge": {"fields": list(job.fields), "by": job.by}}
    write_table_atomic(job.out, merged, CAPTIONS_SCHEMA, meta, per_shard=True)
    return stats


@dataclass
class MergeSummary(StageSummary):
    """Totals over every shard (reused ones included)."""

    config: MergeConfig
    out_dir: Path
    totals: Counter[str] = field(default_factory=Counter)
    won_by: Counter[str] = field(default_factory=Counter)

    def render(self) -> Table:
        """Keys, keys each source won, keys without a caption, the rule, shards."""
        rows = [("rule", f"the most {self.config.by.replace('_', ' ')}"), ("keys", f"{self.totals['count']:,}")]
        rows += [(f"  best from {name}", f"{self.won_by[name]:,}") for name in self.config.fields]
        rows += [("  no caption in any field", f"{self.totals['no_caption']:,}"), self.shards_row()]
        return shards_table(f"merge {', '.join(self.config.fields)} -> {self.out_dir}", rows)


class MergeStage(Stage[MergeJob, MergeSummary]):
    """Merge several caption fields of a root into one, shard by shard, in Ray tasks."""

    label = "merge"

    def __init__(self, root: Path, config: MergeConfig) -> None:
        self.catalog = layout = DatasetLayout(root.resolve())
        self.config = config
        self.ray_address = config.ray_address
        self.local_cpus = config.workers
        captions = tuple(layout.captions_dir(f) for f in config.fields if f != ALT_TEXT_FIELD)
        scores = (*(layout.density_dir(f) for f in config.fields), layout.vocab_dir)
        grounding = tuple(layout.grounding_dir(f) for f in config.fields) if config.needs_grounding else ()
        self.inputs = (layout.shards_dir, *captions, *scores, *grounding)
        self.outputs = (layout.captions_dir(config.name),)
        self.repair = config.repair

    def check(self) -> None:
        """Every source exists and is scored; for a grounding rule, grounded with one CLIP model."""
        layout = self.catalog
        for name in self.config.fields:
            require_field(layout, name)
            if not layout.vocab_file(name).is_file():
                raise MissingInputError(
                    f"{name!r} is not scored under {layout.root}: run `densecurate score {layout.root} --field "
                    f"{name}` first"
                )

    def plan(self) -> list[MergeJob]:
        """A job per shard; its fingerprint covers the rule, the fields, and each source's density (made from its
        texts), vocabulary and grounding."""
        layout, config = self.catalog, self.config
        vocab = "".join(file_digest(layout.vocab_file(name)) for name in config.fields)
        settings = config.model_dump_json(include={"name", "fields", "by"}) + vocab
        models: dict[str, str] = {}
        jobs = []
        for index in require_complete(layout.shards_dir).finished:
            upstream = "".join(self._source_fingerprint(name, index, models) for name in config.fields)
            jobs.append(
                MergeJob(
                    index=index,
                    out_dir=self.outputs[0],
                    fingerprint=fingerprint(settings, upstream),
                    root=layout.root,
                    name=config.name,
                    fields=config.fields,
                    by=config.by,
                )
            )
        if not jobs:
            raise MissingInputError(f"no finished shards under {layout.shards_dir}: run `densecurate shard` first")
        return jobs

    def _source_fingerprint(self, name: str, index: int, models: dict[str, str]) -> str:
        """The fingerprint of a source's scores of shard ``index`` (its density, made from its current texts, and for
        a grounding rule its grounding), refusing missing or stale ones and a second CLIP model (``models``: each
        model met so far -> the first field grounded with it)."""
        layout = self.catalog
        if name != ALT_TEXT_FIELD and not layout.caption_file(name, index).is_file():
            raise MissingInputError(
                f"shard {index} has no {name!r} captions (the shard is newer than the field): run the captioner of "
                f"{name!r} on {layout.root} again first"
            )
        density = current_density(layout, name, index)
        if not self.config.needs_grounding:
            return density["fingerprint"]
        grounding = current_grounding(layout, name, index, density, required=True)
        models.setdefault(grounding["model"], name)
        if len(models) > 1:
            (first, first_field), (other, other_field) = models.items()
            raise ConfigError(
                f"--by {self.config.by} compares the CLIP figures of one model, but {first_field!r} was grounded with "
                f"{first} and {other_field!r} with {other}: ground every field with the same --clip-model"
            )
        return density["fingerprint"] + grounding["fingerprint"]

    def work(self) -> Tasks:
        return Tasks(merge_shard, workers=self.config.workers)

    def summarize(self, run: StageRun[MergeJob]) -> MergeSummary:
        summary = MergeSummary(run, config=self.config, out_dir=self.outputs[0])
        for stats in run.stats:
            summary.totals.update({k: stats[k] for k in ("count", "ok", "no_caption")})
            summary.won_by.update(stats["won_by"])
        return summary


def run_merge_stage(root: Path, config: MergeConfig) -> MergeSummary:
    """Merge the fields of ``config`` under ``root`` into ``captions/NAME/``, shard by shard."""
    return run_stage(MergeStage(root, config))
