"""The features stage with the tiny PixArt-α encoders: written then read back gives the same tensors."""

from __future__ import annotations

import torch
import webdataset as wds
from safetensors.torch import load_file

from pipeline.features_stage import NULL_CAPTION_FILE, run_features_stage
from pipeline.sample_data import write_sample_folder
from pipeline.shard_stage import run_shard_stage
from schemas.features_config import FeaturesConfig
from schemas.shard_config import ShardConfig
from trainer.features import FeatureEncoder, Features


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

    again = run_features_stage(root / "shards", feats_dir, config)
    assert again.shards_reused == again.shards == 4
