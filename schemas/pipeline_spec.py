"""A pipeline spec (job spec): the stages to run on one dataset root, with each stage's settings and resources.

YAML in, every field validated before anything runs or is submitted. Relative paths are taken from
the directory the command runs in (``resolve_paths``); on a cluster they must be on shared storage.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, model_validator

from schemas.caption_config import CaptionConfig
from schemas.features_config import FeaturesConfig
from schemas.ground_config import GroundConfig
from schemas.merge_config import MergeConfig
from schemas.score_config import CurateConfig, ScoreConfig
from schemas.shard_config import ShardConfig
from schemas.validation import SETTINGS, SimpleName, load_yaml, read_input_text, validated


class _Strict(BaseModel):
    model_config = SETTINGS


class PrepareStep(_Strict):
    """Offline inputs for demos and tests: the bundled sample photos and tiny models."""

    sample_photos: str | None = Field(None, description="write the bundled sample photos here (a folder source)")
    tiny_models: str | None = Field(None, description="write tiny random-weight models here (llava, pixart, clip)")


class ShardStep(ShardConfig):
    inputs: list[str] = Field(..., min_length=1, description="source paths (folders, tars, tables)")


class CurateStep(CurateConfig):
    out: str = Field(..., min_length=1, description="folder of the curated shards")


class FeaturesStep(FeaturesConfig):
    source: str = Field(..., min_length=1, description="curated shards to encode")
    out: str = Field(..., min_length=1, description="folder of the feature shards")


class TrainStep(_Strict):
    config: str = Field(..., min_length=1, description="training config YAML")
    overrides: list[str] = Field(default_factory=list, description="key.path=value overrides")
    resume: bool = True
    overwrite: bool = Field(False, description="delete run_dir's old run first (needs resume: false)")
    allow_config_change: bool = Field(False, description="resume even when the config changed (recorded)")
    nan_tolerance: int | None = Field(
        None, ge=0, description="non-finite steps to skip before training stops (overrides the config's)"
    )

    @model_validator(mode="after")
    def _overwrite_or_resume(self) -> TrainStep:
        if self.overwrite and self.resume:
            raise ValueError("overwrite: true deletes the run that resume: true continues; set resume: false")
        return self


class ExportStep(_Strict):
    out: str = Field(..., min_length=1)
    ema: bool = True


class ReportStep(_Strict):
    html: str | None = None


class PipelineSpec(_Strict):
    """Stages run in this order, each only when present: prepare, shard, caption, merge, score, ground, report,
    curate, features, train, export. Each stage skips the work it finds done. A caption entry with a keys query,
    and the merge step, first run the score and ground steps on the fields made so far."""

    name: SimpleName = Field(..., description="the spec's name (letters, digits, '-', '_', '.')")
    root: str = Field(..., min_length=1, description="the dataset root")
    prepare: PrepareStep | None = None
    shard: ShardStep | None = None
    caption: list[CaptionConfig] = Field(default_factory=list, description="one entry per captioner")
    merge: list[MergeConfig] = Field(default_factory=list, description="one entry per merged field")
    score: ScoreConfig | None = None
    ground: GroundConfig | None = None
    report: ReportStep | None = None
    curate: CurateStep | None = None
    features: FeaturesStep | None = None
    train: TrainStep | None = None
    export: ExportStep | None = None


STAGES = (
    "prepare",
    "shard",
    "caption",
    "merge",
    "score",
    "ground",
    "report",
    "curate",
    "features",
    "train",
    "export",
)


LOCAL_CLIP = "local-dir:"  # an open_clip model in a local folder


def parse_spec(text: str, source: str = "spec") -> PipelineSpec:
    """Validate a YAML spec; an error names the file and the field at fault."""
    return validated(PipelineSpec, load_yaml(text, source) or {}, source)


def local_path(value: str, base: Path) -> str:
    """``value`` made absolute against ``base``."""
    return value if Path(value).is_absolute() else str(base / value)


def model_path(value: str, base: Path) -> str:
    """A model reference: a local folder when it starts with ``/``, ``./`` or ``../`` or exists under
    ``base`` (then made absolute); otherwise a hub id, left as it is."""
    if value.startswith(("/", "./", "../")) or (base / value).exists():
        return local_path(value, base)
    return value


def _train_overrides(train: TrainStep, base: Path) -> list[str]:
    """The step's overrides plus absolute forms of the training config's own paths (each once: resolving a
    resolved spec again gives the same list)."""
    from schemas.train_config import load_train_config

    config = load_train_config(read_input_text(train.config, "training config"), train.overrides, source=train.config)
    fixed = [f"run_dir={local_path(config.run_dir, base)}", f"pipeline={model_path(config.pipeline, base)}"]
    for key in ("features", "curated"):
        value = getattr(config.data, key)
        if value is not None:
            fixed.append(f"data.{key}={local_path(value, base)}")
    fixed_keys = {item.split("=", 1)[0] for item in fixed}
    return [*(item for item in train.overrides if item.split("=", 1)[0].strip() not in fixed_keys), *fixed]


def resolve_paths(spec: PipelineSpec, base: Path) -> PipelineSpec:
    """The spec with every local path made absolute against ``base``, so a job anywhere finds them."""
    data = spec.model_dump()
    data["root"] = local_path(spec.root, base)
    if spec.prepare:
        data["prepare"] = {k: v and local_path(v, base) for k, v in data["prepare"].items()}
    if spec.shard:
        data["shard"]["inputs"] = [local_path(p, base) for p in spec.shard.inputs]
    for caption in data["caption"]:
        caption["model"]["model"] = model_path(caption["model"]["model"], base)
    if spec.ground and spec.ground.clip.model.startswith(LOCAL_CLIP):
        folder = spec.ground.clip.model.removeprefix(LOCAL_CLIP)
        data["ground"]["clip"]["model"] = LOCAL_CLIP + local_path(folder, base)
    for step, keys in (("curate", ("out",)), ("features", ("source", "out")), ("export", ("out",))):
        for key in keys if data.get(step) else ():
            data[step][key] = local_path(data[step][key], base)
    if spec.features:
        for key in ("vae", "text_encoder"):
            data["features"][key] = model_path(data["features"][key], base)
    if spec.train:
        data["train"]["config"] = local_path(spec.train.config, base)
        data["train"]["overrides"] = _train_overrides(TrainStep.model_validate(data["train"]), base)
    if spec.report and spec.report.html:
        data["report"]["html"] = local_path(spec.report.html, base)
    return PipelineSpec.model_validate(data)
