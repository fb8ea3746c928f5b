"""`densecurate merge`: each key's best caption among several fields, checked by hand against the Parquet rows; its
cost summed over the sources; the no-caption row; refusals, resume and redo; the cascade figures of compare and the
report, computed by hand."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from statistics import mean

import pyarrow.parquet as pq
import pytest

from densecurate.cli import main
from pipeline.sample_data import write_sample_folder
from pipeline.stages.caption import run_caption_stage
from pipeline.stages.ground import run_ground_stage
from pipeline.stages.merge import MergeJob, merged_row, run_merge_stage
from pipeline.stages.score import run_score_stage
from pipeline.stages.shard import run_shard_stage
from pipeline.store.parquet_meta import read_meta, write_table_atomic
from schemas.caption_config import CaptionConfig
from schemas.errors import ConfigError, MissingInputError, OutputConflictError, StaleInputError
from schemas.ground_config import GroundConfig
from schemas.merge_config import MergeConfig
from schemas.score_config import ScoreConfig
from schemas.shard_config import ShardConfig
from schemas.tables import CAPTIONS_SCHEMA, GROUNDING_SCHEMA

FIELDS = ("alt_text", "cheap", "strong")
WITHOUT_ALT_TEXT = ("chelsea", "coins", "moon", "rocket")  # photos whose alt text is removed
COST_COLUMNS = {"captioner", "source", "seconds", "gpu_seconds", "gpus", "device"}  # what a merged row sets itself
HOUR = 3600.0


def caption_config(name: str, model: Path, **extra) -> CaptionConfig:
    settings = {"batch_size": 4, "max_new_tokens": 16, "prompt": "pixart"}
    return CaptionConfig.model_validate({"name": name, "model": {"model": str(model)}, "generation": settings, **extra})


def ground_config(clip_dir: Path, *fields: str) -> GroundConfig:
    """The tiny CLIP with a low threshold, so that captions differ in grounded nouns."""
    clip = {"model": f"local-dir:{clip_dir}"}
    return GroundConfig.model_validate(
        {"fields": fields, "clip": clip, "batch_size": 8, "grounding": {"z_threshold": 0.0}}
    )


def rows_of(folder: Path) -> list[dict]:
    return [r for path in sorted(folder.glob("*.parquet")) for r in pq.read_table(path).to_pylist()]


def by_key(root: Path, table: str, field: str) -> dict[str, dict]:
    return {r["key"]: r for r in rows_of(root / table / field)}


def alt_texts(root: Path) -> dict[str, str | None]:
    """Every written sample's alt text (None without one)."""
    return {r["key"]: r["alt_text"] for r in rows_of(root / "shards") if r["status"] == "ok"}


def texts(root: Path, field: str) -> dict[str, str | None]:
    """The field's text per key it has a row for (a captioner's: its caption when the row is ok)."""
    if field == "alt_text":
        return alt_texts(root)
    return {k: r["caption"] if r["status"] == "ok" else None for k, r in by_key(root, "captions", field).items()}


def valid_nouns(root: Path, field: str) -> dict[str, int]:
    """Per key, the caption's nouns that the field's vocabulary holds as valid (repeats counted)."""
    vocab = {r["noun"] for r in pq.read_table(root / "vocab" / f"{field}.parquet").to_pylist() if r["valid"]}
    return {k: sum(n in vocab for n in r["nouns"]) for k, r in by_key(root, "density", field).items()}


def scores(root: Path, field: str, by: str) -> dict[str, float]:
    """The field's score per key by the rule, from the density, vocabulary and grounding rows."""
    if by == "valid_nouns":
        return valid_nouns(root, field)
    column = "n_grounded_nouns" if by == "grounded_nouns" else "clip_score"
    return {k: r[column] for k, r in by_key(root, "grounding", field).items()}


def expected_source(root: Path, key: str, fields: tuple[str, ...], by: str) -> str | None:
    """The documented rule: the highest score among the fields with a caption for the key; ties to the first."""
    best = None
    for name in fields:
        text = texts(root, name).get(key)
        if not (text and text.strip()):
            continue
        score = scores(root, name, by)[key]
        if best is None or score > best[0]:
            best = (score, name)
    return best and best[1]


