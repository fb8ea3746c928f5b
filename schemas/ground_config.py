"""Settings of the ground stage: CLIP image embeddings, image-caption scores, grounded nouns, near-duplicates."""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator

from schemas.score_config import ALT_TEXT_FIELD
from schemas.validation import SETTINGS, Device, SimpleName

DEFAULT_NOUN_PROMPTS = ("a photo of a {}.", "a photo of the {}.", "a picture of a {}.", "an image of a {}.")


class ClipSettings(BaseModel):
    """Which open_clip model embeds images and texts (named as ``densecurate eval`` takes them)."""

    model_config = SETTINGS

    model: str = Field(..., min_length=1, description="open_clip name (ViT-L-14), hf-hub:REPO or local-dir:DIR")
    pretrained: str | None = Field(None, description="open_clip weights tag (openai) or file; unused for local-dir")


class GroundingSettings(BaseModel):
    """How a noun is judged grounded in an image (docs/GROUNDING.md has the rule)."""

    model_config = SETTINGS

    noun_prompts: tuple[str, ...] = Field(
        DEFAULT_NOUN_PROMPTS, min_length=1, description="prompt ensemble per noun; {} is the noun"
    )
    z_threshold: float = Field(
        2.0, description="a noun is grounded when its z against its calibration is at least this"
    )
    min_negatives: int = Field(
        20, ge=2, description="a noun with fewer reference images not naming it is judged against the pooled statistics"
    )
    min_std: float = Field(0.5, gt=0.0, description="floor of a noun's standard deviation (in 100 * cosine)")
    calibration_images: int = Field(
        20_000, ge=2, description="reference images the calibration reads (whole shards, evenly spaced)"
    )
    max_sentences: int = Field(32, ge=1, description="sentences of a caption scored (the first ones)")

    @field_validator("noun_prompts")
    @classmethod
    def _one_placeholder(cls, prompts: tuple[str, ...]) -> tuple[str, ...]:
        for prompt in prompts:
            if prompt.count("{}") != 1:
                raise ValueError(f"noun prompt {prompt!r} must hold exactly one {{}} (where the noun goes)")
        return prompts


class DuplicateSettings(BaseModel):
    """Near-duplicate search over a CLIP model's image embeddings."""

    model_config = SETTINGS

    threshold: float = Field(0.95, gt=0.0, le=1.0, description="cosine at or above which two images are duplicates")
    exact_limit: int = Field(200_000, ge=1, description="up to this many images: exact search; above: IVF")
    nprobe: int = Field(16, ge=1, description="IVF lists probed per query")


class GroundConfig(BaseModel):
    """Everything `densecurate ground` runs with."""

    model_config = SETTINGS

    fields: tuple[SimpleName, ...] = Field((ALT_TEXT_FIELD,), min_length=1, description="alt_text and/or captioners")
    clip: ClipSettings
    grounding: GroundingSettings = GroundingSettings()
    duplicates: DuplicateSettings = DuplicateSettings()
    batch_size: int = Field(64, ge=1, description="images (and texts) per forward pass")
    device: Device = Field("auto", description="auto | cpu | cuda | cuda:N")
    workers: int | None = Field(None, ge=1)
    gpus_per_worker: float = Field(1.0, ge=0.0)
    ray_address: str | None = None
    repair: bool = Field(False, description="check finished outputs in depth and redo the damaged ones")
    replace: bool = Field(
        False, description="let this run replace grounding an earlier run made with another CLIP model or rule"
    )
