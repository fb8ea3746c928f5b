"""A cascade as one job spec: a cheap captioner on every key, a second one on the keys a query finds weak, the
best caption per key merged, curated with several captions kept, encoded, and a tiny PixArt trained sampling
among them by weight; the report shows the cascade's density and cost beside each source's."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from jobs.steps import run_pipeline
from pipeline.store.parquet_meta import read_meta
from schemas.pipeline_spec import PipelineSpec, resolve_paths

REPO = Path(__file__).resolve().parents[1]
# The 40% of the cheap captions with the fewest grounded nouns (then the fewest nouns).
WEAK = (
    "SELECT key FROM (SELECT key, row_number() OVER (ORDER BY n_grounded_nouns, n_nouns, key) AS rank, "
    "count(*) OVER () AS n FROM grounding WHERE field = 'cheap') WHERE rank <= n * 0.4"
)


def cascade_spec(out: Path) -> PipelineSpec:
    spec = {
        "name": "cascade-tiny",
        "root": f"{out}/dataset",
        "prepare": {"sample_photos": f"{out}/photos", "tiny_models": f"{out}/models"},
        "shard": {"inputs": [f"{out}/photos"], "shard_size": 4, "workers": 2},
        "caption": [
            {
                "name": "cheap",
                "model": {"model": f"{out}/models/llava"},
                "generation": {"prompt": "pixart", "batch_size": 8, "max_new_tokens": 24},
            },
            {
                "name": "strong",
                "model": {"model": f"{out}/models/qwen2_vl"},
                "generation": {"prompt": "pixart", "batch_size": 8, "max_new_tokens": 24},
                "keys_query": WEAK,
            },
        ],
        "merge": [{"name": "best", "fields": ["cheap", "strong"], "by": "grounded_nouns"}],
        "score": {"fields": ["alt_text", "cheap", "strong", "best"], "min_count": 1, "workers": 2},
        "ground": {
            "fields": ["alt_text", "cheap", "strong", "best"],
            "clip": {"model": f"local-dir:{out}/models/clip"},
            "batch_size": 16,
        },
        "report": {"html": f"{out}/report.html"},
        "curate": {"fields": ["best", "cheap"], "out": f"{out}/curated", "rules": {"min_words": 0}},
        "features": {
            "source": f"{out}/curated",
            "out": f"{out}/features",
            "vae": f"{out}/models/pixart",
            "text_encoder": f"{out}/models/pixart",
            "resolution": 64,
            "batch_size": 8,
        },
        "train": {
            "config": str(REPO / "trainer" / "configs" / "tiny.yaml"),
            "overrides": [
                f"run_dir={out}/runs/tiny",
                f"pipeline={out}/models/pixart",
                f"data.features={out}/features",
                "data.caption_sampling=weighted",
                "data.caption_weight=grounded_nouns",
                "steps=4",
                "sample_every=0",
            ],
        },
    }
    return resolve_paths(PipelineSpec.model_validate(yaml.safe_load(yaml.safe_dump(spec))), Path.cwd())


def rows_of(folder: Path) -> list[dict]:
    return [r for path in sorted(folder.glob("*.parquet")) for r in pq.read_table(path).to_pylist()]


@pytest.fixture(scope="module")
def cascade_run(ray_local, tmp_path_factory) -> tuple[Path, PipelineSpec, str]:
    out = tmp_path_factory.mktemp("cascade")
    spec = cascade_spec(out)
    run_pipeline(spec)
    return out, spec


@pytest.mark.slow
def test_the_strong_captioner_captions_only_the_weak_keys(cascade_run):
    out, _ = cascade_run
    root = out / "dataset"
    cheap = sorted(rows_of(root / "grounding" / "cheap"), key=lambda r: (r["n_grounded_nouns"], r["n_nouns"], r["key"]))
    weak = {r["key"] for r in cheap[: int(len(cheap) * 0.4)]}
    assert 0 < len(weak) < len(cheap)
    assert {r["key"] for r in rows_of(root / "captions" / "strong")} == weak
    for path in (root / "captions" / "strong").glob("*.parquet"):
        assert read_meta(path)["selection"]["query"] == WEAK


@pytest.mark.slow
def test_the_merged_field_takes_each_keys_best_caption(cascade_run):
    out, _ = cascade_run
    root = out / "dataset"
    grounded = {
        field: {r["key"]: r["n_grounded_nouns"] for r in rows_of(root / "grounding" / field) if not r["missing"]}
        for field in ("cheap", "strong")
    }
    for row in rows_of(root / "captions" / "best"):
        candidates = [
            (grounded[f][row["key"]], -i, f) for i, f in enumerate(("cheap", "strong")) if row["key"] in grounded[f]
        ]
        if candidates:
            assert row["source"] == max(candidates)[2]


@pytest.mark.slow
def test_curated_samples_carry_both_captions_and_features_encode_each(cascade_run):
    out, _ = cascade_run
    with_two = 0
    for tar in sorted((out / "features").glob("*.tar")):
        with tarfile.open(tar) as tf:
            for member in tf:
                if member.name.endswith(".captions.json"):
                    captions = json.loads(tf.extractfile(member).read())
                    assert captions[0]["field"] == "best"
                    with_two += len(captions) == 2
    assert with_two > 0


@pytest.mark.slow
def test_training_ran_sampling_captions_by_weight(cascade_run):
    out, _ = cascade_run
    assert any((out / "runs" / "tiny" / "checkpoints").iterdir())
    saved = yaml.safe_load((out / "runs" / "tiny" / "config.yaml").read_text())
    assert saved["data"]["caption_sampling"] == "weighted" and saved["data"]["caption_weight"] == "grounded_nouns"


@pytest.mark.slow
def test_the_report_shows_the_cascade_beside_its_sources(cascade_run):
    out, _ = cascade_run
    page = (out / "report.html").read_text()
    assert "cascade" in page.lower() and "best" in page
