"""Choosing a captioner by measurement: sample captioning with two model families, `densecurate compare`
recomputed by hand from the Parquet rows, a full run that keeps the sampled rows, and the report's section."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from densecurate.cli import main
from pipeline.report.compare import pareto_front
from pipeline.sample_data import write_sample_folder
from pipeline.stages.caption import run_caption_stage
from pipeline.stages.curate import run_curate_stage
from pipeline.stages.ground import run_ground_stage
from pipeline.stages.score import run_score_stage
from pipeline.stages.shard import run_shard_stage
from pipeline.store.parquet_meta import read_meta, write_table_atomic
from schemas.caption_config import CaptionConfig
from schemas.errors import MissingInputError, OutputConflictError
from schemas.ground_config import GroundConfig
from schemas.score_config import CurateConfig, ScoreConfig
from schemas.shard_config import ShardConfig
from schemas.tables import CAPTIONS_SCHEMA
from tests.chromium import rendered_dom

FIELDS = ("alt_text", "llava", "qwen")
MIN_COUNT = 1  # valid: seen more than once among the compared keys (a sample is small)


def caption_config(name: str, model: Path, **extra) -> CaptionConfig:
    settings = {"batch_size": 4, "max_new_tokens": 12, "prompt": "pixart"}
    return CaptionConfig.model_validate({"name": name, "model": {"model": str(model)}, "generation": settings, **extra})


def rows_of(folder: Path) -> list[dict]:
    return [r for path in sorted(folder.glob("*.parquet")) for r in pq.read_table(path).to_pylist()]


def shard_keys(root: Path) -> dict[int, list[str]]:
    """The written keys of each shard, from the shards' Parquet."""
    found = {}
    for path in sorted((root / "shards").glob("*.parquet")):
        found[int(path.stem)] = [r["key"] for r in pq.read_table(path).to_pylist() if r["status"] == "ok"]
    return found


def by_hand_sample(keys: list[str], size: float, seed: int) -> set[str]:
    """The documented rule: sha256 of ``seed NUL key``, first 8 bytes; the lowest N, or those below f * 2**64."""

    def rank(key: str) -> int:
        return int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode()).digest()[:8], "big")

    if size < 1:
        return {k for k in keys if rank(k) < size * 2**64}
    return set(sorted(keys, key=rank)[: int(size)])


@pytest.fixture(scope="module")
def models(tiny_llava_dir, tiny_qwen2_vl_dir) -> dict[str, Path]:
    return {"llava": tiny_llava_dir, "qwen": tiny_qwen2_vl_dir}


@pytest.fixture(scope="module")
def sampled_root(ray_local, tmp_path_factory, models) -> Path:
    """Real photos in shards of 5; both families caption the same 2 keys per shard; all fields scored."""
    base = tmp_path_factory.mktemp("compare")
    root = base / "root"
    run_shard_stage([write_sample_folder(base / "photos")], root, ShardConfig(shard_size=5))
    for name, model in models.items():
        run_caption_stage(root, caption_config(name, model, sample=2))
    run_score_stage(root, ScoreConfig(fields=FIELDS, min_count=MIN_COUNT))
    return root


def compare_json(root: Path, capsys, *fields: str) -> dict[str, dict]:
    args = ["compare", str(root), "--format", "json"] + [a for f in fields for a in ("--field", f)]
    assert main(args) == 0
    return {c["field"]: c for c in json.loads(capsys.readouterr().out)}


@pytest.mark.slow
def test_the_sample_is_the_same_keys_for_both_families_chosen_from_key_and_seed(sampled_root):
    expected = set().union(*(by_hand_sample(keys, 2, 0) for keys in shard_keys(sampled_root).values()))
    assert len(expected) == 2 * len(shard_keys(sampled_root))
    for name in ("llava", "qwen"):
        rows = rows_of(sampled_root / "captions" / name)
        assert sorted(r["key"] for r in rows) == sorted(expected)
        assert len({r["model"] for r in rows}) == 1
        for path in (sampled_root / "captions" / name).glob("*.parquet"):
            meta = read_meta(path)
            assert meta["sample"] == {"size": 2, "seed": 0} and meta["settings"]["sample"] == 2
    models = {name: rows_of(sampled_root / "captions" / name)[0]["model"] for name in ("llava", "qwen")}
    assert models["llava"] != models["qwen"]


