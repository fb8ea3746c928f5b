"""The score stage: concept density per caption field.

``ROOT/density/FIELD/NNNNN.parquet`` (per key: words, nouns, noun lemmas) from the shard's alt text or
a captioner's captions, then ``ROOT/vocab/FIELD.parquet`` (noun, count, valid) over the whole field.
One Ray actor per core holds a spaCy pipeline with only the tagging components and takes whole shards.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq

from pipeline.catalog import refresh_catalog, sql_string
from pipeline.nouns import NounExtractor
from pipeline.parquet_meta import finished_output, read_meta, write_atomic
from pipeline.ray_runner import ActorLauncher, cluster_cpus, init_ray, run_shard_jobs
from pipeline.shard_reading import read_shard_stats, shard_indices
from pipeline.shard_writer import prune_outputs, temp_path
from schemas.layout import DatasetLayout
from schemas.score_config import ALT_TEXT_FIELD, NounSettings, ScoreConfig
from schemas.tables import DENSITY_SCHEMA, STATUS_OK


@dataclass(frozen=True)
class ScoreJob:
    """One shard of one field: where its texts are and where the density goes."""

    field: str
    index: int
    source: Path  # the shard's Parquet (alt_text) or the captioner's Parquet
    text_column: str
    out: Path
    fingerprint: str
    source_fingerprint: str  # of the texts scored (shard inputs, or the caption file), for later stages to check


def captioner_names(layout: DatasetLayout) -> list[str]:
    captions = layout.root / "captions"
    return sorted(p.name for p in captions.iterdir() if p.is_dir()) if captions.is_dir() else []


def plan_score_jobs(layout: DatasetLayout, field_name: str, nouns: NounSettings) -> list[ScoreJob]:
    """A job per shard that has texts for ``field_name``; raises if the field is unknown."""
    settings = nouns.model_dump_json()
    jobs = []
    if field_name == ALT_TEXT_FIELD:
        for index in shard_indices(layout):
            upstream = read_shard_stats(layout, index)["inputs_fingerprint"]
            source, column = layout.shard_files(index).parquet, ALT_TEXT_FIELD
            jobs.append((index, source, column, upstream))
    else:
        if field_name not in captioner_names(layout):
            have = ", ".join([ALT_TEXT_FIELD, *captioner_names(layout)])
            raise ValueError(f"no caption field {field_name!r} under {layout.root} (have: {have})")
        for path in sorted(layout.captions_dir(field_name).glob("*.parquet")):
            meta = read_meta(path)
            if meta is not None:
                jobs.append((int(path.stem), path, "caption", meta["fingerprint"]))
    return [
        ScoreJob(
            field=field_name,
            index=index,
            source=source,
            text_column=column,
            out=layout.density_file(field_name, index),
            fingerprint=hashlib.sha256((settings + upstream).encode()).hexdigest(),
            source_fingerprint=upstream,
        )
        for index, source, column, upstream in jobs
    ]


def _texts(job: ScoreJob) -> tuple[list[str], list[str | None]]:
    """Keys and texts to score: the shard's written samples, or every caption row."""
    table = pq.read_table(job.source, columns=["key", "status", job.text_column]).to_pylist()
    if job.text_column == ALT_TEXT_FIELD:
        table = [r for r in table if r["status"] == STATUS_OK]
    return [r["key"] for r in table], [r[job.text_column] for r in table]


class ScoreWorker:
    """Holds one spaCy pipeline; scores whole shards (a Ray actor in the stage)."""

    def __init__(self, nouns: NounSettings) -> None:
        self.extractor = NounExtractor(nouns)

    def score_shard(self, job: ScoreJob) -> dict[str, Any]:
        """Write the job's density file; returns its stats."""
        keys, texts = _texts(job)
        tagged_before = self.extractor.texts_tagged
        found = self.extractor.extract(texts)
        rows = [
            {
                "key": key,
                "field": job.field,
                "missing": not (text and text.strip()),
                "n_tokens": nouns.n_tokens,
                "n_nouns": len(nouns.nouns),
                "nouns": list(nouns.nouns),
            }
            for key, text, nouns in zip(keys, texts, found, strict=True)
        ]
        stats = {
            "count": len(rows),
            "missing": sum(r["missing"] for r in rows),
            "total_nouns": sum(r["n_nouns"] for r in rows),
            "texts_tagged": self.extractor.texts_tagged - tagged_before,
        }
        meta = {
            "fingerprint": job.fingerprint,
            "source_fingerprint": job.source_fingerprint,
            "stats": stats,
            "spacy": self.extractor.model_version,
        }
        write_atomic(job.out, rows, DENSITY_SCHEMA, meta)
        return stats


def write_vocab(layout: DatasetLayout, field_name: str, min_count: int) -> Path:
    """Count every noun of the field with DuckDB into ``vocab/FIELD.parquet`` (valid: count > min_count)."""
    target = layout.vocab_file(field_name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target)
    files = str(layout.density_file(field_name, 0).parent / "*.parquet")
    with duckdb.connect() as con:
        con.execute(
            f"""
            COPY (
                SELECT noun, count(*) AS count, count(*) > $min AS valid, $min AS min_count, $field AS field
                FROM (SELECT unnest(nouns) AS noun FROM read_parquet($files))
                GROUP BY noun ORDER BY count DESC, noun
            ) TO {sql_string(str(tmp))} (FORMAT parquet)
            """,
            {"min": min_count, "field": field_name, "files": files},
        )
    os.replace(tmp, target)
    return target


@dataclass
class FieldScore:
    """What the score stage did for one field."""

    field: str
    shards: int = 0
    shards_reused: int = 0
    totals: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0


def run_score_stage(root: Path, config: ScoreConfig) -> list[FieldScore]:
    """Score every field's shards that are not scored yet, then rebuild each field's vocabulary."""
    import ray

    layout = DatasetLayout(root.resolve())
    plans = {name: plan_score_jobs(layout, name, config.nouns) for name in dict.fromkeys(config.fields)}
    for name, jobs in plans.items():
        if not jobs:
            raise FileNotFoundError(f"nothing to score for {name!r} under {layout.root}: run the earlier stages")
        prune_outputs(layout.density_file(name, 0).parent, {job.index for job in jobs})
    init_ray(config.ray_address, None if config.ray_address else config.workers)
    todo = sum(1 for jobs in plans.values() for job in jobs if finished_output(job.out, job.fingerprint) is None)
    workers = min(config.workers or cluster_cpus(), max(todo, 1))
    actors = [ray.remote(max_restarts=2, max_task_retries=2)(ScoreWorker).remote(config.nouns) for _ in range(workers)]
    results = []
    try:
        for name, jobs in plans.items():
            run = run_shard_jobs(
                jobs,
                ActorLauncher(actors, "score_shard"),
                finished=lambda job: finished_output(job.out, job.fingerprint),
                items_in=lambda job: 0,
                label=f"score {name}",
                item_label=None,
            )
            result = FieldScore(field=name, shards=len(jobs), shards_reused=run.reused, seconds=run.seconds)
            for stats in run.stats:
                result.totals.update({k: stats[k] for k in ("count", "missing", "total_nouns", "texts_tagged")})
            write_vocab(layout, name, config.min_count)
            results.append(result)
    finally:
        for actor in actors:
            ray.kill(actor)
    refresh_catalog(layout)
    return results
