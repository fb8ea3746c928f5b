"""Settings of the caption stage and of caption generation."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DType = Literal["auto", "bfloat16", "float16", "float32"]


class GenerationSettings(BaseModel):
    """How captions are generated; recorded with every caption."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str = Field("pixart", min_length=1, description="pixart | pixart-alt | free text with {alt_text}")
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy decoding; above 0 samples")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = Field(0, ge=0, description="sampling seed (each batch is seeded from it and its first key)")
    ignore_eos: bool = Field(False, description="always generate max_new_tokens (benchmarks)")
    repetition_ngram: int = Field(3, ge=1, description="n of the n-grams the repetition check counts")
    repetition_threshold: float = Field(
        0.3, gt=0.0, le=1.0, description="share of repeated n-grams above which a caption is flagged"
    )

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0


class ModelSettings(BaseModel):
    """Which model to load and how."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(..., min_length=1, description="hub id or local directory")
    revision: str | None = None
    dtype: DType = "auto"
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    trust_remote_code: bool = False


class CaptionConfig(BaseModel):
    """Everything `densecurate caption` runs with."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="captioner name: ROOT/captions/NAME/")
    model: ModelSettings
    generation: GenerationSettings = GenerationSettings()
    workers: int | None = Field(None, ge=1, description="model replicas (default: one per GPU, or 1 on CPU)")
    gpus_per_worker: float = Field(1.0, ge=0.0)
    ray_address: str | None = None
    repair: bool = Field(False, description="check finished outputs in depth and redo the damaged ones")
