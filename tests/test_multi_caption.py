"""Several captions per image: curate keeps each field's passing caption with its scores (KEY.captions.json),
features encode each, and training draws one per sample and step, by weight, exactly resumable."""

from __future__ import annotations

import json
import math
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.sample_data import write_sample_folder
from pipeline.stages.caption import run_caption_stage
from pipeline.stages.curate import run_curate_stage
from pipeline.stages.features import run_features_stage
from pipeline.stages.score import run_score_stage
from pipeline.stages.shard import run_shard_stage
from schemas.caption_config import CaptionConfig
from schemas.features_config import FeaturesConfig
from schemas.score_config import CurateConfig, ScoreConfig
from schemas.shard_config import ShardConfig
from schemas.train_config import load_train_config
from trainer.data import CaptionSampling, FeatureDataset, _StepOrdered, seeded_generator
from trainer.features import FeatureEncoder, Features

REPO = Path(__file__).resolve().parents[1]


def rows_of(folder: Path) -> list[dict]:
    return [r for path in sorted(folder.glob("*.parquet")) for r in pq.read_table(path).to_pylist()]


def members(folder: Path, ext: str) -> dict[str, bytes]:
    found = {}
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for member in tf:
                key, _, member_ext = member.name.partition(".")
                if member_ext == ext:
                    found[key] = tf.extractfile(member).read()
    return found


@pytest.fixture(scope="module")
def curated(ray_local, tmp_path_factory, tiny_llava_dir, tiny_pixart_dir) -> dict[str, Path]:
    """Real photos; a tiny captioner's captions and the alt texts, both scored; curated with the alt text first and
    the captions second, captions of fewer than 2 nouns dropped; then encoded."""
    base = tmp_path_factory.mktemp("multi")
    root = base / "root"
    run_shard_stage([write_sample_folder(base / "photos")], root, ShardConfig(shard_size=5))
    settings = {"batch_size": 4, "max_new_tokens": 24, "prompt": "pixart"}
    run_caption_stage(
        root,
        CaptionConfig.model_validate(
            {"name": "cheap", "model": {"model": str(tiny_llava_dir)}, "generation": settings}
        ),
    )
    run_score_stage(root, ScoreConfig(fields=("alt_text", "cheap"), min_count=1))
    rules = {"min_nouns": 2}
    run_curate_stage(root, base / "curated", CurateConfig(fields=("alt_text", "cheap"), rules=rules))
    run_curate_stage(root, base / "single", CurateConfig(field="alt_text", rules=rules))
    features = FeaturesConfig(vae=str(tiny_pixart_dir), text_encoder=str(tiny_pixart_dir), resolution=64, batch_size=8)
    run_features_stage(base / "curated", base / "features", features)
    return {"root": root, "curated": base / "curated", "single": base / "single", "features": base / "features"}


def valid_nouns(root: Path, field: str) -> dict[str, int]:
    vocab = {r["noun"] for r in pq.read_table(root / "vocab" / f"{field}.parquet").to_pylist() if r["valid"]}
    return {r["key"]: sum(n in vocab for n in r["nouns"]) for r in rows_of(root / "density" / field)}


@pytest.mark.slow
def test_curate_keeps_each_fields_passing_caption_with_its_scores(curated):
    root = curated["root"]
    density = {f: {r["key"]: r for r in rows_of(root / "density" / f)} for f in ("alt_text", "cheap")}
    valid = {f: valid_nouns(root, f) for f in ("alt_text", "cheap")}
    cheap = {r["key"]: r for r in rows_of(root / "captions" / "cheap")}
    alt = {r["key"]: r["alt_text"] for r in rows_of(root / "shards") if r["status"] == "ok"}
    found = {k: json.loads(v) for k, v in members(curated["curated"], "captions.json").items()}
    assert found and set(found) == set(members(curated["curated"], "jpg"))
    dropped = 0
    for key, captions in found.items():
        first = {"text": alt[key] or "", "field": "alt_text", "nouns": density["alt_text"][key]["n_nouns"]}
        assert {k: captions[0][k] for k in first} == first and captions[0]["valid_nouns"] == valid["alt_text"][key]
        row = cheap[key]
        words, nouns = density["cheap"][key]["n_tokens"], density["cheap"][key]["n_nouns"]
        passes = row["status"] == "ok" and (row["caption"] or "").strip() and words >= 1 and nouns >= 2
        if passes:
            assert captions[1] == {
                "text": row["caption"],
                "field": "cheap",
                "nouns": density["cheap"][key]["n_nouns"],
                "valid_nouns": valid["cheap"][key],
                "grounded_nouns": None,
                "grounded_share": None,
                "clip_score": None,
            }
        else:
            assert len(captions) == 1
            dropped += 1
    assert dropped and dropped < len(found)  # the rule drops some of the second field's captions, not all
    rows = {r["key"]: r for r in rows_of(curated["curated"]) if r["status"] == "ok"}
    assert {k: r["n_captions"] for k, r in rows.items()} == {k: len(c) for k, c in found.items()}
    stats = json.loads(next(curated["curated"].glob("*_stats.json")).read_text())
    assert set(stats["captions_by_field"]) == {"alt_text", "cheap"}


