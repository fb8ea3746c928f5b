"""The score stage: concept density per caption field.

``ROOT/density/FIELD/NNNNN.parquet`` (per key: words, nouns, noun lemmas) from the shard's alt text or
a captioner's captions, then ``ROOT/vocab/FIELD.parquet`` (noun, count, valid) over the whole field.
One Ray actor per core holds a spaCy pipeline with only the tagging components and takes whole shards.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
from rich.table import Table

from pipeline.core.runner import run_stage
from pipeline.core.stage import Actors, Stage, StageRun, StageSummary, TableJob, fingerprint
from pipeline.density.nouns import NounExtractor, require_spacy_model
from pipeline.store.catalog import sql_string
from pipeline.store.field_texts import TextSource, field_sources, read_texts
from pipeline.store.parquet_meta import write_table_atomic
from schemas.atomic import atomic_output
from schemas.errors import MissingInputError
from schemas.layout import DatasetLayout
from schemas.score_config import ALT_TEXT_FIELD, NounSettings, ScoreConfig
from schemas.tables import DENSITY_SCHEMA


@dataclass(frozen=True, kw_only=True)
class ScoreJob(TableJob):
    """One shard of one field: where its texts are; the density goes to ``density/FIELD/NNNNN.parquet``."""

    field: str
    source: TextSource  # the shard's texts of the field; its fingerprint is recorded for later stages to check


def plan_score_jobs(layout: DatasetLayout, field_name: str, nouns: NounSettings) -> list[ScoreJob]:
    """A job per shard that has texts for ``field_name``; raises if the field has none."""
    settings = nouns.fingerprint_settings()
    jobs = [
        ScoreJob(
            index=source.index,
            out_dir=layout.density_dir(field_name),
            fingerprint=fingerprint(settings, source.fingerprint),
            field=field_name,
            source=source,
        )
        for source in field_sources(layout, field_name)
    ]
    if not jobs:
        raise MissingInputError(f"nothing to score for {field_name!r} under {layout.root}: run the earlier stages")
    return jobs


class ScoreWorker:
    """Holds one spaCy pipeline; scores whole shards (a Ray actor in the stage)."""

    def __init__(self, nouns: NounSettings) -> None:
        self.extractor = NounExtractor(nouns)

    def score_shard(self, job: ScoreJob) -> dict[str, Any]:
        """Write the job's density file; returns its stats."""
        keys, texts = read_texts(job.source)
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
                "cut": nouns.cut,
            }
            for key, text, nouns in zip(keys, texts, found, strict=True)
        ]
        stats = {
            "count": len(rows),
            "missing": sum(r["missing"] for r in rows),
            "total_nouns": sum(r["n_nouns"] for r in rows),
            "cut": sum(r["cut"] for r in rows),
            "texts_tagged": self.extractor.texts_tagged - tagged_before,
        }
        meta = {
            "fingerprint": job.fingerprint,
            "source_fingerprint": job.source.fingerprint,
            "stats": stats,
            "spacy": self.extractor.model_version,
        }
        write_table_atomic(job.out, rows, DENSITY_SCHEMA, meta, per_shard=True)
        return stats


def write_vocab(layout: DatasetLayout, field_name: str, min_count: int) -> Path:
    """Count every noun of the field with DuckDB into ``vocab/FIELD.parquet`` (valid: count > min_count)."""
    target = layout.vocab_file(field_name)
    with atomic_output(target) as tmp, duckdb.connect() as con:
        con.execute(
            f"""
            COPY (
                SELECT noun, count(*) AS count, count(*) > $min AS valid, $min AS min_count, $field AS field
                FROM (SELECT unnest(nouns) AS noun FROM read_parquet($files))
                GROUP BY noun ORDER BY count DESC, noun
            ) TO {sql_string(str(tmp))} (FORMAT parquet)
            """,
            {"min": min_count, "field": field_name, "files": layout.density_glob(field_name)},
        )
    return target


@dataclass
class FieldScore:
    """What the score stage did for one field."""

    field: str
    shards: int = 0
    shards_reused: int = 0
    totals: Counter[str] = field(default_factory=Counter)


@dataclass
class ScoreSummary(StageSummary):
    """One ``FieldScore`` per field scored (iterating the summary gives them)."""

    fields: list[FieldScore]

    def __iter__(self) -> Iterator[FieldScore]:
        return iter(self.fields)

    def render(self) -> Table:
        """Captions, missing texts, texts scored on their first part, nouns and shards per field."""
        table = Table(
            "field", "captions", "missing", "cut", "nouns", "distinct texts tagged", "shards", title="score stage"
        )
        for r in self.fields:
            t = r.totals
            shards = f"{r.shards} ({r.shards_reused} already done)"
            counts = (t[k] for k in ("count", "missing", "cut", "total_nouns", "texts_tagged"))
            table.add_row(r.field, *map(str, counts), shards)
        return table


class ScoreStage(Stage[ScoreJob, ScoreSummary]):
    """Score every field's shards that are not scored yet, then rebuild each field's vocabulary."""

    label = "score"

    def __init__(self, root: Path, config: ScoreConfig) -> None:
        self.config = config
        self.catalog = DatasetLayout(root.resolve())
        self.ray_address = config.ray_address
        self.local_cpus = config.workers
        self.field_names = list(dict.fromkeys(config.fields))
        captioners = [self.catalog.captions_dir(n) for n in self.field_names if n != ALT_TEXT_FIELD]
        self.inputs = (self.catalog.shards_dir, *captioners)
        self.outputs = tuple(self.catalog.density_dir(name) for name in self.field_names)
        self.repair = config.repair

    def plan(self) -> list[ScoreJob]:
        return [job for name in self.field_names for job in plan_score_jobs(self.catalog, name, self.config.nouns)]

    def check(self) -> None:
        require_spacy_model(self.config.nouns.spacy_model, self.ray_address)

    def work(self) -> Actors:
        return Actors(ScoreWorker, (self.config.nouns,), "score_shard", self.config.workers, one_per_core=True)

    def finish(self, run: StageRun[ScoreJob]) -> None:
        for name in self.field_names:
            write_vocab(self.catalog, name, self.config.min_count)

    def summarize(self, run: StageRun[ScoreJob]) -> ScoreSummary:
        by_field = {name: FieldScore(field=name) for name in self.field_names}
        for done in run.results:
            result = by_field[done.job.field]
            result.shards += 1
            result.shards_reused += done.reused
            result.totals.update({k: done.stats[k] for k in ("count", "missing", "total_nouns", "texts_tagged")})
            result.totals["cut"] += done.stats.get("cut", 0)  # density files written before texts were capped
        return ScoreSummary(run, fields=list(by_field.values()))


def run_score_stage(root: Path, config: ScoreConfig) -> ScoreSummary:
    """Score every field's shards that are not scored yet, then rebuild each field's vocabulary."""
    return run_stage(ScoreStage(root, config))
