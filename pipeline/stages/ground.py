"""`densecurate ground`: image-caption CLIP scores and grounded nouns per caption field, and near-duplicates.

Two passes over the shards, each resumable per shard:

1. ``pipeline.stages.embed``: one image embedding per sample and CLIP model (``embeddings/MODEL/``), then
   the model's duplicate clusters (``duplicates/MODEL.parquet``);
2. per field, on actors holding the same model: first the per-noun calibration of the field's vocabulary
   on reference images (``calibration/FIELD.parquet``, the actors' one-time setup), then per shard
   ``grounding/FIELD/NNNNN.parquet``: sentence scores and every noun of the density stage judged
   grounded or not (``pipeline.grounding.scores`` has the rule).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from rich.console import Group
from rich.table import Table

from pipeline.core.progress import report_items
from pipeline.core.runner import run_stage
from pipeline.core.stage import Actors, Stage, StageRun, StageSummary, TableJob, file_digest, fingerprint
from pipeline.grounding.scores import (
    Calibration,
    calibrate,
    distinct_ungrounded,
    ensemble,
    judge_nouns,
    noun_prompts,
    split_sentences,
)
from pipeline.stages.embed import ClipWorker, EmbedSummary, read_embeddings, run_embed_stage
from pipeline.store.field_texts import TextSource, field_sources, read_texts, require_field
from pipeline.store.parquet_meta import finished_output, read_meta, write_table_atomic
from schemas.errors import MissingInputError, OutputConflictError, StaleInputError
from schemas.ground_config import GroundConfig, GroundingSettings
from schemas.layout import DatasetLayout
from schemas.tables import CALIBRATION_SCHEMA, GROUNDING_SCHEMA
from trainer.clip_model import clip_folder_name, clip_weights_identity


@dataclass(frozen=True)
class CalibrationPlan:
    """One field's calibration: its output, fingerprint, vocabulary and reference shards."""

    field: str
    out: Path
    fingerprint: str
    vocab: Path
    references: tuple[tuple[Path, Path], ...]  # (embeddings table, density table) per reference shard


@dataclass(frozen=True, kw_only=True)
class GroundJob(TableJob):
    """One shard of one field: its texts, density, embeddings and the field's calibration."""

    field: str
    model_name: str
    texts: TextSource
    density: Path
    density_fingerprint: str
    embeddings: Path
    calibration: Path
    calibration_fingerprint: str


def reference_shards(counts: Sequence[tuple[int, int]], wanted: int) -> list[int]:
    """Whole shards, evenly spaced over ``counts`` (``(index, images)`` in order), holding about ``wanted`` images."""
    total = sum(n for _, n in counts)
    if total <= wanted:
        return [i for i, _ in counts]
    take = min(len(counts), max(1, math.ceil(len(counts) * wanted / total)))
    positions = sorted({round(k * (len(counts) - 1) / max(take - 1, 1)) for k in range(take)})
    return [counts[p][0] for p in positions]


def _nouns_by_key(density: Path) -> dict[str, tuple[bool, list[str]]]:
    return {
        r["key"]: (r["missing"], r["nouns"])
        for r in pq.read_table(density, columns=["key", "missing", "nouns"]).to_pylist()
    }


def require_scored(layout: DatasetLayout, name: str) -> None:
    """Refuse a field that does not exist or is not scored (its vocabulary is missing)."""
    require_field(layout, name)
    if not layout.vocab_file(name).is_file():
        command = f"densecurate score {layout.root} --field {name}"
        raise MissingInputError(f"{name!r} is not scored under {layout.root}: run `{command}` first")


