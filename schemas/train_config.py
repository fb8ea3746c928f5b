"""The training config of the PixArt-α alignment stage (YAML in, dotted overrides, clear errors out)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, model_validator

from schemas.errors import ConfigError
from schemas.validation import SETTINGS, load_yaml, validated


class _Strict(BaseModel):
    model_config = SETTINGS


def _on_off(value: Any) -> Any:
    """YAML reads ``on``/``off`` (and ``true``/``false``) as booleans: they mean ``"on"``/``"off"``."""
    return ("on" if value else "off") if isinstance(value, bool) else value


# A GPU path: ``auto`` (on for CUDA, off on CPU), ``on`` or ``off``.
Switch = Annotated[Literal["auto", "on", "off"], BeforeValidator(_on_off)]


class ModelConfig(_Strict):
    """A diffusers PixArt checkpoint (``pretrained``, subfolder ``transformer``) or sizes to build one."""

    pretrained: str | None = Field(None, description="hub id or directory of a PixArt pipeline or transformer")
    preset: Literal["xl-2"] | None = Field(None, description="xl-2: 28 blocks, 16 heads x 72, patch 2 (~0.6B)")
    num_layers: int = Field(28, ge=1)
    num_attention_heads: int = Field(16, ge=1)
    attention_head_dim: int = Field(72, ge=1)
    patch_size: int = Field(2, ge=1)
    caption_channels: int = Field(4096, ge=1, description="T5 hidden size (4096 for T5 v1.1 XXL)")
    gradient_checkpointing: bool = Field(
        False, description="recompute each block's activations in the backward: less memory, one more forward per step"
    )

    @model_validator(mode="after")
    def _preset_sizes(self) -> ModelConfig:
        if self.preset == "xl-2":
            xl = {"num_layers": 28, "num_attention_heads": 16, "attention_head_dim": 72, "patch_size": 2}
            wrong = {k: getattr(self, k) for k, v in xl.items() if getattr(self, k) != v}
            if wrong:
                raise ValueError(f"preset xl-2 fixes {', '.join(wrong)}; leave them out or drop the preset")
        return self


class DataConfig(_Strict):
    source: Literal["features", "curated"] = Field(
        "features", description="features: precomputed shards; curated: images + captions, encoders run online"
    )
    features: str | None = Field(None, description="folder of feature shards (densecurate features --out)")
    curated: str | None = Field(None, description="folder of curated shards (densecurate curate --out)")
    batch_size: int = Field(178, ge=1, description="per worker")
    num_workers: int = Field(4, ge=0, description="DataLoader processes")
    max_tokens: int = Field(120, ge=1, description="T5 tokens per caption (padded)")
    caption_sampling: Literal["first", "uniform", "weighted"] = Field(
        "first",
        description="a sample with several captions (KEY.captions.json): train on the first, one drawn uniformly, "
        "or one drawn with probability softmax(caption_weight / caption_temperature), per sample and step",
    )
    caption_weight: Literal["nouns", "valid_nouns", "grounded_nouns", "grounded_share", "clip_score"] = Field(
        "grounded_nouns", description="the score weighted sampling draws by (a caption without it is not drawn)"
    )
    caption_temperature: float = Field(1.0, gt=0, description="weighted sampling: higher flattens the weights")

    @model_validator(mode="after")
    def _source_folder(self) -> DataConfig:
        if getattr(self, self.source) is None:
            raise ValueError(f"data.source is {self.source!r}: set data.{self.source} to its folder")
        return self


class DiffusionConfig(_Strict):
    num_train_timesteps: int = Field(1000, ge=2)
    beta_start: float = Field(1e-4, gt=0, lt=1)
    beta_end: float = Field(0.02, gt=0, lt=1)
    loss: Literal["hybrid", "mse"] = "hybrid"


class OptimConfig(_Strict):
    lr: float = Field(2e-5, gt=0, le=1)
    weight_decay: float = Field(0.03, ge=0)
    eps: float = Field(1e-10, gt=0)
    warmup_steps: int = Field(1000, ge=0)
    grad_clip: float = Field(0.01, gt=0)
    ema_decay: float = Field(0.9999, ge=0, lt=1)
    fused: Switch = Field("auto", description="fused AdamW kernel (CUDA and CPU); auto: on CUDA")


class TrainConfig(_Strict):
    """Everything `densecurate train` runs with."""

    run_dir: str = Field(..., min_length=1)
    pipeline: str = Field(..., min_length=1, description="PixArt pipeline (VAE, T5, tokenizer) for samples and export")
    resolution: int = Field(256, ge=8, multiple_of=8)
    model: ModelConfig = ModelConfig()
    data: DataConfig
    diffusion: DiffusionConfig = DiffusionConfig()
    optim: OptimConfig = OptimConfig()
    steps: int = Field(150_000, ge=1)
    caption_dropout: float = Field(0.1, ge=0, le=1)
    mixed_precision: Literal["auto", "bf16", "no"] = Field("auto", description="auto: bf16 autocast on GPU")
    compile: Switch = Field("auto", description="torch.compile the transformer's training forward; auto: on CUDA")
    tf32: bool = Field(True, description="TF32 for fp32 matmuls and convolutions on CUDA")
    seed: int = 0
    checkpoint_every: int = Field(1000, ge=1)
    log_every: int = Field(10, ge=1)
    sample_every: int = Field(0, ge=0, description="0: no sample grids")
    sample_prompts: tuple[str, ...] = ("a photo of a cat",)
    sample_steps: int = Field(20, ge=1)
    workers: int = Field(1, ge=1, description="Ray Train workers (DDP); 1 runs in this process")
    nan_tolerance: int = Field(
        0,
        ge=0,
        description="steps with a NaN/infinite loss or gradients the run may skip (no update) before it stops; "
        "0: the first one stops training",
    )
    use_gpu: bool | None = Field(None, description="default: when CUDA is available")


def set_dotted(config: dict[str, Any], dotted: str) -> None:
    """Apply ``a.b.c=value`` (the value parsed as YAML) to a nested dict."""
    if "=" not in dotted:
        raise ConfigError(f"override {dotted!r} must look like key.path=value")
    path, raw = dotted.split("=", 1)
    *parents, leaf = path.strip().split(".")
    node = config
    for name in parents:
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {name} is not a section")
    node[leaf] = load_yaml(raw, f"override {dotted!r}")


def load_train_config(text: str, overrides: list[str], source: str = "config") -> TrainConfig:
    """Parse YAML, apply overrides, validate; errors name the field at fault."""
    data = load_yaml(text, source) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    for item in overrides:
        set_dotted(data, item)
    return validated(TrainConfig, data, source)
