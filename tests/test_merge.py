"""`densecurate merge`: each key's best caption among several fields, checked by hand against the Parquet rows; its
cost summed over the sources; resume, refusals, and the cascade figures of compare."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from densecurate.cli import main
from pipeline.sample_data import write_sample_folder
from pipeline.stages.caption import run_caption_stage
from pipeline.stages.ground import run_ground_stage
from pipeline.stages.merge import MergeJob, merged_row, run_merge_stage
from pipeline.stages.score import run_score_stage
from pipeline.stages.shard import run_shard_stage
from schemas.caption_config import CaptionConfig
from schemas.errors import OutputConflictError, StaleInputError
from schemas.ground_config import GroundConfig
from schemas.merge_config import MergeConfig
from schemas.score_config import ScoreConfig
from schemas.shard_config import ShardConfig

FIELDS = ("alt_text", "cheap", "strong")


def caption_config(name: str, model: Path, **extra) -> CaptionConfig:
    settings = {"batch_size": 4, "max_new_tokens": 16, "prompt": "pixart"}
    return CaptionConfig.model_validate({"name": name, "model": {"model": str(model)}, "generation": settings, **extra})


def rows_of(folder: Path) -> list[dict]:
    return [r for path in sorted(folder.glob("*.parquet")) for r in pq.read_table(path).to_pylist()]


def by_key(root: Path, table: str, field: str) -> dict[str, dict]:
    return {r["key"]: r for r in rows_of(root / table / field)}


@pytest.fixture(scope="module")
def merged_root(ray_local, tmp_path_factory, tiny_llava_dir, tiny_qwen2_vl_dir, tiny_clip_dir) -> Path:
    """Real photos in shards of 5; a cheap captioner on every key, a second one on 2 keys per shard; every field
    scored and grounded with one CLIP; merged by grounded nouns."""
    base = tmp_path_factory.mktemp("merge")
    root = base / "root"
    run_shard_stage([write_sample_folder(base / "photos")], root, ShardConfig(shard_size=5))
    run_caption_stage(root, caption_config("cheap", tiny_llava_dir))
    run_caption_stage(root, caption_config("strong", tiny_qwen2_vl_dir, sample=2))
    run_score_stage(root, ScoreConfig(fields=FIELDS, min_count=1))
    clip = {"model": f"local-dir:{tiny_clip_dir}"}
    run_ground_stage(root, GroundConfig.model_validate({"fields": FIELDS, "clip": clip, "batch_size": 8}))
    run_merge_stage(root, MergeConfig(name="best", fields=FIELDS, by="grounded_nouns"))
    return root


def alt_texts(root: Path) -> dict[str, str]:
    return {r["key"]: r["alt_text"] for r in rows_of(root / "shards") if r["status"] == "ok"}


def expected_source(root: Path, key: str, fields: tuple[str, ...], score) -> str | None:
    """The documented rule: the highest score among fields with a caption for the key, ties to the first."""
    best = None
    for name in fields:
        row = by_key(root, "grounding", name).get(key)
        if row is None or row["missing"]:
            continue
        if best is None or score(row) > best[0]:
            best = (score(row), name)
    return best and best[1]


@pytest.mark.slow
def test_each_key_gets_the_caption_with_the_most_grounded_nouns(merged_root):
    merged = by_key(merged_root, "captions", "best")
    keys = set(by_key(merged_root, "density", "alt_text")) | set(by_key(merged_root, "captions", "cheap"))
    assert set(merged) == keys
    for key, row in merged.items():
        source = expected_source(merged_root, key, FIELDS, lambda r: r["n_grounded_nouns"])
        assert row["source"] == source and row["captioner"] == "best"
        if source == "alt_text":
            assert row["caption"] == alt_texts(merged_root)[key] and row["model"] is None
        elif source is not None:
            original = by_key(merged_root, "captions", source)[key]
            assert (row["caption"], row["model"], row["prompt_sha256"]) == (
                original["caption"],
                original["model"],
                original["prompt_sha256"],
            )
    chosen = [
        by_key(merged_root, "grounding", s)[k]["n_grounded_nouns"]
        for k, s in ((k, r["source"]) for k, r in merged.items())
        if s
    ]
    for name in FIELDS:  # the best of each key has at least as many grounded nouns as any one field's caption
        own = by_key(merged_root, "grounding", name)
        assert sum(chosen) >= sum(r["n_grounded_nouns"] for r in own.values() if not r["missing"])


@pytest.mark.slow
def test_a_merged_rows_cost_is_what_every_source_spent_on_its_key(merged_root):
    cheap, strong = by_key(merged_root, "captions", "cheap"), by_key(merged_root, "captions", "strong")
    for key, row in by_key(merged_root, "captions", "best").items():
        spent = [r["seconds"] for r in (cheap.get(key), strong.get(key)) if r is not None]
        assert row["seconds"] == pytest.approx(sum(spent), rel=1e-5)
        assert row["gpu_seconds"] == 0.0 and row["device"] == "cpu"


@pytest.mark.slow
def test_valid_nouns_and_clip_score_rules(merged_root):
    run_merge_stage(merged_root, MergeConfig(name="by-clip", fields=("cheap", "strong"), by="clip_score"))
    for key, row in by_key(merged_root, "captions", "by-clip").items():
        assert row["source"] == expected_source(merged_root, key, ("cheap", "strong"), lambda r: r["clip_score"])
    run_merge_stage(merged_root, MergeConfig(name="by-valid", fields=("strong", "cheap"), by="valid_nouns"))
    valid = {}
    for f in ("strong", "cheap"):
        vocab = {r["noun"] for r in pq.read_table(merged_root / "vocab" / f"{f}.parquet").to_pylist() if r["valid"]}
        density = by_key(merged_root, "density", f)
        valid[f] = {k: sum(n in vocab for n in r["nouns"]) for k, r in density.items() if not r["missing"]}
    for key, row in by_key(merged_root, "captions", "by-valid").items():
        got = [(valid[f][key], -i, f) for i, f in enumerate(("strong", "cheap")) if key in valid[f]]
        assert row["source"] == max(got)[2]


def test_a_key_without_any_caption_gets_an_error_row():
    job = MergeJob(index=0, out_dir=Path("."), fingerprint="", root=Path("."), name="best", fields=("a", "b"), by="x")
    rows = {"a": {"k": {"key": "k", "seconds": 2.0, "gpus": 1.0, "gpu_seconds": 2.0, "device": "H100"}}, "b": {}}
    row = merged_row("k", job, rows, {"a": {"k": (True, None)}, "b": {}})
    assert row["status"] == "error" and row["error"].startswith("no_caption: none of a, b")
    assert row["source"] is None and row["seconds"] == 2.0 and row["gpu_seconds"] == 2.0
    tied = {"a": {"k": {"key": "k"}}, "b": {"k": {"key": "k"}}}
    assert merged_row("k", job, tied, {"a": {"k": (False, 3.0)}, "b": {"k": (False, 3.0)}})["source"] == "a"


@pytest.mark.slow
def test_compare_shows_the_cascade_cost_and_saving_computed_by_hand(merged_root, tiny_clip_dir, capsys):
    run_score_stage(merged_root, ScoreConfig(fields=(*FIELDS, "best"), min_count=1))
    clip = {"model": f"local-dir:{tiny_clip_dir}"}
    run_ground_stage(merged_root, GroundConfig.model_validate({"fields": ("best",), "clip": clip, "batch_size": 8}))
    capsys.readouterr()
    assert main(["compare", str(merged_root), "--format", "json", "--field", "best", "--field", "cheap"]) == 0
    got = {c["field"]: c for c in json.loads(capsys.readouterr().out)}
    cascade = got["best"]["cascade"]
    merged = rows_of(merged_root / "captions" / "best")
    per_image = sum(r["seconds"] for r in merged) / len(merged)
    assert cascade["merged"]["seconds_per_caption"] == pytest.approx(per_image, rel=1e-5)
    costs = {f: [r["seconds"] for r in rows_of(merged_root / "captions" / f)] for f in ("cheap", "strong")}
    costliest = max(costs, key=lambda f: sum(costs[f]) / len(costs[f]))
    assert cascade["costliest"] == costliest and cascade["on_cpu"]
    strong_hours = sum(costs[costliest]) / len(costs[costliest]) * 1e6 / 3600
    assert cascade["saving_hours_per_million"] == pytest.approx(strong_hours - per_image * 1e6 / 3600, rel=1e-4)
    grounded = (
        [r["n_grounded_nouns"] for r in rows_of(merged_root / "grounding" / "best")]
        if (merged_root / "grounding" / "best").is_dir()
        else None
    )
    assert grounded is None or cascade["merged"]["grounded_nouns_per_image"] == pytest.approx(
        sum(grounded) / len(grounded)
    )
    assert cascade["won_by"] == {f: sum(r["source"] == f for r in merged) for f in FIELDS}
    assert got["cheap"]["cascade"] is None


@pytest.mark.slow
def test_a_rerun_reuses_every_shard_and_a_changed_source_is_refused_until_scored(merged_root, tiny_llava_dir):
    again = run_merge_stage(merged_root, MergeConfig(name="best", fields=FIELDS, by="grounded_nouns"))
    assert again.shards_reused == again.shards
    other = caption_config("cheap", tiny_llava_dir).model_copy(update={"replace": True})
    other = other.model_copy(update={"generation": other.generation.model_copy(update={"max_new_tokens": 8})})
    run_caption_stage(merged_root, other)
    with pytest.raises(StaleInputError, match="density of shard 0 was computed from other 'cheap' texts"):
        run_merge_stage(merged_root, MergeConfig(name="best", fields=FIELDS, by="grounded_nouns"))


@pytest.mark.slow
def test_merge_and_caption_never_write_each_others_folders(merged_root, tiny_llava_dir):
    with pytest.raises(OutputConflictError, match="densecurate merge"):
        run_caption_stage(merged_root, caption_config("best", tiny_llava_dir))
    with pytest.raises(OutputConflictError, match="densecurate caption"):
        run_merge_stage(merged_root, MergeConfig(name="strong", fields=("alt_text", "cheap"), by="valid_nouns"))


def test_merge_settings_are_refused_in_one_sentence():
    with pytest.raises(ValueError, match="name a field twice"):
        MergeConfig(name="m", fields=("a", "a"))
    with pytest.raises(ValueError, match="is a source field"):
        MergeConfig(name="a", fields=("a", "b"))