@pytest.mark.slow
def test_a_rerun_of_the_sample_captions_nothing(sampled_root, models):
    before = {p: p.read_bytes() for p in (sampled_root / "captions" / "qwen").glob("*.parquet")}
    again = run_caption_stage(sampled_root, caption_config("qwen", models["qwen"], sample=2))
    assert again.shards_reused == again.shards and again.captions_this_run == 0
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.slow
def test_a_fraction_samples_each_key_by_its_rank(sampled_root, models):
    run_caption_stage(sampled_root, caption_config("half", models["llava"], sample=0.5, sample_seed=3))
    expected = set().union(*(by_hand_sample(keys, 0.5, 3) for keys in shard_keys(sampled_root).values()))
    assert 0 < len(expected) < sum(len(k) for k in shard_keys(sampled_root).values())
    assert {r["key"] for r in rows_of(sampled_root / "captions" / "half")} == expected


@pytest.mark.slow
def test_a_full_run_keeps_the_sampled_rows_and_a_later_sample_keeps_the_full_run(sampled_root, models):
    sample = run_caption_stage(sampled_root, caption_config("full", models["llava"], sample=2))
    sampled = {r["key"]: r for r in rows_of(sampled_root / "captions" / "full")}
    full = run_caption_stage(sampled_root, caption_config("full", models["llava"]))
    rows = rows_of(sampled_root / "captions" / "full")
    every_key = sorted(k for keys in shard_keys(sampled_root).values() for k in keys)
    assert sorted(r["key"] for r in rows) == every_key  # each key once
    assert full.totals["reused"] == len(sampled) == sample.captions_this_run
    assert full.captions_this_run == len(every_key) - len(sampled)
    kept = {r["key"]: r for r in rows if r["key"] in sampled}
    assert kept == sampled  # the very rows, timings included
    again = run_caption_stage(sampled_root, caption_config("full", models["llava"], sample=2))
    assert again.shards_reused == again.shards and again.captions_this_run == 0
    assert len(rows_of(sampled_root / "captions" / "full")) == len(every_key)


@pytest.mark.slow
def test_a_sample_with_other_settings_never_replaces_a_full_run(sampled_root, models):
    run_caption_stage(sampled_root, caption_config("kept", models["llava"]))
    before = {p: p.read_bytes() for p in (sampled_root / "captions" / "kept").glob("*.parquet")}
    other = caption_config("kept", models["llava"], sample=2).model_copy(
        update={"generation": caption_config("kept", models["llava"]).generation.model_copy(update={"seed": 1})}
    )
    with pytest.raises(OutputConflictError, match="under another --name"):
        run_caption_stage(sampled_root, other)
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.slow
def test_curating_a_sampled_field_is_refused(sampled_root, tmp_path):
    with pytest.raises(MissingInputError, match="holds a sample"):
        run_curate_stage(sampled_root, tmp_path / "curated", CurateConfig(field="qwen"))
    assert not (tmp_path / "curated").exists()


