"""The curate stage: keep the samples whose chosen caption passes the rules, as new webdataset shards.

``OUT/NNNNN.tar`` (``KEY.jpg``, ``KEY.txt`` = the chosen caption, ``KEY.json`` = the sample's metadata
plus its density) and ``OUT/NNNNN.parquet`` (every written sample of shard N: kept, or removed with
the first rule it failed) and ``OUT/NNNNN_stats.json``. Resumable per shard like every stage.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
from rich.table import Table

from pipeline.catalog import sql_string
from pipeline.freshness import density_is_current
from pipeline.guards import require_complete
from pipeline.parquet_meta import read_meta
from pipeline.runner import run_stage
from pipeline.shard_reading import iter_shard_samples
from pipeline.shard_writer import ShardWriter
from pipeline.stage import ShardFilesJob, Stage, StageRun, StageSummary, Tasks, fingerprint, shards_table
from pipeline.verify import DamagedInputError, image_digest_problem
from schemas.errors import MissingInputError, StaleInputError
from schemas.layout import DatasetLayout
from schemas.score_config import ALT_TEXT_FIELD, CurateConfig, CurateRules
from schemas.tables import CURATED_SCHEMA

# The rules in the order they are checked; a removed sample's reason is the first it fails.
RULE_ORDER = ("missing_caption", "min_words", "drop_flagged", "min_nouns", "min_valid_nouns")


@dataclass(frozen=True, kw_only=True)
class CurateJob(ShardFilesJob):
    """One source shard of ``root`` to curate into ``out_dir`` (same index)."""

    root: Path
    field: str
    rules: CurateRules


def _candidates(job: CurateJob) -> list[dict[str, Any]]:
    """The shard's written samples with the chosen caption, its density and flags (DuckDB join)."""
    layout = DatasetLayout(job.root)
    density = sql_string(str(layout.density_file(job.field, job.index)))
    vocab = sql_string(str(layout.vocab_file(job.field)))
    shard = sql_string(str(layout.shard_files(job.index).parquet))
    if job.field == ALT_TEXT_FIELD:
        caption, flagged, captions_join = "s.alt_text", "false", ""
    else:
        caption = "CASE WHEN c.status = 'ok' THEN c.caption END"
        flagged = "coalesce(c.truncated OR c.repetitive OR c.empty, false)"
        captions_join = (
            f"LEFT JOIN read_parquet({sql_string(str(layout.caption_file(job.field, job.index)))}) c USING (key)"
        )
    sql = f"""
        WITH d AS (SELECT * FROM read_parquet({density})),
        valid AS (
            SELECT x.key, count(*) AS n_valid
            FROM (SELECT key, unnest(nouns) AS noun FROM d) x
            JOIN (SELECT noun FROM read_parquet({vocab}) WHERE valid) v USING (noun)
            GROUP BY x.key
        )
        SELECT s.key, {caption} AS caption, {flagged} AS flagged, d.n_tokens, d.n_nouns,
               coalesce(valid.n_valid, 0) AS n_valid_nouns, d.nouns
        FROM read_parquet({shard}) s
        {captions_join}
        LEFT JOIN d USING (key)
        LEFT JOIN valid USING (key)
        WHERE s.status = 'ok'
        ORDER BY s.key
    """
    with duckdb.connect() as con:
        cursor = con.execute(sql)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def first_failed_rule(sample: dict[str, Any], rules: CurateRules) -> tuple[str, str] | None:
    """``(rule, why)`` for the first rule the sample fails, or None if it is kept."""
    caption = sample["caption"]
    if rules.min_words and not (caption and caption.strip()):
        return "missing_caption", "no caption in this field"
    words = sample["n_tokens"] or 0
    if words < rules.min_words:
        return "min_words", f"{words} words < {rules.min_words}"
    if rules.drop_flagged and sample["flagged"]:
        return "drop_flagged", "the captioner flagged it (truncated, repetitive or empty)"
    nouns = sample["n_nouns"] or 0
    if nouns < rules.min_nouns:
        return "min_nouns", f"{nouns} nouns < {rules.min_nouns}"
    if sample["n_valid_nouns"] < rules.min_valid_nouns:
        return "min_valid_nouns", f"{sample['n_valid_nouns']} valid nouns < {rules.min_valid_nouns}"
    return None