def load_calibration(path: Path) -> Calibration:
    """A calibration table read back (text embeddings and the statistics z is computed against)."""
    table = pq.read_table(path)
    meta = read_meta(path) or {}
    embeddings = table.column("text_embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    nouns = table.column("noun").to_pylist()
    width = embeddings.size // max(len(nouns), 1)  # a field without nouns has an empty (0 x 0) table
    return Calibration(
        nouns,
        embeddings.astype(np.float32).reshape(len(nouns), width),
        table.column("mean").to_numpy().astype(np.float64),
        table.column("std").to_numpy().astype(np.float64),
        float(meta["stats"]["pooled_mean"]),
        float(meta["stats"]["pooled_std"]),
    )


class GroundWorker(ClipWorker):
    """Calibrates fields and grounds whole shards with its CLIP model (a Ray actor in the stage)."""

    def __init__(self, config: GroundConfig, model_name: str, cpu_threads: int | None = None) -> None:
        super().__init__(config, model_name, cpu_threads)
        self.settings: GroundingSettings = config.grounding
        self._calibrations: dict[tuple[Path, str], Calibration] = {}

    def noun_embeddings(self, nouns: Sequence[str]) -> np.ndarray:
        """The prompt-ensemble embedding of each noun (V x d)."""
        templates = self.settings.noun_prompts
        if not nouns:
            return np.zeros((0, self.clip.embed_dim), np.float32)
        texts = self.clip.encode_texts(noun_prompts(nouns, templates), self.batch_size).numpy()
        return ensemble(texts, len(templates))

    def calibrate(self, plans: Sequence[CalibrationPlan]) -> None:
        """Write each field's calibration table unless it is current (the stage's one-time setup)."""
        for plan in plans:
            if finished_output(plan.out, plan.fingerprint) is None:
                self._calibrate(plan)

    def _calibrate(self, plan: CalibrationPlan) -> None:
        nouns = pq.read_table(plan.vocab, columns=["noun"]).column("noun").to_pylist()
        images, named = [], []
        for embeddings, density in plan.references:
            keys, vectors = read_embeddings(embeddings)
            by_key = _nouns_by_key(density)
            for key, vector in zip(keys, vectors, strict=True):
                missing, key_nouns = by_key.get(key, (True, []))
                if not missing:  # an image without a caption is no evidence of what its caption omits
                    images.append(vector)
                    named.append(set(key_nouns))
        text = self.noun_embeddings(nouns)
        matrix = np.stack(images) if images else np.zeros((0, text.shape[1]), np.float32)
        calibration, rows = calibrate(matrix, named, nouns, text, self.settings)
        for row, embedding in zip(rows, text.astype(np.float16), strict=True):
            row.update(field=plan.field, model=self.model_name, text_embedding=embedding)
        stats = {
            "count": len(rows),
            "images": len(images),
            "fallback": sum(r["fallback"] for r in rows),
            "pooled_mean": calibration.pooled_mean,
            "pooled_std": calibration.pooled_std,
        }
        write_table_atomic(plan.out, rows, CALIBRATION_SCHEMA, {"fingerprint": plan.fingerprint, "stats": stats})

    def _calibration(self, job: GroundJob) -> Calibration:
        cache_key = (job.calibration, job.calibration_fingerprint)
        if cache_key not in self._calibrations:
            self._calibrations = {cache_key: load_calibration(job.calibration)}
        return self._calibrations[cache_key]

    def ground_shard(self, job: GroundJob) -> dict[str, Any]:
        """Write the job's grounding table; returns its stats."""
        calibration = self._calibration(job)
        keys, vectors = read_embeddings(job.embeddings)
        image_of = dict(zip(keys, vectors, strict=True))
        text_keys, texts = read_texts(job.texts)
        text_of = dict(zip(text_keys, texts, strict=True))
        density = pq.read_table(job.density, columns=["key", "missing", "nouns"]).to_pylist()
        absent = [r["key"] for r in density if r["key"] not in image_of]
        if absent:
            raise StaleInputError(
                f"{len(absent)} scored keys of shard {job.index} (e.g. {absent[0]}) have no image embedding in "
                f"{job.embeddings}: rerun `densecurate ground` (the shards changed since they were embedded)"
            )
        sentences = {
            r["key"]: split_sentences(text_of.get(r["key"]) or "", self.settings.max_sentences)
            for r in density
            if not r["missing"]
        }
        texts_to_encode = [s for key in sentences for s in sentences[key]]
        texts_to_encode += [text_of[key] or "" for key in sentences]
        encoded = self.clip.encode_texts(texts_to_encode, self.batch_size).numpy()
        unknown = sorted({n for r in density for n in r["nouns"]} - set(calibration.positions))
        extra = dict(zip(unknown, self.noun_embeddings(unknown), strict=True))
        rows, offset, whole = [], 0, len(texts_to_encode) - len(sentences)
        for r in density:
            key, image = r["key"], image_of[r["key"]]
            row: dict[str, Any] = {"key": key, "field": job.field, "model": self.model_name, "missing": r["missing"]}
            if r["missing"]:
                rows.append({**row, **_empty_scores()})
                continue
            report_items()
            count = len(sentences[key])
            scores = 100.0 * encoded[offset : offset + count] @ image
            offset += count
            judged = judge_nouns(image, r["nouns"], calibration, extra, self.settings.z_threshold)
            n_nouns = len(r["nouns"])
            row.update(
                n_sentences=count,
                clip_score=float(scores.mean()) if count else None,
                clip_score_min=float(scores.min()) if count else None,
                clip_score_max=float(scores.max()) if count else None,
                clip_score_truncated=float(100.0 * encoded[whole] @ image),
                nouns=r["nouns"],
                noun_scores=judged.scores,
                noun_z=judged.z,
                grounded=judged.grounded,
                n_nouns=n_nouns,
                n_grounded_nouns=judged.n_grounded,
                grounded_share=judged.n_grounded / n_nouns if n_nouns else None,
                ungrounded_nouns=distinct_ungrounded(r["nouns"], judged.grounded),
            )
            whole += 1
            rows.append(row)
        stats = {
            "count": len(rows),
            "missing": sum(r["missing"] for r in rows),
            "total_nouns": sum(r["n_nouns"] for r in rows),
            "grounded_nouns": sum(r["n_grounded_nouns"] for r in rows),
            "sentences": sum(r["n_sentences"] for r in rows),
            "clip_score_sum": sum(r.get("clip_score") or 0.0 for r in rows),
        }
        meta = {
            "fingerprint": job.fingerprint,
            "density_fingerprint": job.density_fingerprint,
            "calibration": job.calibration_fingerprint,
            "model": self.model_name,
            "rule": self.settings.model_dump(mode="json"),
            "stats": stats,
        }
        write_table_atomic(job.out, rows, GROUNDING_SCHEMA, meta, per_shard=True)
        return stats


def _empty_scores() -> dict[str, Any]:
    return {
        "n_sentences": 0,
        "nouns": [],
        "noun_scores": [],
        "noun_z": [],
        "grounded": [],
        "n_nouns": 0,
        "n_grounded_nouns": 0,
        "ungrounded_nouns": [],
    }


@dataclass
class GroundingStageSummary(StageSummary):
    """The grounding pass's summary, per field: captions, keys without one, nouns, grounded nouns, mean
    image-caption score (over captions)."""

    fields: list[str]

    def render(self) -> Table:
        table = Table(
            "field",
            "captions",
            "missing",
            "nouns",
            "grounded nouns",
            "grounded share",
            "mean clip score",
            "shards",
            title="grounding",
        )
        for name in self.fields:
            results = [r for r in self.run.results if r.job.field == name]
            t = {k: sum(r.stats[k] for r in results) for k in ("count", "missing", "total_nouns", "grounded_nouns")}
            scored = t["count"] - t["missing"]
            score = f"{sum(r.stats['clip_score_sum'] for r in results) / scored:.2f}" if scored else "-"
            share = t["grounded_nouns"] / t["total_nouns"] if t["total_nouns"] else 0.0
            table.add_row(
                name,
                f"{scored:,}",
                f"{t['missing']:,}",
                f"{t['total_nouns']:,}",
                f"{t['grounded_nouns']:,}",
                f"{100 * share:.1f}%",
                score,
                f"{len(results)} ({sum(r.reused for r in results)} already done)",
            )
        return table


class GroundingStage(Stage[GroundJob, GroundingStageSummary]):
    """Ground every scored field's shards that are not grounded yet with the config's CLIP model."""

    label = "ground"
    item_label = "captions"

    def __init__(self, root: Path, config: GroundConfig) -> None:
        self.config = config
        self.catalog = layout = DatasetLayout(root.resolve())
        self.model_name = clip_folder_name(config.clip.model, config.clip.pretrained)
        self.fields = list(dict.fromkeys(config.fields))
        self.ray_address = config.ray_address
        self.inputs = (layout.embeddings_dir(self.model_name), *(layout.density_dir(f) for f in self.fields))
        self.outputs = tuple(layout.grounding_dir(f) for f in self.fields)
        self.repair = config.repair
        self.calibrations: list[CalibrationPlan] = []

    def _field_jobs(self, name: str, identity: str) -> tuple[CalibrationPlan, list[GroundJob]]:
        layout = self.catalog
        require_scored(layout, name)
        vocab = layout.vocab_file(name)
        parts = []
        for source in field_sources(layout, name):
            density = read_meta(layout.density_file(name, source.index))
            if density is None or density.get("source_fingerprint") != source.fingerprint:
                raise StaleInputError(
                    f"shard {source.index} has no current density for {name!r} (missing, or made from other texts): "
                    f"rerun `densecurate score {layout.root} --field {name}` first"
                )
            embedded = read_meta(layout.embedding_file(self.model_name, source.index))
            if embedded is None:
                raise MissingInputError(f"shard {source.index} has no {self.model_name} embeddings: rerun the stage")
            parts.append((source, density, embedded))
        if not parts:
            raise MissingInputError(f"nothing to ground for {name!r} under {layout.root}: run the earlier stages")
        counts = [(s.index, e["stats"]["count"]) for s, _, e in parts]
        chosen = set(reference_shards(counts, self.config.grounding.calibration_images))
        references = tuple(
            (layout.embedding_file(self.model_name, s.index), layout.density_file(name, s.index))
            for s, _, _ in parts
            if s.index in chosen
        )
        upstream = file_digest(vocab) + "".join(
            d["fingerprint"] + e["fingerprint"] for s, d, e in parts if s.index in chosen
        )
        settings = identity + name + self.config.grounding.model_dump_json()
        plan = CalibrationPlan(name, layout.calibration_file(name), fingerprint(settings, upstream), vocab, references)
        jobs = [
            GroundJob(
                index=s.index,
                out_dir=layout.grounding_dir(name),
                fingerprint=fingerprint(settings + plan.fingerprint, d["fingerprint"] + e["fingerprint"]),
                items=d["stats"]["count"],
                expected_rows=d["stats"]["count"],
                field=name,
                model_name=self.model_name,
                texts=s,
                density=layout.density_file(name, s.index),
                density_fingerprint=d["fingerprint"],
                embeddings=layout.embedding_file(self.model_name, s.index),
                calibration=plan.out,
                calibration_fingerprint=plan.fingerprint,
            )
            for s, d, e in parts
        ]
        return plan, jobs

    def plan(self) -> list[GroundJob]:
        identity = clip_weights_identity(self.config.clip.model, self.config.clip.pretrained)
        jobs: list[GroundJob] = []
        self.calibrations = []
        for name in self.fields:
            plan, field_jobs = self._field_jobs(name, identity)
            self.calibrations.append(plan)
            jobs += field_jobs
        if not self.config.replace:
            self._refuse_to_replace_grounding(jobs)
        return jobs

    def _refuse_to_replace_grounding(self, jobs: Sequence[GroundJob]) -> None:
        """Refuse a plan that would overwrite grounding of the same captions made with another CLIP model or rule."""
        rule = self.config.grounding.model_dump(mode="json")
        replaced: dict[str, int] = {}
        for job in jobs:
            earlier = read_meta(job.out)
            if earlier is None or earlier.get("density_fingerprint") != job.density_fingerprint:
                continue  # nothing there, or grounding of other captions: redoing it replaces nothing current
            if earlier.get("model") != self.model_name or earlier.get("rule", rule) != rule:
                replaced[earlier.get("model", "?")] = replaced.get(earlier.get("model", "?"), 0) + 1
        if replaced:
            made = ", ".join(f"{shards} shards by {model}" for model, shards in sorted(replaced.items()))
            raise OutputConflictError(
                f"this run would replace grounding that an earlier run made with another CLIP model or rule ({made}; "
                f"this run: {self.model_name}): pass --replace to replace it"
            )

    def work(self) -> Actors:
        c = self.config
        return Actors(
            GroundWorker,
            (c, self.model_name),
            "ground_shard",
            c.workers,
            gpus_per_worker=c.gpus_per_worker,
            device=c.device,
            setup="calibrate",
            setup_args=(self.calibrations,),
        )

    def summarize(self, run: StageRun[GroundJob]) -> GroundingStageSummary:
        return GroundingStageSummary(run, fields=self.fields)


@dataclass
class GroundCommandSummary:
    """The summary of `densecurate ground` (and of a job spec's ground step): both passes."""

    embeddings: EmbedSummary
    grounding: GroundingStageSummary

    def render(self) -> Group:
        return Group(self.embeddings.render(), self.grounding.render())


def run_ground_stage(root: Path, config: GroundConfig) -> GroundCommandSummary:
    """Embed, find duplicates, calibrate and ground every field of ``config`` under ``root``."""
    layout = DatasetLayout(root.resolve())
    for name in config.fields:
        require_scored(layout, name)  # before the embedding pass: a mistyped field costs nothing
    embeddings = run_embed_stage(root, config)
    grounding = run_stage(GroundingStage(root, config))
    return GroundCommandSummary(embeddings, grounding)
