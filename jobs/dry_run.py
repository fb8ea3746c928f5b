"""`densecurate run SPEC --dry-run`: each step of a spec, the command it stands for and what it would do, with
nothing written and no Ray started."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.stage import Stage
from schemas.errors import OutputConflictError, UserError
from schemas.pipeline_spec import PipelineSpec


@dataclass(frozen=True)
class PlanPreview:
    """What a stage's plan would do now: shards planned, found done, to run, and finished ones it would replace."""

    planned: int
    reused: int
    replaced: int

    def line(self) -> str:
        todo = self.planned - self.reused
        replaced = f", {self.replaced} of them replacing finished shards of other settings" if self.replaced else ""
        return f"{self.planned} shards planned: {self.reused} already done, {todo} to run{replaced}"


def preview_plan(stage: Stage[Any, Any]) -> PlanPreview:
    """The stage's plan and what each job would do, read without a lock and without writing anything."""
    stage.check()
    jobs = stage.plan()
    finished = [job.finished() for job in jobs]
    replaced = sum(
        1
        for job, done in zip(jobs, finished, strict=True)
        if done is None and stage.guards_finished and job.made_from_other_inputs()
    )
    return PlanPreview(len(jobs), sum(done is not None for done in finished), replaced)


def _stages(spec: PipelineSpec, step: str) -> list[tuple[str, Callable[[], Stage[Any, Any]]]]:
    """The stages a step runs, each as (what it is, how to make it), in order."""
    from pipeline.stages.caption import CaptionStage
    from pipeline.stages.curate import CurateStage
    from pipeline.stages.embed import EmbedStage
    from pipeline.stages.features import FeaturesStage
    from pipeline.stages.merge import MergeStage
    from pipeline.stages.score import ScoreStage
    from pipeline.stages.shard import ShardStage

    root = Path(spec.root)
    if step == "shard":
        return [("shard", lambda: ShardStage([Path(p) for p in spec.shard.inputs], root, spec.shard))]
    if step == "caption":
        return [(f"caption {c.name}", lambda c=c: CaptionStage(root, c)) for c in spec.caption]
    if step == "merge":
        return [(f"merge {m.name}", lambda m=m: MergeStage(root, m)) for m in spec.merge]
    if step == "score":
        return [("score", lambda: ScoreStage(root, spec.score))]
    if step == "ground":
        return [("embed", lambda: EmbedStage(root, spec.ground))]  # grounding plans from the embeddings
    if step == "curate":
        return [("curate", lambda: CurateStage(root, Path(spec.curate.out), spec.curate))]
    if step == "features":
        return [("features", lambda: FeaturesStage(Path(spec.features.source), Path(spec.features.out), spec.features))]
    return []


def _other_step(spec: PipelineSpec, step: str) -> str:
    """What a step without a shard plan would do."""
    if step == "prepare":
        return f"writes the sample photos to {spec.prepare.sample_photos} and tiny models to {spec.prepare.tiny_models}"
    if step == "report":
        return f"prints the report of {spec.root}" + (f" and writes {spec.report.html}" if spec.report.html else "")
    if step == "ground":
        return f"then grounds the fields {', '.join(spec.ground.fields)} of the shards embedded"
    if step == "train":
        mode = "resumes" if spec.train.resume else "starts"
        return f"{mode} training with {spec.train.config} ({len(spec.train.overrides)} overrides)"
    if step == "export":
        weights = "EMA" if spec.export.ema else "raw"
        return f"exports the run's newest checkpoint ({weights} weights) to {spec.export.out}"
    return ""


def dry_run_lines(spec: PipelineSpec, steps: Sequence[str]) -> list[str]:
    """Per step, ``densecurate STEP: what it would do``; a step whose inputs an earlier step makes says so."""
    lines = []
    for step in steps:
        for name, make in _stages(spec, step):
            try:
                said = preview_plan(make()).line()
            except OutputConflictError as exc:
                said = f"would be refused: {str(exc).splitlines()[0]}"
            except UserError as exc:
                said = f"plans after the earlier steps ({str(exc).splitlines()[0]})"
            lines.append(f"densecurate {name}: {said}")
        if other := _other_step(spec, step):
            lines.append(f"densecurate {step}: {other}")
    return lines