@pytest.mark.slow
def test_one_field_curates_as_before(curated):
    assert not members(curated["single"], "captions.json")
    assert all(r["n_captions"] is None for r in rows_of(curated["single"]))


@pytest.mark.slow
def test_features_encode_every_caption(curated, tiny_pixart_dir):
    encoder = FeatureEncoder(str(tiny_pixart_dir), str(tiny_pixart_dir), resolution=64, device="cpu")
    captions = {k: json.loads(v) for k, v in members(curated["features"], "captions.json").items()}
    feats = {k: Features.from_bytes(v) for k, v in members(curated["features"], "feat.safetensors").items()}
    two = [k for k, c in captions.items() if len(c) == 2]
    assert two
    for key in two[:3]:
        (alone,) = encoder.encode_texts([captions[key][1]["text"]])
        (first,) = encoder.encode_texts([captions[key][0]["text"]])
        assert len(feats[key].extra_t5) == 1
        assert torch.allclose(feats[key].extra_t5[0].float(), alone.float(), atol=1e-3)
        assert torch.allclose(feats[key].t5.float(), first.float(), atol=1e-3)
    rows = {r["key"]: r["n_captions"] for r in rows_of(curated["features"])}
    assert all(rows[k] == len(c) for k, c in captions.items())


CAPTIONS = [
    {"text": "a", "grounded_nouns": 1, "clip_score": 30.0},
    {"text": "b", "grounded_nouns": 3, "clip_score": None},
    {"text": "c", "grounded_nouns": 2, "clip_score": 25.0},
]


@pytest.mark.parametrize(
    ("sampling", "expected"),
    [
        (CaptionSampling("first"), [1.0, 0.0, 0.0]),
        (CaptionSampling("uniform"), [1 / 3] * 3),
        (CaptionSampling("weighted", "grounded_nouns", 2.0), [math.exp(x / 2) for x in (1, 3, 2)]),
        (CaptionSampling("weighted", "clip_score", 5.0), [math.exp(6), 0.0, math.exp(5)]),
    ],
)
def test_drawn_frequencies_follow_the_weights(sampling, expected):
    total = sum(expected)
    expected = [e / total for e in expected]
    draws = 20_000
    dataset = _StepOrdered([], seed=7, caption_dropout=0.0, sampling=sampling)
    counts = Counter(dataset.caption_index(position, CAPTIONS) for position in range(draws))
    for index, p in enumerate(expected):
        sigma = math.sqrt(draws * p * (1 - p))
        assert abs(counts[index] - draws * p) <= 5 * sigma + 1e-9  # 5 standard deviations: a fluke is ~1e-6
    again = _StepOrdered([], seed=7, caption_dropout=0.0, sampling=sampling)
    assert [again.caption_index(p, CAPTIONS) for p in range(500)] == [
        dataset.caption_index(p, CAPTIONS) for p in range(500)
    ]


@pytest.mark.slow
def test_a_training_steps_batch_holds_the_drawn_captions_states(curated, tiny_pixart_dir):
    from trainer.loop import _open_batches

    overrides = [
        f"run_dir={curated['root'].parent}/run",
        f"pipeline={tiny_pixart_dir}",
        f"data.features={curated['features']}",
        "data.caption_sampling=uniform",
        "caption_dropout=0",
    ]
    config = load_train_config((REPO / "trainer" / "configs" / "tiny.yaml").read_text(), overrides)
    batches = _open_batches(config, torch.device("cpu"), start=0, rank=0, world=1)
    dataset: FeatureDataset = batches.loader.dataset
    non_first = 0
    for step, batch in zip(range(4), batches.loader, strict=False):
        _, t5, _ = batches.tensors(batch)  # what the step's loss is computed from
        for i in range(config.data.batch_size):
            position = step * config.data.batch_size + i
            ref = dataset.ref_at(position)
            feats = Features.from_bytes(ref.read("feat.safetensors"))
            captions = json.loads(ref.read("captions.json") or b"[]")
            drawn = 0
            if len(captions) > 1:  # the documented draw: uniform, from the generator of (seed, position, 3)
                drawn = int(
                    torch.multinomial(
                        torch.full((len(captions),), 1 / len(captions), dtype=torch.float64),
                        1,
                        generator=seeded_generator(config.seed, position, 3),
                    )
                )
            states = feats.caption_states(drawn).float()
            assert int(batch["caption_index"][i]) == drawn
            assert torch.equal(t5[i, : states.shape[0]], states)
            non_first += drawn > 0
    assert non_first > 0
