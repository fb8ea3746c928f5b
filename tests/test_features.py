"""The features stage with the tiny PixArt-α encoders: written then read back gives the same tensors; samples
without caption text are encoded with the empty caption and counted."""

from __future__ import annotations

import json

import pytest
import torch
import webdataset as wds
from safetensors.torch import load_file

from densecurate.cli import main
from pipeline.sample_data import write_sample_folder
from pipeline.stages.curate import run_curate_stage
from pipeline.stages.features import NULL_CAPTION_FILE, run_features_stage
from pipeline.stages.score import run_score_stage
from pipeline.stages.shard import run_shard_stage
from schemas.features_config import FeaturesConfig
from schemas.score_config import CurateConfig, CurateRules, ScoreConfig
from schemas.shard_config import ShardConfig
from trainer.features import FeatureEncoder, Features


@pytest.mark.slow
def test_features_round_trip_and_resume(ray_local, tiny_pixart_dir, tmp_path):
    root = tmp_path / "root"
    run_shard_stage([write_sample_folder(tmp_path / "photos")], root, ShardConfig(shard_size=4))
    config = FeaturesConfig(
        vae=str(tiny_pixart_dir), text_encoder=str(tiny_pixart_dir), resolution=64, max_tokens=16, batch_size=3
    )
    feats_dir = tmp_path / "feats"
    run = run_features_stage(root / "shards", feats_dir, config)
    assert run.samples == 10 and run.shards_reused == 0

    encoder = FeatureEncoder(str(tiny_pixart_dir), str(tiny_pixart_dir), resolution=64, max_tokens=16)
    shards = [str(p) for p in sorted((root / "shards").glob("*.tar"))]
    originals = {s["__key__"]: s for s in wds.WebDataset(shards, shardshuffle=False)}
    stored = list(wds.WebDataset([str(p) for p in sorted(feats_dir.glob("*.tar"))], shardshuffle=False))
    assert sorted(s["__key__"] for s in stored) == sorted(originals)
    for sample in stored:
        got = Features.from_bytes(sample["feat.safetensors"])
        source = originals[sample["__key__"]]
        (expected,) = encoder.encode([source["jpg"]], [source["txt"].decode()])
        assert got.vae.dtype == torch.float16 and got.vae.shape == (8, 8, 8)
        assert got.t5.shape == expected.t5.shape and got.t5.shape[0] <= 16 and got.t5.shape[1] == 32
        torch.testing.assert_close(got.vae, expected.vae, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(got.t5, expected.t5, rtol=1e-3, atol=1e-3)
        assert sample["txt"] == source["txt"]
    null = load_file(str(feats_dir / NULL_CAPTION_FILE))["t5"]
    assert null.shape == (1, 32)  # only the end-of-sequence token
    pixart = tiny_pixart_dir.resolve()
    made_with = {"vae": str(pixart / "vae"), "text_encoder": str(pixart / "text_encoder"), "resolution": 64}
    for stats in sorted(feats_dir.glob("*_stats.json")):  # what training checks its config against
        assert json.loads(stats.read_text())["features"] == {**made_with, "max_tokens": 16}

    again = run_features_stage(root / "shards", feats_dir, config)
    assert again.shards_reused == again.shards == 4


@pytest.mark.slow
@pytest.mark.parametrize("without_alt_text", [("chelsea", "coins", "moon"), "all"], ids=["some", "all"])
def test_features_of_a_partly_or_never_captioned_field_count_the_missing(
    ray_local, tiny_pixart_dir, tmp_path, capsys, without_alt_text
):
    """Curated with --min-words 0, alt text missing for some images (or all): every sample is encoded, those
    without caption with the empty caption, and the summary counts them."""
    photos = write_sample_folder(tmp_path / "photos", with_bad_files=False)
    for alt_text in photos.glob("*.txt"):
        if without_alt_text == "all" or alt_text.stem in without_alt_text:
            alt_text.unlink()
    missing = {f"folder-{p.stem}" for p in photos.glob("*.json") if not p.with_suffix(".txt").exists()}
    root, curated, feats_dir = tmp_path / "root", tmp_path / "curated", tmp_path / "feats"
    run_shard_stage([photos], root, ShardConfig(shard_size=4))
    run_score_stage(root, ScoreConfig(fields=("alt_text",), min_count=1))
    run_curate_stage(root, curated, CurateConfig(field="alt_text", rules=CurateRules(min_words=0)))
    capsys.readouterr()
    pixart = str(tiny_pixart_dir)
    argv = ["features", str(curated), "--out", str(feats_dir), "--vae", pixart, "--text-encoder", pixart]
    assert main([*argv, "--resolution", "64", "--batch-size", "3"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert f"features: 10 samples ({len(missing)} without caption: encoded as the empty caption) in 3 shards" in out

    null = load_file(str(feats_dir / NULL_CAPTION_FILE))["t5"]
    stored = list(wds.WebDataset([str(p) for p in sorted(feats_dir.glob("*.tar"))], shardshuffle=False))
    assert len(stored) == 10
    for sample in stored:
        t5 = Features.from_bytes(sample["feat.safetensors"]).t5
        if sample["__key__"] in missing:
            assert sample["txt"] == b"" and torch.equal(t5, null)
        else:
            assert sample["txt"] and t5.shape[0] > 1
    counts = [json.loads(p.read_text())["missing_captions"] for p in sorted(feats_dir.glob("*_stats.json"))]
    assert sum(counts) == len(missing)


def test_the_encoders_run_in_bf16_on_a_gpu_that_has_it(monkeypatch):
    import torch

    from trainer.features import encoder_dtype

    assert encoder_dtype(torch.device("cpu")) is torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert encoder_dtype(torch.device("cuda")) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert encoder_dtype(torch.device("cuda:1")) is torch.float16
