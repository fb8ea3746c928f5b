"""Curation rules, the report (console and HTML in headless Chromium), on a real shard -> caption -> score run."""

from __future__ import annotations

import json
import re
import subprocess
import tarfile

import pytest

from densecurate.cli import main
from pipeline.report.html import _capped, _histogram_cap
from pipeline.sample_data import write_sample_folder
from pipeline.stages.caption import run_caption_stage
from pipeline.stages.curate import first_failed_rule, run_curate_stage
from pipeline.stages.score import run_score_stage
from pipeline.stages.shard import run_shard_stage
from pipeline.store.catalog import run_query
from schemas.caption_config import CaptionConfig
from schemas.errors import StaleInputError
from schemas.score_config import CurateConfig, CurateRules, ScoreConfig
from schemas.shard_config import ShardConfig
from tests.chromium import browser_command, rendered_dom


@pytest.fixture(scope="module")
def pipeline_root(ray_local, tiny_llava_dir, tmp_path_factory):
    """shard -> caption (tiny LLaVA) -> score alt_text and the captions: the real stages, end to end."""
    base = tmp_path_factory.mktemp("curate")
    root = base / "root"
    run_shard_stage([write_sample_folder(base / "photos")], root, ShardConfig(shard_size=4))
    caption = {"name": "tiny", "model": {"model": str(tiny_llava_dir)}, "generation": {"max_new_tokens": 24}}
    run_caption_stage(root, CaptionConfig.model_validate(caption))
    run_score_stage(root, ScoreConfig(fields=("alt_text", "tiny"), min_count=1))
    return root


def test_rules_in_order():
    rules = CurateRules(min_words=2, drop_flagged=True, min_nouns=2, min_valid_nouns=1)
    sample = {"caption": "a cat on a sofa", "n_tokens": 5, "flagged": False, "n_nouns": 2, "n_valid_nouns": 1}
    assert first_failed_rule(sample, rules) is None
    assert first_failed_rule({**sample, "caption": None, "n_tokens": None}, rules)[0] == "missing_caption"
    assert first_failed_rule({**sample, "n_tokens": 1}, rules)[0] == "min_words"
    assert first_failed_rule({**sample, "flagged": True, "n_nouns": 0}, rules)[0] == "drop_flagged"
    assert first_failed_rule({**sample, "n_nouns": 1}, rules)[0] == "min_nouns"
    assert first_failed_rule({**sample, "n_valid_nouns": 0}, rules)[0] == "min_valid_nouns"


def test_curate_alt_text_by_noun_count(pipeline_root, tmp_path):
    expected_kept = run_query(pipeline_root, "SELECT count(*) FROM density WHERE field = 'alt_text' AND n_nouns >= 4")[
        1
    ][0][0]
    config = CurateConfig(field="alt_text", rules=CurateRules(min_nouns=4))
    summary = run_curate_stage(pipeline_root, tmp_path / "curated", config)
    assert summary.inputs == 10 and summary.kept == expected_kept
    assert summary.removed_by_rule == {"min_nouns": 10 - expected_kept}
    assert 0 < expected_kept < 10, "the rule must keep some and drop some"
    kept_txt = {}
    for tar in sorted((tmp_path / "curated").glob("*.tar")):
        with tarfile.open(tar) as tf:
            for member in tf:
                key, ext = member.name.split(".", 1)
                data = tf.extractfile(member).read()
                if ext == "txt":
                    kept_txt[key] = data.decode()
                if ext == "json":
                    meta = json.loads(data)
                    assert meta["caption_field"] == "alt_text" and meta["density"]["n_nouns"] >= 4
    alt = dict(run_query(pipeline_root, "SELECT key, alt_text FROM samples WHERE status = 'ok'")[1])
    assert kept_txt and all(alt[k] == v for k, v in kept_txt.items())
    again = run_curate_stage(pipeline_root, tmp_path / "curated", config)
    assert again.shards_reused == again.shards == 4


def test_curate_captions_drop_flagged(pipeline_root, tmp_path):
    flagged = run_query(
        pipeline_root, "SELECT count(*) FROM captions WHERE captioner = 'tiny' AND (truncated OR repetitive OR empty)"
    )[1][0][0]
    summary = run_curate_stage(
        pipeline_root, tmp_path / "c", CurateConfig(field="tiny", rules=CurateRules(drop_flagged=True))
    )
    assert summary.removed_by_rule.get("drop_flagged", 0) == flagged > 0
    assert summary.kept + sum(summary.removed_by_rule.values()) == 10


