"""Captioning the keys a query chooses (`caption --keys-query`): exactly the chosen keys, resumable, the choice
recorded with the fingerprints of the tables it read, and every row's provenance."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from captioner.prompts import PRESETS
from densecurate.cli import main
from pipeline.sample_data import write_sample_folder
from pipeline.stages.caption import run_caption_stage
from pipeline.stages.score import run_score_stage
from pipeline.stages.shard import run_shard_stage
from pipeline.store.catalog import QueryError
from pipeline.store.parquet_meta import read_meta
from schemas.caption_config import CaptionConfig
from schemas.errors import ConfigError, OutputConflictError
from schemas.score_config import ScoreConfig
from schemas.shard_config import ShardConfig

FEW_NOUNS = "SELECT key FROM density WHERE field = 'cheap' AND n_nouns < {n}"


def caption_config(name: str, model: Path, **extra) -> CaptionConfig:
    settings = {"batch_size": 4, "max_new_tokens": 12, "prompt": "pixart"}
    return CaptionConfig.model_validate({"name": name, "model": {"model": str(model)}, "generation": settings, **extra})


def rows_of(folder: Path) -> list[dict]:
    return [r for path in sorted(folder.glob("*.parquet")) for r in pq.read_table(path).to_pylist()]


def nouns_by_key(root: Path) -> dict[str, int]:
    return {r["key"]: r["n_nouns"] for r in rows_of(root / "density" / "cheap")}


@pytest.fixture(scope="module")
def cheap_root(ray_local, tmp_path_factory, tiny_llava_dir) -> Path:
    """Real photos in shards of 5 (some without alt text); a cheap captioner on every key, scored."""
    base = tmp_path_factory.mktemp("keys_query")
    root = base / "root"
    run_shard_stage([write_sample_folder(base / "photos")], root, ShardConfig(shard_size=5))
    run_caption_stage(root, caption_config("cheap", tiny_llava_dir))
    run_score_stage(root, ScoreConfig(fields=("alt_text", "cheap"), min_count=1))
    return root


def median_nouns(root: Path) -> int:
    counts = sorted(nouns_by_key(root).values())
    return counts[len(counts) // 2]


@pytest.mark.slow
def test_the_query_chooses_exactly_the_keys_captioned_each_once(cheap_root, tiny_qwen2_vl_dir):
    n = median_nouns(cheap_root)
    chosen = {k for k, nouns in nouns_by_key(cheap_root).items() if nouns < n}
    assert 0 < len(chosen) < len(nouns_by_key(cheap_root))
    summary = run_caption_stage(
        cheap_root, caption_config("strong", tiny_qwen2_vl_dir, keys_query=FEW_NOUNS.format(n=n))
    )
    rows = rows_of(cheap_root / "captions" / "strong")
    assert sorted(r["key"] for r in rows) == sorted(chosen)
    assert summary.captions_this_run == len(chosen) and summary.selection.chosen == len(chosen)
    for path in (cheap_root / "captions" / "strong").glob("*.parquet"):
        selection = read_meta(path)["selection"]
        assert selection["query"] == FEW_NOUNS.format(n=n)
        assert set(selection["tables"]) == {"density", "vocab"}  # the density view is made with the vocabulary
        assert selection["keys"] == len(pq.read_table(path))
    again = run_caption_stage(cheap_root, caption_config("strong", tiny_qwen2_vl_dir, keys_query=FEW_NOUNS.format(n=n)))
    assert again.shards_reused == again.shards and again.captions_this_run == 0 and not again.changed_views


@pytest.mark.slow
def test_a_wider_query_captions_only_the_new_keys_and_keeps_the_rows_made(cheap_root, tiny_qwen2_vl_dir):
    n = median_nouns(cheap_root)
    narrow = caption_config("wider", tiny_qwen2_vl_dir, keys_query=FEW_NOUNS.format(n=n))
    run_caption_stage(cheap_root, narrow)
    before = {r["key"]: r for r in rows_of(cheap_root / "captions" / "wider")}
    wide = run_caption_stage(cheap_root, caption_config("wider", tiny_qwen2_vl_dir, keys_query=FEW_NOUNS.format(n=99)))
    after = {r["key"]: r for r in rows_of(cheap_root / "captions" / "wider")}
    assert set(after) == set(nouns_by_key(cheap_root)) and len(after) == len(rows_of(cheap_root / "captions" / "wider"))
    assert wide.captions_this_run == len(after) - len(before)
    assert {k: after[k] for k in before} == before  # the very rows, timings included


@pytest.mark.slow
def test_a_rerun_after_the_tables_it_read_changed_says_so(cheap_root, tiny_qwen2_vl_dir):
    config = caption_config("changes", tiny_qwen2_vl_dir, keys_query=FEW_NOUNS.format(n=median_nouns(cheap_root)))
    run_caption_stage(cheap_root, config)
    run_score_stage(cheap_root, ScoreConfig(fields=("cheap",), min_count=2))  # rewrites the vocabulary
    again = run_caption_stage(cheap_root, config)
    assert again.changed_views == ["vocab"]
    assert again.captions_this_run == 0  # the same keys were chosen
    text = "\n".join(str(cell) for column in again.render().columns for cell in column._cells)
    assert "vocab changed since the last run of this query" in text
    run_score_stage(cheap_root, ScoreConfig(fields=("alt_text", "cheap"), min_count=1))


@pytest.mark.slow
def test_rows_record_their_provenance(cheap_root, tiny_llava_dir):
    digest = hashlib.sha256()
    for path in sorted(p for p in tiny_llava_dir.rglob("*.safetensors")):
        file_digest = hashlib.sha256(path.read_bytes()).hexdigest()
        digest.update(f"{path.relative_to(tiny_llava_dir).as_posix()}\0{file_digest}\n".encode())
    import transformers

    for row in rows_of(cheap_root / "captions" / "cheap"):
        assert row["model_sha256"] == digest.hexdigest()
        assert row["prompt_sha256"] == hashlib.sha256(PRESETS["pixart"].encode()).hexdigest()
        assert row["engine_version"] == f"transformers {transformers.__version__}"
        assert row["gpu_seconds"] == 0.0 and row["gpus"] == 0.0 and row["device"] == "cpu"
        assert row["source"] is None and row["max_new_tokens"] == 12 and row["engine"] == "transformers"


@pytest.mark.slow
def test_queries_without_keys_or_that_write_are_one_sentence(cheap_root, tiny_qwen2_vl_dir, capsys):
    with pytest.raises(ConfigError, match="must return a `key` column; it returned field"):
        run_caption_stage(cheap_root, caption_config("bad", tiny_qwen2_vl_dir, keys_query="SELECT field FROM density"))
    with pytest.raises(QueryError, match="read-only"):
        run_caption_stage(cheap_root, caption_config("bad", tiny_qwen2_vl_dir, keys_query="DROP VIEW density"))
    with pytest.raises(QueryError, match="syntax error"):
        run_caption_stage(cheap_root, caption_config("bad", tiny_qwen2_vl_dir, keys_query="SELEC key FROM"))
    args = ["caption", str(cheap_root), "--model", str(tiny_qwen2_vl_dir), "--name", "bad", "--keys-query"]
    assert main([*args, "SELECT key FROM nowhere"]) != 0
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.slow
def test_a_query_never_replaces_a_full_run_of_other_settings(cheap_root, tiny_qwen2_vl_dir):
    before = {p: p.read_bytes() for p in (cheap_root / "captions" / "cheap").glob("*.parquet")}
    with pytest.raises(OutputConflictError, match="a sample or a keys query would replace them"):
        run_caption_stage(cheap_root, caption_config("cheap", tiny_qwen2_vl_dir, keys_query=FEW_NOUNS.format(n=99)))
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.slow
def test_stats_sum_gpu_hours_per_field_and_per_model(cheap_root, tiny_llava_dir, capsys):
    assert main(["stats", str(cheap_root)]) == 0
    out = capsys.readouterr().out
    assert "GPU-hours by caption field" in out and "GPU-hours by model" in out
    by_model = out.split("GPU-hours by model")[1]
    assert str(tiny_llava_dir) in by_model.replace("\n", "") or tiny_llava_dir.name in by_model
    assert "transformers" in by_model
