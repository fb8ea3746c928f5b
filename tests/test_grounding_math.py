"""The grounding arithmetic against brute force: sentences, prompt ensembles, calibration, the decision."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.grounding.scores import (
    calibrate,
    distinct_ungrounded,
    ensemble,
    judge_nouns,
    noun_prompts,
    split_sentences,
)
from pipeline.stages.ground import reference_shards
from schemas.ground_config import GroundingSettings


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_sentences_split_after_stops_and_lines_and_are_capped():
    text = "A red circle. A blue star!  Is it a square?\nA yellow triangle"
    assert split_sentences(text, 10) == ["A red circle.", "A blue star!", "Is it a square?", "A yellow triangle"]
    assert split_sentences(text, 2) == ["A red circle.", "A blue star!"]
    assert split_sentences("   ", 5) == []
    assert split_sentences("3.5 m tall and 2.0 wide", 5) == ["3.5 m tall and 2.0 wide"]


def test_prompt_ensemble_is_the_normalised_mean_per_noun():
    assert noun_prompts(["cat", "dog"], ["a {}.", "the {}!"]) == ["a cat.", "the cat!", "a dog.", "the dog!"]
    rng = np.random.default_rng(0)
    texts = _unit(rng, 4, 8)
    got = ensemble(texts, 2)
    for v in range(2):
        mean = texts[2 * v : 2 * v + 2].mean(axis=0)
        np.testing.assert_allclose(got[v], mean / np.linalg.norm(mean), rtol=1e-6)


def test_calibration_matches_brute_force_over_negatives():
    rng = np.random.default_rng(1)
    images, texts = _unit(rng, 60, 16), _unit(rng, 3, 16)
    nouns = ["cat", "dog", "sofa"]
    named = [{nouns[i % 3]} | ({"sofa"} if i % 5 == 0 else set()) for i in range(60)]
    settings = GroundingSettings(min_negatives=2, min_std=1e-6)
    calibration, rows = calibrate(images, named, nouns, texts, settings)
    for v, noun in enumerate(nouns):
        scores = 100 * images @ texts[v]
        negatives = np.array([s for s, names in zip(scores, named, strict=True) if noun not in names])
        positives = np.array([s for s, names in zip(scores, named, strict=True) if noun in names])
        assert rows[v]["n_negatives"] == len(negatives) and rows[v]["n_positives"] == len(positives)
        assert calibration.mean[v] == pytest.approx(negatives.mean(), abs=1e-6)
        assert calibration.std[v] == pytest.approx(negatives.std(), abs=1e-5)
        assert rows[v]["positive_mean"] == pytest.approx(positives.mean(), abs=1e-6)
        assert rows[v]["fallback"] is False


def test_nouns_with_too_few_negatives_use_the_pooled_statistics():
    rng = np.random.default_rng(2)
    images, texts = _unit(rng, 30, 8), _unit(rng, 2, 8)
    named = [{"photo"} | ({"cat"} if i < 10 else set()) for i in range(30)]  # every caption names "photo"
    calibration, rows = calibrate(images, named, ["photo", "cat"], texts, GroundingSettings(min_negatives=5))
    assert rows[0]["fallback"] is True and rows[0]["n_negatives"] == 0
    assert rows[1]["fallback"] is False and rows[1]["n_negatives"] == 20
    cat_negatives = 100 * images[10:] @ texts[1]
    assert calibration.pooled_mean == pytest.approx(cat_negatives.mean(), abs=1e-6)  # only "cat" has negatives
    assert calibration.mean[0] == pytest.approx(calibration.pooled_mean)


def test_the_std_floor_applies():
    images = np.tile(np.eye(4)[:1], (30, 1))  # identical images: zero spread
    calibration, _ = calibrate(images, [set()] * 30, ["x"], np.eye(4)[1:2], GroundingSettings(min_std=0.5))
    assert calibration.std[0] == 0.5


def test_judgement_by_z_and_unknown_nouns_against_pooled():
    rng = np.random.default_rng(3)
    images, texts = _unit(rng, 40, 8), _unit(rng, 2, 8)
    calibration, _ = calibrate(images, [set()] * 40, ["cat", "dog"], texts, GroundingSettings(min_std=1e-6))
    image = texts[0]  # an image that is exactly the "cat" prompt
    stranger = _unit(rng, 1, 8)[0]
    judged = judge_nouns(image, ["cat", "dog", "cat", "zebra"], calibration, {"zebra": stranger}, z_threshold=2.0)
    expected_z = (100 * image @ texts[0] - calibration.mean[0]) / calibration.std[0]
    assert judged.z[0] == pytest.approx(expected_z) and judged.z[2] == judged.z[0]
    zebra_z = (100 * image @ stranger - calibration.pooled_mean) / calibration.pooled_std
    assert judged.z[3] == pytest.approx(zebra_z)
    assert judged.grounded == [z >= 2.0 for z in judged.z]
    assert judged.grounded[0] is True  # a perfect match is far above random images
    assert distinct_ungrounded(["a", "b", "a", "c"], [False, True, False, False]) == ["a", "c"]


def test_reference_shards_are_whole_and_evenly_spaced():
    counts = [(i, 100) for i in range(10)]
    assert reference_shards(counts, 5000) == list(range(10))
    assert reference_shards(counts, 300) == [0, 4, 9]
    assert reference_shards(counts, 1) == [0]
    assert reference_shards([(7, 50)], 10) == [7]