def by_hand(root: Path, fields: tuple[str, ...]) -> dict[str, dict]:
    """The comparison recomputed from the Parquet rows with pyarrow and Python."""
    density = {f: {r["key"]: r for r in rows_of(root / "density" / f)} for f in fields}
    common = set.intersection(*(set(rows) for rows in density.values()))
    out = {}
    for f in fields:
        rows = [density[f][k] for k in sorted(common)]
        repeated = set()
        if f != "alt_text":  # a caption flagged repetitive counts each noun once
            repeated = {r["key"] for r in rows_of(root / "captions" / f) if r["status"] == "ok" and r["repetitive"]}
        nouns = {r["key"]: list(dict.fromkeys(r["nouns"])) if r["key"] in repeated else r["nouns"] for r in rows}
        counts = Counter(noun for r in rows for noun in nouns[r["key"]])
        valid = [sum(counts[n] > MIN_COUNT for n in nouns[r["key"]]) for r in rows]
        figures = {
            "keys": len(rows),
            "captions": sum(not r["missing"] for r in rows),
            "words_per_caption": sum(r["n_tokens"] for r in rows) / len(rows),
            "nouns_per_image": sum(len(nouns[r["key"]]) for r in rows) / len(rows),
            "valid_nouns_per_image": sum(valid) / len(rows),
        }
        if f != "alt_text":
            caps = [r for r in rows_of(root / "captions" / f) if r["key"] in common]
            ok = [r for r in caps if r["status"] == "ok"]
            cost = sum(r["seconds"] * (r["gpus"] if r["gpus"] else 1) for r in caps) / len(caps)
            figures |= {
                "tokens_per_caption": sum(r["num_tokens"] for r in ok) / len(ok),
                "truncated_share": sum(r["truncated"] for r in ok) / len(ok),
                "repetitive_share": sum(r["repetitive"] for r in ok) / len(ok),
                "empty_share": sum(r["empty"] for r in ok) / len(ok),
                "gpu_seconds_per_caption": cost,
                "valid_nouns_per_gpu_second": figures["valid_nouns_per_image"] / cost,
                "gpu_hours_per_million": cost * 1e6 / 3600,
                "gpu_hours_per_ten_million": cost * 1e7 / 3600,
            }
        out[f] = figures
    return out


@pytest.mark.slow
def test_compare_matches_a_hand_computation_from_the_rows(sampled_root, capsys):
    got = compare_json(sampled_root, capsys, *FIELDS)
    expected = by_hand(sampled_root, FIELDS)
    assert set(got) == set(FIELDS)
    for f, figures in expected.items():
        for name, value in figures.items():
            assert got[f][name] == pytest.approx(value, rel=1e-5), (f, name)
    assert got["llava"]["keys"] == 2 * len(shard_keys(sampled_root))
    # the min-count rule is exercised: a field with some, but not all, of its nouns valid
    assert any(0 < got[f]["valid_nouns_per_image"] < got[f]["nouns_per_image"] for f in FIELDS)
    # the repetition rule is exercised: some caption flagged repetitive repeats a noun
    repeats = [
        r
        for f in ("llava", "qwen")
        for r in rows_of(sampled_root / "density" / f)
        if r["key"] in {c["key"] for c in rows_of(sampled_root / "captions" / f) if c["repetitive"]}
        and len(set(r["nouns"])) < len(r["nouns"])
    ]
    assert repeats
    for f in ("llava", "qwen"):
        assert got[f]["device"] == "cpu" and got[f]["on_cpu"] is True
        assert got[f]["grounded_nouns_per_image"] is None
    alt = got["alt_text"]
    assert alt["gpu_seconds_per_caption"] == 0 and alt["gpu_hours_per_million"] == 0
    assert alt["valid_nouns_per_gpu_second"] is None and alt["device"] is None
    points = [(got[f]["gpu_seconds_per_caption"], got[f]["valid_nouns_per_image"]) for f in FIELDS]
    assert [got[f]["on_pareto_front"] for f in FIELDS] == pareto_front(points)
    assert alt["on_pareto_front"]  # nothing is cheaper than the alt text


@pytest.mark.slow
def test_gpu_seconds_are_seconds_times_the_gpus_a_worker_held(sampled_root, tmp_path, capsys):
    root = tmp_path / "root"
    shutil.copytree(sampled_root, root)
    for path in (root / "captions" / "qwen").glob("*.parquet"):
        rows = [
            {**r, "gpus": 0.5, "gpu_seconds": 0.5 * r["seconds"], "device": "NVIDIA H100 80GB HBM3"}
            for r in pq.read_table(path).to_pylist()
        ]
        write_table_atomic(path, rows, CAPTIONS_SCHEMA, read_meta(path))
    got = compare_json(root, capsys, *FIELDS)
    expected = by_hand(root, FIELDS)["qwen"]
    seconds = got["qwen"]["seconds_per_caption"]
    assert got["qwen"]["gpu_seconds_per_caption"] == pytest.approx(0.5 * seconds) == expected["gpu_seconds_per_caption"]
    assert got["qwen"]["device"] == "NVIDIA H100 80GB HBM3" and got["qwen"]["on_cpu"] is False
    assert got["qwen"]["gpu_hours_per_million"] == pytest.approx(0.5 * seconds * 1e6 / 3600)


