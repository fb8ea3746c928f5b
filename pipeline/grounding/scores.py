"""Grounding arithmetic: sentence scores, noun prompt ensembles, per-noun calibration and the grounded decision.

Scores are 100 * cosine of L2-normalised CLIP embeddings. A noun of a caption is *grounded* in its image
when the image scores high for the noun's prompts compared with how the same noun scores on reference
images whose captions do not name it (its negatives)::

    z = (score(image, noun) - mean_neg(noun)) / max(std_neg(noun), min_std)     grounded  <=>  z >= z_threshold

A noun with fewer than ``min_negatives`` negatives (a tiny reference set, or a noun nearly every caption
names) is judged against the pooled statistics of every noun's negatives instead (``fallback``).
The negatives' sums come from the Gram matrix of the reference embeddings, so calibrating V nouns on
R images costs O((R + V) * d^2), not O(R * V * d).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from schemas.ground_config import GroundingSettings

SCALE = 100.0  # scores are 100 * cosine, as CLIP score
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def split_sentences(text: str, max_sentences: int) -> list[str]:
    """The caption's first ``max_sentences`` sentences (split after ``.``, ``!``, ``?`` and at line breaks)."""
    parts = [s.strip() for s in _SENTENCE_END.split(text)]
    return [s for s in parts if s][:max_sentences]


def noun_prompts(nouns: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template filled with every noun, noun after noun (``len(nouns) * len(templates)`` texts)."""
    return [template.format(noun) for noun in nouns for template in templates]


def ensemble(text_embeddings: np.ndarray, templates: int) -> np.ndarray:
    """Per noun, the normalised mean of its prompts' normalised embeddings (rows grouped noun after noun)."""
    grouped = text_embeddings.reshape(-1, templates, text_embeddings.shape[-1]).mean(axis=1)
    return grouped / np.maximum(np.linalg.norm(grouped, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class Calibration:
    """Per noun: its ensemble text embedding and the statistics its z is computed against."""

    nouns: list[str]
    text_embeddings: np.ndarray  # (V, d) float32, normalised
    mean: np.ndarray  # (V,)
    std: np.ndarray  # (V,) floored at min_std
    pooled_mean: float
    pooled_std: float

    @cached_property
    def positions(self) -> dict[str, int]:
        """Each noun's row."""
        return {noun: i for i, noun in enumerate(self.nouns)}


def calibrate(
    images: np.ndarray,
    named: Sequence[set[str]],
    nouns: Sequence[str],
    text_embeddings: np.ndarray,
    settings: GroundingSettings,
) -> tuple[Calibration, list[dict[str, Any]]]:
    """Calibrate ``nouns`` on reference ``images`` (R x d, normalised) whose captions name ``named[i]``.

    Returns the calibration and one row per noun (the calibration table's statistics, without embeddings).
    """
    e = images.astype(np.float64)
    t = text_embeddings.astype(np.float64)
    total = SCALE * (t @ e.sum(axis=0))  # per noun: sum of its scores over every reference image
    total_sq = SCALE**2 * np.einsum("vd,de,ve->v", t, e.T @ e, t)
    index = {noun: i for i, noun in enumerate(nouns)}
    pairs = [(i, index[n]) for i, names in enumerate(named) for n in names if n in index]
    pos_count = np.zeros(len(nouns))
    pos_sum = np.zeros(len(nouns))
    pos_sq = np.zeros(len(nouns))
    if pairs:
        rows, cols = np.array(pairs).T
        scores = SCALE * np.einsum("pd,pd->p", e[rows], t[cols])
        np.add.at(pos_count, cols, 1)
        np.add.at(pos_sum, cols, scores)
        np.add.at(pos_sq, cols, scores**2)
    neg_count = len(e) - pos_count
    neg_sum, neg_sq = total - pos_sum, total_sq - pos_sq
    with np.errstate(invalid="ignore", divide="ignore"):
        neg_mean = np.where(neg_count > 0, neg_sum / neg_count, 0.0)
        neg_std = np.sqrt(np.maximum(np.where(neg_count > 0, neg_sq / neg_count, 0.0) - neg_mean**2, 0.0))
        pos_mean = np.where(pos_count > 0, pos_sum / pos_count, np.nan)
    enough = neg_count >= settings.min_negatives
    pooled_n = neg_count[enough].sum()
    if pooled_n > 0:
        pooled_mean = neg_sum[enough].sum() / pooled_n
        pooled_std = float(np.sqrt(max(neg_sq[enough].sum() / pooled_n - pooled_mean**2, 0.0)))
    else:  # no noun has enough negatives: every reference pair is pooled
        count = len(e) * len(nouns)
        pooled_mean = total.sum() / count if count else 0.0
        pooled_std = float(np.sqrt(max(total_sq.sum() / count - pooled_mean**2, 0.0))) if count else 0.0
    mean = np.where(enough, neg_mean, pooled_mean)
    std = np.maximum(np.where(enough, neg_std, pooled_std), settings.min_std)
    calibration = Calibration(
        list(nouns),
        text_embeddings.astype(np.float32),
        mean,
        std,
        float(pooled_mean),
        max(pooled_std, settings.min_std),
    )
    table = [
        {
            "noun": noun,
            "n_negatives": int(neg_count[v]),
            "n_positives": int(pos_count[v]),
            "negative_mean": float(neg_mean[v]),
            "negative_std": float(neg_std[v]),
            "positive_mean": None if pos_count[v] == 0 else float(pos_mean[v]),
            "fallback": not bool(enough[v]),
            "mean": float(mean[v]),
            "std": float(std[v]),
        }
        for v, noun in enumerate(nouns)
    ]
    return calibration, table


@dataclass(frozen=True)
class NounJudgement:
    """One caption's nouns judged against its image."""

    scores: list[float]
    z: list[float]
    grounded: list[bool]

    @property
    def n_grounded(self) -> int:
        return sum(self.grounded)


def judge_nouns(
    image: np.ndarray, nouns: Sequence[str], calibration: Calibration, extra: dict[str, np.ndarray], z_threshold: float
) -> NounJudgement:
    """Score each noun occurrence against ``image`` (d,); ``extra`` holds embeddings of nouns the
    calibration lacks (judged against the pooled statistics)."""
    scores, zs = [], []
    for noun in nouns:
        v = calibration.positions.get(noun)
        embedding = calibration.text_embeddings[v] if v is not None else extra[noun]
        score = SCALE * float(image @ embedding)
        mean, std = (
            (calibration.mean[v], calibration.std[v])
            if v is not None
            else (
                calibration.pooled_mean,
                calibration.pooled_std,
            )
        )
        scores.append(score)
        zs.append((score - float(mean)) / float(std))
    return NounJudgement(scores, zs, [z >= z_threshold for z in zs])


def distinct_ungrounded(nouns: Sequence[str], grounded: Sequence[bool]) -> list[str]:
    """The nouns judged not grounded, each once, in caption order."""
    return list(dict.fromkeys(n for n, g in zip(nouns, grounded, strict=True) if not g))
