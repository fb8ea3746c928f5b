"""Checks a curator needs on every generated caption: truncation, repetition loops, empty output."""

from __future__ import annotations

import re
from dataclasses import dataclass

# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket) before a space or the end.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]?(?=\s|$)")


@dataclass(frozen=True)
class CheckedCaption:
    """The caption to keep, and what the checks found."""

    text: str
    truncated: bool
    cut_text: str | None  # the unfinished last sentence removed from a truncated caption
    repetition: float  # share of word n-grams that repeat an earlier one
    repetitive: bool
    empty: bool


def repeated_ngram_share(text: str, n: int) -> float:
    """Share of the word n-grams of ``text`` that already occurred earlier in it (0 for short texts)."""
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def cut_unfinished_sentence(text: str) -> tuple[str, str | None]:
    """Split a length-capped caption after its last complete sentence; ``(kept, cut)``.

    A caption without any complete sentence is kept whole (``cut`` is None).
    """
    ends = list(_SENTENCE_END.finditer(text))
    if not ends:
        return text, None
    stop = ends[-1].end()
    cut = text[stop:].strip()
    return text[:stop].strip(), cut or None


def check_caption(text: str, finish_reason: str, *, ngram: int = 3, threshold: float = 0.3) -> CheckedCaption:
    """Apply every check; a truncated caption loses its unfinished last sentence."""
    text = text.strip()
    truncated = finish_reason == "length"
    cut = None
    if truncated:
        text, cut = cut_unfinished_sentence(text)
    share = repeated_ngram_share(text, ngram)
    return CheckedCaption(
        text=text,
        truncated=truncated,
        cut_text=cut,
        repetition=share,
        repetitive=share > threshold,
        empty=not text,
    )
