"""Settings of `densecurate merge`: a caption field holding each key's best caption among several fields."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from schemas.score_config import ALT_TEXT_FIELD
from schemas.validation import SETTINGS, SimpleName

# What "best" means: the most nouns found in the image, the most valid nouns, or the highest image-caption score.
MergeRule = Literal["grounded_nouns", "valid_nouns", "clip_score"]


class MergeConfig(BaseModel):
    """Everything `densecurate merge` runs with."""

    model_config = SETTINGS

    name: SimpleName = Field(..., description="the merged field: ROOT/captions/NAME/")
    fields: tuple[SimpleName, ...] = Field(
        ..., min_length=2, description="alt_text and/or captioners to choose from; ties go to the one listed first"
    )
    by: MergeRule = Field(
        "grounded_nouns",
        description="the best caption: most nouns found in the image, most valid nouns, top CLIP score",
    )
    workers: int | None = Field(None, ge=1)
    ray_address: str | None = None
    repair: bool = Field(False, description="check finished outputs in depth and redo the damaged ones")

    @model_validator(mode="after")
    def _fields_are_distinct_sources(self) -> MergeConfig:
        if len(set(self.fields)) != len(self.fields):
            raise ValueError(f"fields {', '.join(self.fields)} name a field twice")
        if self.name in self.fields or self.name == ALT_TEXT_FIELD:
            raise ValueError(f"name {self.name!r} is a source field: give the merged field a name of its own")
        return self

    @property
    def needs_grounding(self) -> bool:
        """Whether the rule reads the fields' grounding (``densecurate ground``)."""
        return self.by != "valid_nouns"