def spent(root: Path, key: str, fields: tuple[str, ...], column: str) -> float:
    """What every source's row of the key cost (alt text: nothing)."""
    rows = [by_key(root, "captions", f).get(key) for f in fields if f != "alt_text"]
    return sum(r[column] for r in rows if r is not None)


def check_merged(root: Path, name: str, fields: tuple[str, ...], by: str) -> dict[str, int]:
    """Every row of the merged field against the rule and the sources' rows; returns how many keys each won."""
    merged = by_key(root, "captions", name)
    assert set(merged) == set().union(*(texts(root, f) for f in fields))
    won = dict.fromkeys((*fields, None), 0)
    for key, row in merged.items():
        source = expected_source(root, key, fields, by)
        won[source] += 1
        assert (row["source"], row["captioner"]) == (source, name), key
        assert row["seconds"] == pytest.approx(spent(root, key, fields, "seconds"), rel=1e-5)
        assert row["gpu_seconds"] == pytest.approx(spent(root, key, fields, "gpu_seconds"), rel=1e-5)
        if source == "alt_text":
            assert (row["status"], row["caption"], row["model"], row["engine"]) == (
                "ok",
                alt_texts(root)[key],
                None,
                None,
            )
        elif source is not None:
            original = by_key(root, "captions", source)[key]
            assert {c: row[c] for c in original if c not in COST_COLUMNS} == {
                c: v for c, v in original.items() if c not in COST_COLUMNS
            }
        else:
            assert row["status"] == "error" and row["error"].startswith("no_caption: ") and row["caption"] is None
    return won


@pytest.fixture(scope="module")
def merged_root(ray_local, tmp_path_factory, tiny_llava_dir, tiny_qwen2_vl_dir, tiny_clip_dir) -> Path:
    """Real photos in shards of 5, some without alt text; a cheap captioner on every key, a second one on 2 keys
    per shard; every field scored and grounded with one CLIP; merged by grounded nouns into ``best``."""
    base = tmp_path_factory.mktemp("merge")
    root = base / "root"
    photos = write_sample_folder(base / "photos")
    for stem in WITHOUT_ALT_TEXT:
        (photos / f"{stem}.txt").unlink()
    run_shard_stage([photos], root, ShardConfig(shard_size=5))
    run_caption_stage(root, caption_config("cheap", tiny_llava_dir))
    run_caption_stage(root, caption_config("strong", tiny_qwen2_vl_dir, sample=2))
    run_score_stage(root, ScoreConfig(fields=FIELDS, min_count=1))
    run_ground_stage(root, ground_config(tiny_clip_dir, *FIELDS))
    run_merge_stage(root, MergeConfig(name="best", fields=FIELDS, by="grounded_nouns"))
    return root


@pytest.fixture(scope="module")
def compared_root(merged_root, tiny_clip_dir) -> Path:
    """The merged field scored and grounded too, as compare and the report read it."""
    run_score_stage(merged_root, ScoreConfig(fields=("best",), min_count=1))
    run_ground_stage(merged_root, ground_config(tiny_clip_dir, "best"))
    return merged_root


@pytest.mark.slow
def test_each_key_gets_the_caption_with_the_most_grounded_nouns(merged_root):
    won = check_merged(merged_root, "best", FIELDS, "grounded_nouns")
    assert sum(won[f] > 0 for f in FIELDS) >= 2  # the data exercises the rule: not every key from one field
    assert won[None] == 0  # the cheap captioner captioned every key


@pytest.mark.slow
def test_valid_nouns_and_clip_score_rules_with_ties_to_the_first_field(merged_root):
    for name, fields, by in (
        ("by-clip", ("strong", "cheap"), "clip_score"),
        ("by-valid", ("strong", "alt_text", "cheap"), "valid_nouns"),
    ):
        run_merge_stage(merged_root, MergeConfig(name=name, fields=fields, by=by))
        check_merged(merged_root, name, fields, by)


