"""The curate stage: keep the samples whose chosen caption passes the rules, as new webdataset shards.

``OUT/NNNNN.tar`` (``KEY.jpg``, ``KEY.txt`` = the chosen caption, ``KEY.json`` = the sample's metadata
plus its density) and ``OUT/NNNNN.parquet`` (every written sample of shard N: kept, or removed with
the first rule it failed) and ``OUT/NNNNN_stats.json``. Resumable per shard like every stage.

With several fields the first decides (``KEY.txt``, the rules' verdict, the Parquet row) and each sample kept
also gets ``KEY.captions.json``: the first field's caption, then every other field's caption that passes the
caption rules, each with its scores (nouns, valid nouns, and from a current grounding its grounded nouns, grounded
share and CLIP score), for training that samples among an image's captions.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
from rich.console import Group, RenderableType
from rich.text import Text

from pipeline.core.runner import run_stage
from pipeline.core.stage import (
    ShardFilesJob,
    Stage,
    StageRun,
    StageSummary,
    Tasks,
    file_digest,
    fingerprint,
    shards_table,
)
from pipeline.store.catalog import sql_string
from pipeline.store.freshness import current_density, current_grounding
from pipeline.store.guards import require_complete
from pipeline.store.parquet_meta import read_meta
from pipeline.store.shard_reading import read_shard_stats, stats_of
from pipeline.store.shard_writer import ShardWriter
from pipeline.store.verify import checked_samples, damaged_shard
from schemas.errors import DamagedOutputError, MissingInputError
from schemas.layout import DatasetLayout
from schemas.score_config import ALT_TEXT_FIELD, CurateConfig, CurateRules
from schemas.tables import CURATED_SCHEMA

HEAVY_RULE_SHARE = 0.5  # a rule that removes more of what it sees than this is named in a warning
# The rules in the order they are checked; a removed sample's reason is the first it fails.
RULE_ORDER = (
    "missing_caption",
    "min_words",
    "drop_flagged",
    "min_nouns",
    "min_valid_nouns",
    "min_clip_score",
    "min_grounded_nouns",
    "min_grounded_share",
    "drop_near_duplicates",
)
DENSITY_COLUMNS = ("caption", "n_tokens", "n_nouns", "n_valid_nouns", "flagged")
GROUNDING_COLUMNS = ("clip_score", "n_grounded_nouns", "grounded_share", "duplicate_of")


@dataclass(frozen=True, kw_only=True)
class CurateJob(ShardFilesJob):
    """One source shard of ``root`` to curate into ``out_dir`` (same index)."""

    root: Path
    field: str
    rules: CurateRules
    grounding: Path | None = None  # the shard's grounding table, with grounding rules (or several fields)
    duplicates: Path | None = None  # the grounding model's duplicate clusters, with drop_near_duplicates
    others: tuple[tuple[str, Path | None], ...] = ()  # further fields, each with its grounding table (or None)

    def damage(self) -> str | None:
        """Also damaged: a curated shard that holds fewer rows than its source shard has written samples."""
        if problem := super().damage():
            return problem
        rows, written = (
            stats_of(self.files)["count"],
            read_shard_stats(DatasetLayout(self.root), self.index)["successes"],
        )
        return f"it holds {rows} of its source shard's {written} written samples" if rows != written else None


def _candidates(
    job: CurateJob, field_name: str, grounding: Path | None, duplicates: Path | None = None
) -> list[dict[str, Any]]:
    """The shard's written samples with the field's caption, its density and flags (DuckDB join)."""
    layout = DatasetLayout(job.root)
    density = sql_string(str(layout.density_file(field_name, job.index)))
    vocab = sql_string(str(layout.vocab_file(field_name)))
    shard = sql_string(str(layout.shard_files(job.index).parquet))
    if field_name == ALT_TEXT_FIELD:
        caption, flagged, captions_join = "s.alt_text", "false", ""
    else:
        caption = "CASE WHEN c.status = 'ok' THEN c.caption END"
        flagged = "coalesce(c.truncated OR c.repetitive OR c.empty, false)"
        captions_join = (
            f"LEFT JOIN read_parquet({sql_string(str(layout.caption_file(field_name, job.index)))}) c USING (key)"
        )
    grounded, grounding_join = ", ".join(f"NULL AS {c}" for c in GROUNDING_COLUMNS[:3]), ""
    if grounding is not None:
        grounded = ", ".join(f"g.{c}" for c in GROUNDING_COLUMNS[:3])
        grounding_join = f"LEFT JOIN read_parquet({sql_string(str(grounding))}) g USING (key)"
    duplicate, duplicates_join = "NULL", ""
    if duplicates is not None:
        duplicate = "CASE WHEN NOT dup.kept THEN dup.cluster END"
        duplicates_join = f"LEFT JOIN read_parquet({sql_string(str(duplicates))}) dup USING (key)"
    sql = f"""
        WITH d AS (SELECT * FROM read_parquet({density})),
        valid AS (
            SELECT x.key, count(*) AS n_valid
            FROM (SELECT key, unnest(nouns) AS noun FROM d) x
            JOIN (SELECT noun FROM read_parquet({vocab}) WHERE valid) v USING (noun)
            GROUP BY x.key
        )
        SELECT s.key, {caption} AS caption, {flagged} AS flagged, d.n_tokens, d.n_nouns,
               coalesce(valid.n_valid, 0) AS n_valid_nouns, d.nouns,
               {grounded}, {duplicate} AS duplicate_of
        FROM read_parquet({shard}) s
        {captions_join}
        {grounding_join}
        {duplicates_join}
        LEFT JOIN d USING (key)
        LEFT JOIN valid USING (key)
        WHERE s.status = 'ok'
        ORDER BY s.key
    """
    with duckdb.connect() as con:
        try:
            cursor = con.execute(sql)
        except (duckdb.InvalidInputException, duckdb.IOException) as exc:  # a table cut short or garbled
            raise DamagedOutputError(
                f"a table of shard {job.index} under {job.root} does not read ({str(exc).splitlines()[0]}): "
                f"`densecurate verify {job.root}` lists the damaged outputs, and rerunning the stage that wrote it "
                "with --repair rewrites them"
            ) from None
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
    return _failed_grounding_rule(sample, rules)


def _failed_grounding_rule(sample: dict[str, Any], rules: CurateRules) -> tuple[str, str] | None:
    """The first grounding rule (CLIP score, grounded nouns, near-duplicates) the sample fails, if any."""
    score = sample.get("clip_score")
    if rules.min_clip_score is not None and (score is None or score < rules.min_clip_score):
        shown = "no score" if score is None else f"{score:.2f}"
        return "min_clip_score", f"image-caption score {shown} < {rules.min_clip_score}"
    grounded = sample.get("n_grounded_nouns") or 0
    if grounded < rules.min_grounded_nouns:
        return "min_grounded_nouns", f"{grounded} grounded nouns < {rules.min_grounded_nouns}"
    share = sample.get("grounded_share") or 0.0
    if share < rules.min_grounded_share:
        return "min_grounded_share", f"grounded share {share:.2f} < {rules.min_grounded_share}"
    if rules.drop_near_duplicates and sample.get("duplicate_of"):
        return "drop_near_duplicates", f"a duplicate of {sample['duplicate_of']} (kept)"
    return None


def caption_entry(field_name: str, sample: dict[str, Any]) -> dict[str, Any]:
    """One caption of ``KEY.captions.json``: its text and field, and the scores training may weight it by."""
    return {
        "text": sample["caption"] or "",
        "field": field_name,
        "nouns": sample["n_nouns"] or 0,
        "valid_nouns": sample["n_valid_nouns"],
        "grounded_nouns": sample.get("n_grounded_nouns"),
        "grounded_share": sample.get("grounded_share"),
        "clip_score": sample.get("clip_score"),
    }


def _captions(job: CurateJob, key: str, sample: dict[str, Any], others: dict[str, dict[str, dict]]) -> list[dict]:
    """The kept sample's captions: the first field's, then each other field's that has text and passes the caption
    rules (near-duplicates are judged once, on the sample)."""
    captions = [caption_entry(job.field, sample)]
    for name, rows in others.items():
        other = rows.get(key)
        if other is not None and (other["caption"] or "").strip() and first_failed_rule(other, job.rules) is None:
            captions.append(caption_entry(name, other))
    return captions


def curate_shard(job: CurateJob) -> dict[str, Any]:
    """Write one curated shard; returns its stats."""
    candidates = {s["key"]: s for s in _candidates(job, job.field, job.grounding, job.duplicates)}
    others = {name: {s["key"]: s for s in _candidates(job, name, grounding)} for name, grounding in job.others}
    extra: dict[str, Any] = {"source_shard": job.index, "inputs_fingerprint": job.fingerprint}
    kept_by_field: Counter[str] = Counter()
    tar = DatasetLayout(job.root).shard_files(job.index).tar
    read = set()
    with ShardWriter(job.files, extra, schema=CURATED_SCHEMA) as writer:
        for key, members in checked_samples(tar):
            read.add(key)
            sample = candidates[key]
            row = {k: sample[k] for k in (*DENSITY_COLUMNS, *GROUNDING_COLUMNS)}
            row["field"] = job.field
            failed = first_failed_rule(sample, job.rules)
            if failed:
                writer.add_skipped(key, *failed, row)
                continue
            meta = json.loads(members["json"])
            meta["caption_field"] = job.field
            meta["density"] = {k: sample[k] for k in ("n_tokens", "n_nouns", "n_valid_nouns", "nouns")}
            if job.grounding is not None:
                meta["grounding"] = {k: sample[k] for k in GROUNDING_COLUMNS[:3]}
            files = {"jpg": members["jpg"], "json": json.dumps(meta)}
            if sample["caption"]:
                files["txt"] = sample["caption"]
            if job.others:
                captions = _captions(job, key, sample, others)
                files["captions.json"] = json.dumps(captions)
                row["n_captions"] = len(captions)
                kept_by_field.update(c["field"] for c in captions if c["text"])
            writer.add_sample(key, files, row)
        if missing := candidates.keys() - read:
            raise damaged_shard(tar, f"{len(missing)} written samples have no members in the tar")
        if job.others:
            extra["captions_by_field"] = {name: kept_by_field[name] for name in (job.field, *others)}
    return writer.stats


@dataclass
class CurateSummary(StageSummary):
    """Totals over every shard (reused ones included)."""

    field: str
    out_dir: Path
    inputs: int = 0
    kept: int = 0
    removed_by_rule: Counter[str] = field(default_factory=Counter)
    captions_by_field: Counter[str] = field(default_factory=Counter)  # with several fields: captions kept

    def heavy_rules(self) -> list[tuple[str, int, int]]:
        """``(rule, removed, seen)`` of each rule that removed more than ``HEAVY_RULE_SHARE`` of the samples it
        saw (those no earlier rule removed)."""
        heavy, seen = [], self.inputs
        for rule in RULE_ORDER:
            removed = self.removed_by_rule.get(rule, 0)
            if seen and removed > HEAVY_RULE_SHARE * seen:
                heavy.append((rule, removed, seen))
            seen -= removed
        return heavy

    def render(self) -> RenderableType:
        """Samples, removals per rule (in rule order), kept, shards; a warning for each rule that removed more
        than half of what it saw."""
        removed = [(f"  removed by {rule}", str(self.removed_by_rule.get(rule, 0))) for rule in RULE_ORDER]
        rows = [
            ("samples", str(self.inputs)),
            *removed,
            ("kept", str(self.kept)),
            *((f"  captions kept from {name}", str(n)) for name, n in self.captions_by_field.items()),
            self.shards_row(),
        ]
        table = shards_table(f"curate {self.field} -> {self.out_dir}", rows)
        warnings = [
            Text(
                f"warning: rule {rule} removed {removed:,} of the {seen:,} samples it saw ({removed / seen:.0%}); "
                "check its threshold",
                style="yellow",
            )
            for rule, removed, seen in self.heavy_rules()
        ]
        return Group(table, *warnings) if warnings else table


def _require_every_key_captioned(layout: DatasetLayout, name: str, index: int) -> None:
    """Refuse a captioner field that holds a sample (`caption --sample`): curating it would drop every
    key left out of the sample."""
    meta = read_meta(layout.caption_file(name, index))
    if meta is not None and meta.get("sample") is not None:
        raise MissingInputError(
            f"{name!r} holds a sample ({meta['stats']['count']} keys of shard {index} captioned): caption every key "
            f"(`densecurate caption {layout.root} --name {name} ...` without --sample; the sampled rows are kept), "
            "then score it, before curating"
        )


class CurateStage(Stage[CurateJob, CurateSummary]):
    """Keep the samples whose chosen caption passes the rules, shard by shard, in Ray tasks."""

    label = "curate"
    accepts_replace = True

    def __init__(self, root: Path, out_dir: Path, config: CurateConfig) -> None:
        self.layout = layout = DatasetLayout(root.resolve())
        self.out_dir = out_dir.resolve()
        self.config = config
        self.ray_address = config.ray_address
        self.local_cpus = config.workers
        captions = tuple(layout.captions_dir(f) for f in config.fields if f != ALT_TEXT_FIELD)
        density = tuple(layout.density_dir(f) for f in config.fields)
        grounded = config.rules.needs_grounding or len(config.fields) > 1
        grounding = tuple(layout.grounding_dir(f) for f in config.fields) if grounded else ()
        self.inputs = (layout.shards_dir, *captions, *density, layout.vocab_dir, *grounding)
        self.outputs = (self.out_dir,)
        self.replace, self.repair = config.replace, config.repair

    def plan(self) -> list[CurateJob]:
        """A job per shard; needs every field scored (density and vocabulary) from its current texts."""
        layout, name = self.layout, self.config.field
        settings = name + self.config.rules.model_dump_json()
        for field_name in self.config.fields:
            vocab = layout.vocab_file(field_name)
            if not vocab.is_file():
                command = f"densecurate score {layout.root} --field {field_name}"
                raise MissingInputError(f"{field_name!r} is not scored under {layout.root}: run `{command}` first")
            settings += file_digest(vocab)
        if len(self.config.fields) > 1:
            settings += ",".join(self.config.fields)
        jobs = []
        for index in require_complete(layout.shards_dir).finished:
            density = current_density(self.layout, name, index)
            if name != ALT_TEXT_FIELD:
                _require_every_key_captioned(layout, name, index)
            grounding, duplicates, upstream = self._grounding_inputs(index, density["fingerprint"])
            others = []
            for other in self.config.fields[1:]:
                other_density = current_density(self.layout, other, index)
                upstream += other_density["fingerprint"]
                other_grounding = self._current_grounding(other, index, other_density["fingerprint"])
                if other_grounding is not None:
                    upstream += other_grounding[1]["fingerprint"]
                others.append((other, other_grounding and other_grounding[0]))
            jobs.append(
                CurateJob(
                    index=index,
                    out_dir=self.out_dir,
                    fingerprint=fingerprint(settings, density["fingerprint"] + upstream),
                    root=layout.root,
                    field=name,
                    rules=self.config.rules,
                    grounding=grounding,
                    duplicates=duplicates,
                    others=tuple(others),
                )
            )
        return jobs

    def _current_grounding(self, name: str, index: int, density_fingerprint: str) -> tuple[Path, dict[str, Any]] | None:
        """The field's grounding table of shard ``index`` and its metadata when it was made from the current
        density; required (else refused) when the rules read grounding."""
        density = {"fingerprint": density_fingerprint}
        grounding = current_grounding(self.layout, name, index, density, required=self.config.rules.needs_grounding)
        return None if grounding is None else (self.layout.grounding_file(name, index), grounding)

    def _grounding_inputs(self, index: int, density_fingerprint: str) -> tuple[Path | None, Path | None, str]:
        """The shard's grounding table and the duplicates file the rules read, and their fingerprints."""
        rules, layout, name = self.config.rules, self.layout, self.config.field
        if not rules.needs_grounding and len(self.config.fields) == 1:
            return None, None, ""
        current = self._current_grounding(name, index, density_fingerprint)
        if current is None:
            return None, None, ""
        path, grounding = current
        if not rules.drop_near_duplicates:
            return path, None, grounding["fingerprint"]
        command = f"densecurate ground {layout.root} --field {name} --clip-model MODEL"
        duplicates = layout.duplicates_file(grounding["model"])
        clusters = read_meta(duplicates)
        if clusters is None:
            raise MissingInputError(f"no duplicates of {grounding['model']} under {layout.root}: run `{command}`")
        return path, duplicates, grounding["fingerprint"] + clusters["fingerprint"]

    def work(self) -> Tasks:
        return Tasks(curate_shard, workers=self.config.workers)

    def summarize(self, run: StageRun[CurateJob]) -> CurateSummary:
        summary = CurateSummary(run, field=self.config.field, out_dir=self.out_dir)
        for stats in run.stats:
            summary.inputs += stats["count"]
            summary.kept += stats["successes"]
            summary.removed_by_rule.update(stats["skipped_by_reason"])
            summary.captions_by_field.update(stats.get("captions_by_field", {}))
        return summary


def run_curate_stage(root: Path, out_dir: Path, config: CurateConfig) -> CurateSummary:
    """Curate every shard of ``root`` into ``out_dir``."""
    return run_stage(CurateStage(root, out_dir, config))
