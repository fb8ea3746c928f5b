"""Settings of the features stage (VAE latents and T5 states for training)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from schemas.validation import SETTINGS, Device, ModelReference


class FeaturesConfig(BaseModel):
    """Everything `densecurate features` runs with."""

    model_config = SETTINGS

    vae: ModelReference = Field(
        ..., min_length=1, description="AutoencoderKL: hub id or directory (a pipeline folder works)"
    )
    text_encoder: ModelReference = Field(..., min_length=1, description="T5 encoder + tokenizer: hub id or directory")
    resolution: int = Field(256, ge=8, multiple_of=8)
    max_tokens: int = Field(120, ge=1)
    batch_size: int = Field(16, ge=1)
    device: Device = Field("auto", description="auto | cpu | cuda | cuda:N")
    workers: int | None = Field(None, ge=1)
    gpus_per_worker: float = Field(1.0, ge=0.0)
    ray_address: str | None = None
    repair: bool = Field(False, description="check finished outputs in depth and redo the damaged ones")
    replace: bool = Field(False, description="let this run replace or remove finished outputs of an earlier run")