@pytest.mark.slow
def test_a_key_no_source_has_a_caption_for_gets_an_error_row(merged_root):
    summary = run_merge_stage(merged_root, MergeConfig(name="sparse", fields=("alt_text", "strong"), by="valid_nouns"))
    won = check_merged(merged_root, "sparse", ("alt_text", "strong"), "valid_nouns")
    strong = texts(merged_root, "strong")
    uncaptioned = {k for k, text in alt_texts(merged_root).items() if text is None and not strong.get(k)}
    assert uncaptioned and won[None] == len(uncaptioned) == summary.totals["no_caption"]
    assert {k for k, r in by_key(merged_root, "captions", "sparse").items() if r["source"] is None} == uncaptioned
    assert dict(summary.won_by) == {f: won[f] for f in ("alt_text", "strong")}
    assert summary.totals["count"] == len(alt_texts(merged_root))


def test_merged_rows_break_ties_to_the_first_field_and_sum_every_sources_spend():
    job = MergeJob(index=0, out_dir=Path("."), fingerprint="", root=Path("."), name="best", fields=("a", "b"), by="x")
    rows = {"a": {"k": {"key": "k", "seconds": 2.0, "gpus": 1.0, "gpu_seconds": 2.0, "device": "H100"}}, "b": {}}
    row = merged_row("k", job, rows, {"a": {"k": (True, None)}, "b": {}})
    assert row["status"] == "error" and row["error"].startswith("no_caption: none of a, b")
    assert row["source"] is None and row["seconds"] == 2.0 and row["gpu_seconds"] == 2.0
    tied = {
        "a": {"k": {"key": "k", "caption": "A", "seconds": 1.0, "gpus": 0.0, "gpu_seconds": 0.0, "device": "cpu"}},
        "b": {"k": {"key": "k", "caption": "B", "seconds": 3.0, "gpus": 1.0, "gpu_seconds": None, "device": "H100"}},
    }
    row = merged_row("k", job, tied, {"a": {"k": (False, 3.0)}, "b": {"k": (False, 3.0)}})
    assert (row["source"], row["caption"], row["captioner"]) == ("a", "A", "best")
    assert (row["seconds"], row["gpu_seconds"], row["gpus"], row["device"]) == (4.0, 3.0, 1.0, "H100, cpu")


def source_by_hand(root: Path, field: str) -> dict[str, float]:
    """A field on its own keys, from its Parquet rows: captions, cost and density per image (CPU: seconds)."""
    captions = rows_of(root / "captions" / field)
    cost = [r["gpu_seconds"] if r["gpus"] else r["seconds"] for r in captions]
    return {
        "keys": len(captions),
        "seconds_per_caption": mean(cost),
        "nouns_per_image": mean(r["n_nouns"] for r in rows_of(root / "density" / field)),
        "valid_nouns_per_image": mean(valid_nouns(root, field).values()),
        "grounded_nouns_per_image": mean(r["n_grounded_nouns"] for r in rows_of(root / "grounding" / field)),
    }


def cascade_by_hand(root: Path) -> dict:
    """The cascade figures of ``best`` from the Parquet rows."""
    merged = source_by_hand(root, "best")
    costs = {f: source_by_hand(root, f) for f in ("cheap", "strong")}
    costliest = max(costs, key=lambda f: costs[f]["seconds_per_caption"])
    strong = costs[costliest]
    hours, strong_hours = (x["seconds_per_caption"] * 1e6 / HOUR for x in (merged, strong))
    return {
        "merged": merged,
        "costliest": costliest,
        "hours_per_million": hours,
        "costliest_hours_per_million": strong_hours,
        "saving_hours_per_million": strong_hours - hours,
        "valid_nouns_per_hour": merged["valid_nouns_per_image"] * HOUR / merged["seconds_per_caption"],
        "costliest_valid_nouns_per_hour": strong["valid_nouns_per_image"] * HOUR / strong["seconds_per_caption"],
        "grounded_nouns_per_hour": merged["grounded_nouns_per_image"] * HOUR / merged["seconds_per_caption"],
        "costliest_grounded_nouns_per_hour": strong["grounded_nouns_per_image"] * HOUR / strong["seconds_per_caption"],
    }


