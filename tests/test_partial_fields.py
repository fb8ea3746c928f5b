"""Every stage on caption fields as the field has them: some keys captioned, some blank, some sources with none.

A job spec runs the whole pipeline over a folder where only some photos have alt text (one blank), SA-1B
with no alt text, img2dataset shards with empty and absent alt texts, a full captioner and a captioner's
sample; a second root holds only SA-1B, whose alt text field has no caption at all.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from densecurate.cli import main
from jobs.steps import run_pipeline
from pipeline.report.compare import compare_fields
from pipeline.report.console import gather_report
from pipeline.stages.ground import run_ground_stage
from pipeline.stages.score import run_score_stage
from pipeline.stages.shard import run_shard_stage
from pipeline.store.catalog import run_query
from schemas.ground_config import GroundConfig
from schemas.pipeline_spec import parse_spec
from schemas.score_config import ScoreConfig
from schemas.shard_config import ShardConfig
from tests.field_corpus import SA1B_IDS, expected_alt_text_keys, write_field_corpus, write_sa1b_tar

FIELDS = ("alt_text", "llava", "qwen")
SAMPLE = 1  # keys per shard the sampled captioner covers
GENERATION = {"batch_size": 4, "max_new_tokens": 12, "prompt": "pixart"}


def _spec(base: Path, sources: list[Path], models: dict[str, Path]) -> dict:
    return {
        "name": "partial",
        "root": str(base / "root"),
        "shard": {"inputs": [str(s) for s in sources], "shard_size": 4, "workers": 2},
        "caption": [
            {"name": "llava", "model": {"model": str(models["llava"])}, "generation": GENERATION},
            {"name": "qwen", "model": {"model": str(models["qwen"])}, "generation": GENERATION, "sample": SAMPLE},
        ],
        "score": {"fields": list(FIELDS), "workers": 2, "min_count": 0},
        "ground": {"fields": list(FIELDS), "clip": {"model": f"local-dir:{models['clip']}"}, "batch_size": 8},
        "report": {"html": str(base / "report.html")},
        "curate": {"field": "alt_text", "out": str(base / "curated"), "rules": {"min_words": 1}},
        "features": {
            "source": str(base / "curated"),
            "out": str(base / "features"),
            "vae": str(models["pixart"]),
            "text_encoder": str(models["pixart"]),
            "resolution": 64,
            "batch_size": 4,
        },
        "train": {
            "config": "trainer/configs/tiny.yaml",
            "overrides": [
                f"run_dir={base / 'run'}",
                f"pipeline={models['pixart']}",
                f"data.features={base / 'features'}",
                "steps=2",
                "sample_every=0",
            ],
        },
        "export": {"out": str(base / "export")},
    }


@pytest.fixture(scope="module")
def corpus_run(ray_local, tmp_path_factory, tiny_llava_dir, tiny_qwen2_vl_dir, tiny_clip_dir, tiny_pixart_dir):
    """The mixed corpus through a whole job spec; returns the spec's folder."""
    base = tmp_path_factory.mktemp("partial")
    models = {"llava": tiny_llava_dir, "qwen": tiny_qwen2_vl_dir, "clip": tiny_clip_dir, "pixart": tiny_pixart_dir}
    spec = parse_spec(yaml.safe_dump(_spec(base, write_field_corpus(base / "sources"), models)))
    run_pipeline(spec)
    return base