def test_curate_yaml_config_and_its_errors(pipeline_root, tmp_path, capsys):
    good = tmp_path / "curate.yaml"
    good.write_text("min_nouns: 4\ndrop_flagged: false\n")
    out = tmp_path / "yaml_out"
    assert main(["curate", str(pipeline_root), "--field", "alt_text", "--out", str(out), "--config", str(good)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"removed by min_nouns\s*│\s*[1-9]", printed)
    bad = tmp_path / "bad.yaml"
    bad.write_text("min_nouns: many\n")
    assert main(["curate", str(pipeline_root), "--field", "alt_text", "--out", str(out), "--config", str(bad)]) == 2
    assert "bad.yaml: min_nouns: Input should be a valid integer" in capsys.readouterr().err
    bad.write_text("min_noun: 3\n")
    assert main(["curate", str(pipeline_root), "--field", "alt_text", "--out", str(out), "--config", str(bad)]) == 2
    assert "bad.yaml: min_noun: Extra inputs are not permitted" in capsys.readouterr().err


def test_curate_needs_a_scored_field(pipeline_root, tmp_path, capsys):
    assert main(["curate", str(pipeline_root), "--field", "other", "--out", str(tmp_path / "x")]) == 2
    assert "densecurate score" in capsys.readouterr().err


def test_report_on_the_console(pipeline_root, capsys):
    assert main(["report", str(pipeline_root)]) == 0
    out = capsys.readouterr().out
    for text in ("VN / DN", "nouns per image", "most frequent nouns", "captions flagged truncated", "alt_text", "tiny"):
        assert text in out


@pytest.mark.slow
def test_html_report_renders_in_chromium(pipeline_root, tmp_path):
    page = tmp_path / "report.html"
    assert main(["report", str(pipeline_root), "--html", str(page), "--gallery", "6"]) == 0
    text = page.read_text()
    assert "http://" not in text and "https://" not in text, "the page must be self-contained"
    assert text.count('<mark class="valid"') + text.count('<mark class="rare"') > 0
    dom, log = rendered_dom(page, tmp_path / "profile", width=1400)
    assert 'data-broken-images="0"' in dom
    assert 'data-sideways-scroll="false"' in dom, "long tokens must wrap inside their card"
    tallest = int(re.search(r'data-tallest-card="(\d+)"', dom).group(1))
    assert 0 < tallest < 900, f"a gallery card is {tallest} px tall"
    assert dom.count("<img") == 6 + 3  # gallery thumbnails, two plots and the density-against-cost plot
    console_errors = [line for line in log.splitlines() if "CONSOLE" in line and "rror" in line]
    assert console_errors == []
    shot = tmp_path / "report.png"
    browser = browser_command(tmp_path / "profile")
    subprocess.run([*browser, f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()], timeout=120)
    assert shot.stat().st_size > 10_000


@pytest.mark.slow
def test_a_long_token_wraps_inside_its_gallery_card(ray_local, tmp_path):
    """A caption that repeats one token with no space (a captioner stuck in a loop) must neither push the page
    sideways nor make its card thousands of pixels tall."""
    photos = write_sample_folder(tmp_path / "photos", with_bad_files=False)
    (photos / "coffee.txt").write_text("cup" * 2000 + "\n")
    (photos / "moon.txt").write_text(" ".join(["moon surface crater"] * 300) + "\n")
    root = tmp_path / "root"
    run_shard_stage([photos], root, ShardConfig(shard_size=100))
    run_score_stage(root, ScoreConfig(fields=("alt_text",), min_count=1))
    page = tmp_path / "report.html"
    assert main(["report", str(root), "--html", str(page), "--gallery", "10"]) == 0
    dom, _ = rendered_dom(page, tmp_path / "profile", width=1400)
    assert 'data-sideways-scroll="false"' in dom
    assert 0 < int(re.search(r'data-tallest-card="(\d+)"', dom).group(1)) < 900


@pytest.mark.slow
def test_curate_refuses_density_older_than_the_captions(ray_local, tiny_llava_dir, tmp_path):
    root = tmp_path / "root"
    run_shard_stage([write_sample_folder(tmp_path / "photos")], root, ShardConfig(shard_size=100))
    caption = {"name": "tiny", "model": {"model": str(tiny_llava_dir)}, "generation": {"max_new_tokens": 8}}
    run_caption_stage(root, CaptionConfig.model_validate(caption))
    run_score_stage(root, ScoreConfig(fields=("tiny",)))
    caption["generation"]["max_new_tokens"] = 12  # re-caption, but do not re-score
    run_caption_stage(root, CaptionConfig.model_validate({**caption, "replace": True}))
    with pytest.raises(StaleInputError, match="rerun `densecurate score"):
        run_curate_stage(root, tmp_path / "curated", CurateConfig(field="tiny"))


def test_the_nouns_histogram_gathers_a_few_run_on_captions_in_its_last_bar():
    histogram = [(2, 30), (3, 40), (4, 25), (900, 5)]
    cap = _histogram_cap(histogram)
    assert cap == 10  # 95% of captions have at most 4 nouns; never fewer than 10 bars
    assert _capped(histogram, cap) == {**dict.fromkeys(range(11), 0), 2: 30, 3: 40, 4: 25, 10: 5}
    assert _histogram_cap([(n, 1) for n in range(100)]) == 90


def test_a_rule_that_removes_more_than_half_of_what_it_sees_is_named(pipeline_root, tmp_path, capsys):
    out = tmp_path / "curated"
    assert main(["curate", str(pipeline_root), "--out", str(out), "--field", "alt_text", "--min-nouns", "50"]) == 0
    printed = capsys.readouterr().out
    assert "warning: rule min_nouns removed 10 of the 10 samples it saw (100%)" in " ".join(printed.split())
    assert main(["curate", str(pipeline_root), "--out", str(tmp_path / "all"), "--field", "alt_text"]) == 0
    assert "warning" not in capsys.readouterr().out