def assert_cascade(got: dict, expected: dict) -> None:
    for name, value in expected.items():
        if isinstance(value, dict):
            assert {k: got[name][k] for k in value} == pytest.approx(value, rel=1e-4), name
        else:
            assert got[name] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-4)), name


def compare_json(root: Path, capsys) -> dict[str, dict]:
    capsys.readouterr()
    assert main(["compare", str(root), "--format", "json", "--field", "best", "--field", "cheap"]) == 0
    return {c["field"]: c for c in json.loads(capsys.readouterr().out)}


@pytest.mark.slow
def test_compare_and_the_report_show_the_cascade_computed_by_hand(compared_root, tmp_path, capsys):
    got = compare_json(compared_root, capsys)
    cascade = got["best"]["cascade"]
    assert_cascade(cascade, cascade_by_hand(compared_root))
    merged = rows_of(compared_root / "captions" / "best")
    assert cascade["won_by"] == {f: sum(r["source"] == f for r in merged) for f in FIELDS}
    assert (cascade["no_caption"], cascade["rule"], cascade["on_cpu"]) == (0, "grounded_nouns", True)
    assert got["best"]["gpu_seconds_per_caption"] == pytest.approx(mean(r["seconds"] for r in merged), rel=1e-5)
    assert got["cheap"]["cascade"] is None
    assert main(["compare", str(compared_root), "--field", "best", "--field", "cheap"]) == 0
    table = capsys.readouterr().out
    assert "cascade best" in table and "CPU-worker-hours per 1M images" in table and "CPU-worker seconds" in table
    page = tmp_path / "report.html"
    assert main(["report", str(compared_root), "--html", str(page), "--gallery", "0"]) == 0
    html = page.read_text()
    assert 'id="cascade-best"' in html and "saving per 1M images (CPU-worker-hours)" in html
    assert "CPU-worker seconds" in html and "cascade best" in capsys.readouterr().out


def on_gpus(path: Path, gpu_seconds) -> None:
    """Rewrite a caption table as if captioned on one GPU each, with ``gpu_seconds(row)`` (same fingerprint)."""
    rows = [
        {**r, "gpus": 1.0, "gpu_seconds": gpu_seconds(r), "device": "NVIDIA H100"}
        for r in pq.read_table(path).to_pylist()
    ]
    write_table_atomic(path, rows, CAPTIONS_SCHEMA, read_meta(path))


@pytest.mark.slow
def test_on_gpus_merge_sums_and_compare_counts_the_gpu_seconds_column(compared_root, tmp_path, capsys):
    root = tmp_path / "root"
    shutil.copytree(compared_root, root)
    for field in ("cheap", "strong"):
        for path in sorted((root / "captions" / field).glob("*.parquet")):
            on_gpus(path, lambda r: 3 * r["seconds"])  # not seconds x gpus: the column is what counts
    for path in (root / "captions" / "best").glob("*.parquet"):
        path.unlink()
    summary = run_merge_stage(root, MergeConfig(name="best", fields=FIELDS, by="grounded_nouns"))
    assert summary.shards_reused == 0
    for key, row in by_key(root, "captions", "best").items():
        assert row["gpu_seconds"] == pytest.approx(spent(root, key, FIELDS, "gpu_seconds"), rel=1e-5)
        assert (row["gpus"], row["device"]) == (1.0, "NVIDIA H100")
    got = compare_json(root, capsys)
    cascade = got["best"]["cascade"]
    assert_cascade(cascade, cascade_by_hand(root))
    assert cascade["on_cpu"] is False and not got["best"]["on_cpu"]
    merged = rows_of(root / "captions" / "best")
    assert got["best"]["gpu_seconds_per_caption"] == pytest.approx(mean(r["gpu_seconds"] for r in merged), rel=1e-5)
    assert main(["compare", str(root), "--field", "best", "--field", "cheap"]) == 0
    table = capsys.readouterr().out
    assert "GPU-hours per 1M images" in table and "CPU-worker" not in table