def _rows(folder: Path) -> list[dict]:
    return [r for p in sorted(folder.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def _written_keys(root: Path) -> list[str]:
    return [k for (k,) in run_query(root, "SELECT key FROM samples WHERE status = 'ok' ORDER BY key")[1]]


@pytest.mark.slow
def test_every_field_has_one_row_per_key_and_counts_its_missing_captions(corpus_run):
    root = corpus_run / "root"
    keys = _written_keys(root)
    assert len(keys) == 18
    captioned = {
        "alt_text": expected_alt_text_keys(keys),
        "llava": set(keys),
        "qwen": {r["key"] for r in _rows(root / "captions" / "qwen") if r["status"] == "ok"},
    }
    shards = len(list((root / "shards").glob("*.tar")))
    assert 1 <= len(captioned["qwen"]) <= SAMPLE * shards < len(keys)
    for name in FIELDS:
        density = _rows(root / "density" / name)
        scored_keys = keys if name != "qwen" else sorted(r["key"] for r in _rows(root / "captions" / "qwen"))
        assert sorted(r["key"] for r in density) == scored_keys, name
        missing = {r["key"] for r in density if r["missing"]}
        assert missing == set(scored_keys) - captioned[name], name
        assert all(r["n_nouns"] == 0 for r in density if r["missing"])
        grounding = {r["key"]: r for r in _rows(root / "grounding" / name)}
        assert sorted(grounding) == scored_keys, name
        for key, row in grounding.items():
            assert row["missing"] == (key in missing)
            if row["missing"]:
                assert row["clip_score"] is None and row["n_nouns"] == 0 and row["n_grounded_nouns"] == 0
            else:
                assert row["clip_score"] is not None and row["n_nouns"] == len(row["nouns"])


@pytest.mark.slow
def test_figures_are_taken_over_captioned_keys_only(corpus_run):
    root = corpus_run / "root"
    counts = dict(
        run_query(root, "SELECT field, count(*) FILTER (WHERE missing) FROM density GROUP BY field ORDER BY field")[1]
    )
    assert counts["alt_text"] == 18 - len(expected_alt_text_keys(_written_keys(root)))
    grounded = run_query(
        root, "SELECT field, count(*), count(clip_score) FROM grounding WHERE NOT missing GROUP BY field"
    )[1]
    assert all(total == scored for _, total, scored in grounded)
    reports = {r.row.field: r for r in gather_report(root)}
    assert set(reports) == set(FIELDS)
    assert reports["alt_text"].row.missing == counts["alt_text"]
    compared = {c.field: c for c in compare_fields(root)}
    assert set(compared) == set(FIELDS)
    assert (corpus_run / "report.html").is_file()


@pytest.mark.slow
def test_curation_features_and_training_take_the_captioned_keys(corpus_run):
    root = corpus_run / "root"
    curated = _rows(corpus_run / "curated")
    assert len(curated) == 18
    kept = {r["key"] for r in curated if r["status"] == "ok"}
    assert kept == expected_alt_text_keys(_written_keys(root))
    assert {r["reason"] for r in curated if r["status"] == "skipped"} == {"missing_caption"}
    features = _rows(corpus_run / "features")
    assert {r["key"] for r in features if r["status"] == "ok"} == kept
    assert (corpus_run / "export" / "model_index.json").is_file()


@pytest.mark.slow
def test_stats_and_compare_commands_answer_on_partial_fields(corpus_run, capsys):
    root = str(corpus_run / "root")
    assert main(["stats", root]) == 0
    assert main(["compare", root]) == 0
    out = capsys.readouterr().out
    assert "qwen" in out and "Traceback" not in out


@pytest.fixture(scope="module")
def captionless_root(ray_local, tmp_path_factory, tiny_clip_dir) -> Path:
    """SA-1B alone: the default field, alt_text, holds no caption at all."""
    base = tmp_path_factory.mktemp("captionless")
    root = base / "root"
    run_shard_stage([write_sa1b_tar(base / "sa_000000.tar")], root, ShardConfig())
    return root


@pytest.mark.slow
def test_a_field_without_any_caption_is_scored_grounded_and_reported(captionless_root, tiny_clip_dir, capsys):
    root = captionless_root
    score = run_score_stage(root, ScoreConfig(min_count=0))
    assert score is not None
    ground = run_ground_stage(root, GroundConfig.model_validate({"clip": {"model": f"local-dir:{tiny_clip_dir}"}}))
    assert [r.stats["missing"] for r in ground.grounding.run.results] == [len(SA1B_IDS)]
    grounding = _rows(root / "grounding" / "alt_text")
    assert len(grounding) == len(SA1B_IDS) and all(r["missing"] for r in grounding)
    for command in (["report", str(root)], ["stats", str(root)], ["compare", str(root)]):
        assert main(command) == 0, command
    out = capsys.readouterr().out
    assert "missing" in out and "Traceback" not in out