def curate_shard(job: CurateJob) -> dict[str, Any]:
    """Write one curated shard; returns its stats."""
    candidates = {s["key"]: s for s in _candidates(job)}
    extra = {"source_shard": job.index, "inputs_fingerprint": job.fingerprint}
    with ShardWriter(job.files, extra, schema=CURATED_SCHEMA) as writer:
        tar = DatasetLayout(job.root).shard_files(job.index).tar
        for key, members in iter_shard_samples(tar):
            if problem := image_digest_problem(key, members):
                raise DamagedInputError(
                    f"{tar} is damaged ({problem}): run `densecurate verify {job.root} --deep`, then the shard "
                    "stage again with --repair"
                )
            sample = candidates[key]
            row = {k: sample[k] for k in ("caption", "n_tokens", "n_nouns", "n_valid_nouns", "flagged")}
            row["field"] = job.field
            failed = first_failed_rule(sample, job.rules)
            if failed:
                writer.add_skipped(key, *failed, row)
                continue
            meta = json.loads(members["json"])
            meta["caption_field"] = job.field
            meta["density"] = {k: sample[k] for k in ("n_tokens", "n_nouns", "n_valid_nouns", "nouns")}
            files = {"jpg": members["jpg"], "json": json.dumps(meta)}
            if sample["caption"]:
                files["txt"] = sample["caption"]
            writer.add_sample(key, files, row)
    return writer.stats


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class CurateSummary(StageSummary):
    """Totals over every shard (reused ones included)."""

    field: str
    out_dir: Path
    inputs: int = 0
    kept: int = 0
    removed_by_rule: Counter[str] = field(default_factory=Counter)

    def render(self) -> Table:
        """Samples, removals per rule (in rule order), kept, shards."""
        removed = [(f"  removed by {rule}", str(self.removed_by_rule.get(rule, 0))) for rule in RULE_ORDER]
        rows = [
            ("samples", str(self.inputs)),
            *removed,
            ("kept", str(self.kept)),
            self.shards_row(),
        ]
        return shards_table(f"curate {self.field} -> {self.out_dir}", rows)


class CurateStage(Stage[CurateJob, CurateSummary]):
    """Keep the samples whose chosen caption passes the rules, shard by shard, in Ray tasks."""

    label = "curate"
    takes_replace = True

    def __init__(self, root: Path, out_dir: Path, config: CurateConfig) -> None:
        self.layout = layout = DatasetLayout(root.resolve())
        self.out_dir = out_dir.resolve()
        self.config = config
        self.ray_address = config.ray_address
        self.local_cpus = config.workers
        captions = () if config.field == ALT_TEXT_FIELD else (layout.captions_dir(config.field),)
        self.inputs = (layout.shards_dir, *captions, layout.density_dir(config.field), layout.vocab_dir)
        self.outputs = (self.out_dir,)
        self.replace, self.repair = config.replace, config.repair

    def plan(self) -> list[CurateJob]:
        """A job per shard; needs the field scored (density and vocabulary) from its current texts."""
        layout, name = self.layout, self.config.field
        vocab = layout.vocab_file(name)
        if not vocab.is_file():
            command = f"densecurate score {layout.root} --field {name}"
            raise MissingInputError(f"{name!r} is not scored under {layout.root}: run `{command}` first")
        settings = name + self.config.rules.model_dump_json() + _file_digest(vocab)
        jobs = []
        for index in require_complete(layout.shards_dir).finished:
            density = read_meta(layout.density_file(name, index))
            if density is None:
                raise MissingInputError(f"shard {index} has no density for {name!r}: rerun `densecurate score`")
            if not density_is_current(layout, name, index, density):
                raise StaleInputError(
                    f"the density of shard {index} was computed from other {name!r} texts than the current "
                    f"ones: rerun `densecurate score {layout.root} --field {name}` first"
                )
            jobs.append(
                CurateJob(
                    index=index,
                    out_dir=self.out_dir,
                    fingerprint=fingerprint(settings, density["fingerprint"]),
                    root=layout.root,
                    field=name,
                    rules=self.config.rules,
                )
            )
        return jobs

    def work(self) -> Tasks:
        return Tasks(curate_shard, workers=self.config.workers)

    def summarize(self, run: StageRun[CurateJob]) -> CurateSummary:
        summary = CurateSummary(run, field=self.config.field, out_dir=self.out_dir)
        for stats in run.stats:
            summary.inputs += stats["count"]
            summary.kept += stats["successes"]
            summary.removed_by_rule.update(stats["skipped_by_reason"])
        return summary


def run_curate_stage(root: Path, out_dir: Path, config: CurateConfig) -> CurateSummary:
    """Curate every shard of ``root`` into ``out_dir``."""
    return run_stage(CurateStage(root, out_dir, config))