@pytest.mark.slow
def test_sources_must_be_captioned_scored_and_grounded_with_one_clip_model(merged_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(merged_root, root)
    (root / "grounding" / "strong" / "00001.parquet").unlink()
    with pytest.raises(MissingInputError, match="shard 1 is not grounded for 'strong'"):
        run_merge_stage(root, MergeConfig(name="m", fields=("cheap", "strong"), by="grounded_nouns"))
    grounding = root / "grounding" / "strong" / "00000.parquet"
    meta = read_meta(grounding)
    write_table_atomic(grounding, pq.read_table(grounding).to_pylist(), GROUNDING_SCHEMA, {**meta, "model": "other"})
    model = read_meta(root / "grounding" / "cheap" / "00000.parquet")["model"]
    with pytest.raises(ConfigError, match=f"'cheap' was grounded with {model} and 'strong' with other: ground every"):
        run_merge_stage(root, MergeConfig(name="m", fields=("cheap", "strong"), by="clip_score"))
    run_merge_stage(root, MergeConfig(name="m", fields=("cheap", "strong"), by="valid_nouns"))  # reads no grounding
    (root / "captions" / "strong" / "00002.parquet").unlink()
    with pytest.raises(MissingInputError, match="shard 2 has no 'strong' captions"):
        run_merge_stage(root, MergeConfig(name="m", fields=("cheap", "strong"), by="valid_nouns"))
    (root / "vocab" / "strong.parquet").unlink()
    with pytest.raises(MissingInputError, match="'strong' is not scored"):
        run_merge_stage(root, MergeConfig(name="m", fields=("cheap", "strong"), by="valid_nouns"))
    with pytest.raises(MissingInputError, match="no caption field 'nope'"):
        run_merge_stage(root, MergeConfig(name="m", fields=("cheap", "nope"), by="valid_nouns"))


@pytest.mark.slow
def test_merge_and_caption_never_write_each_others_folders(merged_root, tiny_llava_dir):
    with pytest.raises(OutputConflictError, match="densecurate merge"):
        run_caption_stage(merged_root, caption_config("best", tiny_llava_dir))
    with pytest.raises(OutputConflictError, match="densecurate caption"):
        run_merge_stage(merged_root, MergeConfig(name="strong", fields=("alt_text", "cheap"), by="valid_nouns"))


@pytest.mark.slow
def test_a_rerun_reuses_every_shard_and_a_changed_source_redoes_the_merge_once_rescored(merged_root, tiny_llava_dir):
    config = MergeConfig(name="best", fields=FIELDS, by="grounded_nouns")
    again = run_merge_stage(merged_root, config)
    assert again.shards_reused == again.shards == 3
    by_valid = MergeConfig(name="by-valid", fields=("strong", "alt_text", "cheap"), by="valid_nouns")
    run_merge_stage(merged_root, by_valid)
    other = caption_config("cheap", tiny_llava_dir).model_copy(update={"replace": True})
    other = other.model_copy(update={"generation": other.generation.model_copy(update={"max_new_tokens": 8})})
    run_caption_stage(merged_root, other)
    with pytest.raises(StaleInputError, match="density of shard 0 was computed from other 'cheap' texts"):
        run_merge_stage(merged_root, by_valid)
    run_score_stage(merged_root, ScoreConfig(fields=("cheap",), min_count=1))
    with pytest.raises(StaleInputError, match="grounding of shard 0 was made from other 'cheap' density"):
        run_merge_stage(merged_root, config)
    redone = run_merge_stage(merged_root, by_valid)
    assert redone.shards_reused == 0
    check_merged(merged_root, "by-valid", by_valid.fields, "valid_nouns")


def test_merge_settings_are_refused_in_one_sentence():
    with pytest.raises(ValueError, match="name a field twice"):
        MergeConfig(name="m", fields=("a", "a"))
    with pytest.raises(ValueError, match="is a source field"):
        MergeConfig(name="a", fields=("a", "b"))
    with pytest.raises(ValueError, match="is a source field"):
        MergeConfig(name="alt_text", fields=("a", "b"))
    with pytest.raises(ValueError, match="at least 2 items"):
        MergeConfig(name="m", fields=("a",))
