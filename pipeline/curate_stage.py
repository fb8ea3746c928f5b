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

from pipeline.catalog import sql_string
from pipeline.parquet_meta import read_meta
from pipeline.ray_runner import TaskLauncher, cluster_cpus, init_ray, run_shard_jobs
from pipeline.shard_reading import iter_shard_samples, shard_indices
from pipeline.shard_writer import ShardWriter, finished_stats, prune_outputs, read_stats
from schemas.layout import DatasetLayout, shard_files_in
from schemas.score_config import ALT_TEXT_FIELD, CurateConfig, CurateRules
from schemas.tables import CURATED_SCHEMA

# The rules in the order they are checked; a removed sample's reason is the first it fails.
RULE_ORDER = ("missing_caption", "min_words", "drop_flagged", "min_nouns", "min_valid_nouns")


@dataclass(frozen=True)
class CurateJob:
    """One source shard to curate into ``out_dir``."""

    index: int
    root: Path
    out_dir: Path
    field: str
    rules: CurateRules
    fingerprint: str


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
    writer = ShardWriter(shard_files_in(job.out_dir, job.index), schema=CURATED_SCHEMA)
    try:
        for key, members in iter_shard_samples(DatasetLayout(job.root).shard_files(job.index).tar):
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
        return writer.commit({"source_shard": job.index, "inputs_fingerprint": job.fingerprint})
    except BaseException:
        writer.abort()
        raise


def finished_curation(job: CurateJob) -> dict[str, Any] | None:
    return finished_stats(shard_files_in(job.out_dir, job.index), job.fingerprint)


def _texts_fingerprint(layout: DatasetLayout, field_name: str, index: int) -> str | None:
    """The fingerprint of the texts the field has now for shard ``index`` (what score records it scored)."""
    if field_name == ALT_TEXT_FIELD:
        stats = read_stats(layout.shard_files(index))
        return stats["inputs_fingerprint"] if stats else None
    meta = read_meta(layout.caption_file(field_name, index))
    return meta["fingerprint"] if meta else None


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def plan_curate_jobs(root: Path, out_dir: Path, config: CurateConfig) -> list[CurateJob]:
    """A job per shard; needs the field scored (density and vocabulary) first."""
    layout = DatasetLayout(root)
    vocab = layout.vocab_file(config.field)
    if not vocab.is_file():
        raise FileNotFoundError(
            f"{config.field!r} is not scored under {root}: run `densecurate score {root} --field {config.field}` first"
        )
    base = config.field + config.rules.model_dump_json() + _file_digest(vocab)
    jobs = []
    for index in shard_indices(layout):
        density = read_meta(layout.density_file(config.field, index))
        if density is None:
            raise FileNotFoundError(f"shard {index} has no density for {config.field!r}: rerun `densecurate score`")
        if density.get("source_fingerprint") != _texts_fingerprint(layout, config.field, index):
            raise ValueError(
                f"the density of shard {index} was computed from other {config.field!r} texts than the current "
                f"ones: rerun `densecurate score {root} --field {config.field}` first"
            )
        digest = hashlib.sha256((base + density["fingerprint"]).encode()).hexdigest()
        jobs.append(CurateJob(index, root, out_dir, config.field, config.rules, digest))
    return jobs


@dataclass
class CurateSummary:
    """Totals over every shard (reused ones included)."""

    inputs: int = 0
    kept: int = 0
    removed_by_rule: Counter[str] = field(default_factory=Counter)
    shards: int = 0
    shards_reused: int = 0


def run_curate_stage(root: Path, out_dir: Path, config: CurateConfig) -> CurateSummary:
    """Curate every shard of ``root`` into ``out_dir``."""
    root, out_dir = root.resolve(), out_dir.resolve()
    jobs = plan_curate_jobs(root, out_dir, config)
    prune_outputs(out_dir, {job.index for job in jobs})
    init_ray(config.ray_address, None if config.ray_address else config.workers)
    run = run_shard_jobs(
        jobs,
        TaskLauncher(curate_shard, capacity=config.workers or cluster_cpus()),
        finished=finished_curation,
        items_in=lambda job: 0,
        label="curate",
        item_label=None,
    )
    summary = CurateSummary(shards=len(jobs), shards_reused=run.reused)
    for stats in run.stats:
        summary.inputs += stats["count"]
        summary.kept += stats["successes"]
        summary.removed_by_rule.update(stats["skipped_by_reason"])
    return summary