@pytest.mark.slow
def test_grounded_figures_join_the_comparison_once_grounding_ran(sampled_root, tiny_clip_dir, tmp_path, capsys):
    root = tmp_path / "root"
    shutil.copytree(sampled_root, root)
    clip = {"model": f"local-dir:{tiny_clip_dir}"}
    run_ground_stage(root, GroundConfig.model_validate({"fields": FIELDS, "clip": clip, "batch_size": 4}))
    capsys.readouterr()
    got = compare_json(root, capsys, *FIELDS)
    for f in FIELDS:
        grounding = {r["key"]: r for r in rows_of(root / "grounding" / f)}
        common = [k for k in grounding if k in {r["key"] for r in rows_of(root / "captions" / "llava")}]
        expected = sum(grounding[k]["n_grounded_nouns"] for k in common) / len(common)
        assert got[f]["grounded_nouns_per_image"] == pytest.approx(expected)
    cost = got["llava"]["gpu_seconds_per_caption"]
    assert got["llava"]["grounded_nouns_per_gpu_second"] == pytest.approx(
        got["llava"]["grounded_nouns_per_image"] / cost
    )


@pytest.mark.slow
def test_fields_without_common_keys_or_unscored_are_one_sentence(sampled_root, models, capsys):
    keys = shard_keys(sampled_root)
    first = set().union(*(by_hand_sample(k, 2, 0) for k in keys.values()))
    other = {s: set().union(*(by_hand_sample(k, 0.3, s) for k in keys.values())) for s in range(1, 500)}
    seed = next(s for s, picked in other.items() if picked and not picked & first)
    run_caption_stage(sampled_root, caption_config("apart", models["llava"], sample=0.3, sample_seed=seed))
    run_score_stage(sampled_root, ScoreConfig(fields=("apart",), min_count=MIN_COUNT))
    capsys.readouterr()
    assert main(["compare", str(sampled_root), "--field", "llava", "--field", "apart"]) == 2
    err = capsys.readouterr().err
    assert "no scored key in common" in err and len(err.strip().splitlines()) == 1
    assert main(["compare", str(sampled_root), "--field", "nobody"]) == 2
    assert "run `densecurate score" in capsys.readouterr().err


@pytest.mark.slow
def test_the_report_shows_the_comparison_and_its_plot_in_chromium(sampled_root, tmp_path, capsys):
    root = tmp_path / "root"
    shutil.copytree(sampled_root, root)
    for folder in (root / "density").iterdir():  # fields other tests scored on other keys
        if folder.name not in FIELDS:
            shutil.rmtree(folder)
            (root / "vocab" / f"{folder.name}.parquet").unlink()
    assert main(["report", str(root)]) == 0
    assert "captioners compared on" in capsys.readouterr().out
    page = tmp_path / "report.html"
    assert main(["report", str(root), "--html", str(page), "--gallery", "2"]) == 0
    dom, _ = rendered_dom(page, tmp_path / "profile")
    assert 'data-broken-images="0"' in dom
    assert 'id="compare"' in dom and "valid nouns per GPU-second" in dom and "GPU-hours per 10M images" in dom
    assert 'alt="density against cost"' in dom


def test_the_pareto_front():
    points = [(0.0, 3.0), (1.0, 5.0), (2.0, 4.0), (2.0, 6.0), (1.0, 5.0)]
    assert pareto_front(points) == [True, True, False, True, True]


@pytest.mark.parametrize("sample", [0, -1, 2.5])
def test_a_sample_is_a_whole_count_or_a_fraction(sample, tiny_llava_dir):
    with pytest.raises(ValueError, match="sample"):
        caption_config("x", tiny_llava_dir, sample=sample)
