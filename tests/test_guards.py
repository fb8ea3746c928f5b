"""The dataset root is guarded against the commands users mistype: each test is a reproduction of a
case that once destroyed data or gave a silently wrong result with exit code 0."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from densecurate.cli import main
from pipeline.sample_data import write_sample_folder
from pipeline.stages.caption import run_caption_stage
from pipeline.stages.curate import run_curate_stage
from pipeline.stages.features import run_features_stage
from pipeline.stages.score import run_score_stage
from pipeline.stages.shard import run_shard_stage
from pipeline.store.catalog import run_query
from pipeline.store.verify import DamagedInputError
from schemas.caption_config import CaptionConfig
from schemas.errors import MissingInputError, OutputConflictError
from schemas.features_config import FeaturesConfig
from schemas.score_config import CurateConfig, ScoreConfig
from schemas.shard_config import ShardConfig

SHARDING = {"shard_size": 4, "image": {"resize": 128}}


def _caption_config(model: Path, tokens: int = 4, **extra) -> CaptionConfig:
    return CaptionConfig.model_validate(
        {"name": "tiny", "model": {"model": str(model)}, "generation": {"max_new_tokens": tokens}, **extra}
    )


@pytest.fixture(scope="module")
def built(ray_local, tiny_llava_dir, tmp_path_factory):
    """A root with 4 shards (10 photos + 3 bad files), tiny captions, and both fields scored."""
    base = tmp_path_factory.mktemp("guarded")
    photos = write_sample_folder(base / "photos")
    root = base / "root"
    run_shard_stage([photos], root, ShardConfig.model_validate(SHARDING))
    run_caption_stage(root, _caption_config(tiny_llava_dir))
    run_score_stage(root, ScoreConfig(fields=("alt_text", "tiny"), min_count=1))
    return photos, root


@pytest.fixture
def root_copy(built, tmp_path):
    """A private copy of the built root to damage, and the photos it was made from (shared: read only)."""
    photos, root = built
    shutil.copytree(root, tmp_path / "root")
    return photos, tmp_path / "root"


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (lock files aside) with the sha256 of its bytes."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".densecurate.lock")
    }


def test_a_smaller_source_is_refused_and_deletes_nothing(root_copy, tmp_path, capsys):
    photos, root = root_copy
    subset = tmp_path / "subset"
    subset.mkdir()
    for path in sorted(photos.iterdir())[:6]:  # a typo: fewer inputs than the run that made the root
        shutil.copy(path, subset / path.name)
    before = tree_digest(root)
    code = main(["shard", str(subset), "--out", str(root), "--shard-size", "4", "--resize", "128"])
    err = capsys.readouterr().err
    assert code == 2
    assert "finished shards" in err and "--replace" in err and "files of later stages" in err
    assert tree_digest(root) == before


def test_downstream_stages_never_delete_and_prune_lists_what_it_removes(root_copy, tiny_llava_dir, capsys):
    photos, root = root_copy
    fewer = ShardConfig.model_validate({**SHARDING, "shard_size": 100, "replace": True})
    assert run_shard_stage([photos], root, fewer).shards == 1
    captions = sorted((root / "captions" / "tiny").glob("*.parquet"))
    assert len(captions) == 4
    run_caption_stage(root, _caption_config(tiny_llava_dir))
    assert "belong to no shard of this plan" in capsys.readouterr().err
    assert sorted((root / "captions" / "tiny").glob("*.parquet")) == captions  # reported, not deleted
    assert main(["prune", str(root), "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert all(f"0000{i}.parquet" in listed for i in (1, 2, 3)) and (root / "captions/tiny/00001.parquet").exists()
    assert main(["prune", str(root)]) == 0
    assert sorted(p.name for p in (root / "captions" / "tiny").glob("*.parquet")) == ["00000.parquet"]
    assert not list((root / "density").glob("*/00001.parquet"))
    keys = run_query(root, "SELECT count(*) FROM samples WHERE status = 'ok'")[1][0][0]
    assert run_query(root, "SELECT count(*) FROM captions")[1][0][0] == keys == 10


@pytest.mark.parametrize(
    "command",
    [
        ["curate", "{root}", "--out", "{root}/shards", "--field", "alt_text"],
        ["curate", "{root}", "--out", "{root}", "--field", "alt_text"],
        ["features", "{curated}", "--out", "{curated}", "--vae", "vae", "--text-encoder", "t5"],
        ["features", "{curated}", "--out", "{root}/captions", "--vae", "vae", "--text-encoder", "t5"],
        ["shard", "{root}/shards", "--out", "{root}"],
        ["shard", "{root}", "--out", "{root}"],
        # folders another stage owns: a captioner's, a field's density, feature shards, a training run
        ["curate", "{root}", "--out", "{root}/captions/tiny", "--field", "alt_text"],
        ["curate", "{root}", "--out", "{root}/density/tiny", "--field", "alt_text"],
        ["curate", "{root}", "--out", "{root}/captions/tiny/new", "--field", "alt_text"],
        ["curate", "{root}", "--out", "{features}", "--field", "alt_text"],
        ["curate", "{root}", "--out", "{run}", "--field", "alt_text"],
        ["features", "{curated}", "--out", "{root}/density/alt_text/x", "--vae", "vae", "--text-encoder", "t5"],
        ["shard", "{photos}", "--out", "{root}/captions/tiny"],
        ["shard", "{photos}", "--out", "{curated}"],
    ],
)
def test_outputs_overlapping_inputs_are_refused(built, tmp_path, command, capsys):
    photos, built_root = built
    root = tmp_path / "root"
    shutil.copytree(built_root, root)
    curated = tmp_path / "curated"
    run_curate_stage(root, curated, CurateConfig(field="alt_text"))
    features = tmp_path / "features"  # as `densecurate features` leaves a folder: its plan names the stage
    features.mkdir()
    (features / "_plan.json").write_text('{"stage": "features", "shards": [0]}')
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("steps: 10\n")
    before = tree_digest(tmp_path)
    args = [part.format(root=root, curated=curated, features=features, run=run, photos=photos) for part in command]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "output folder" in err or "dataset root" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert tree_digest(tmp_path) == before


def _hold_lock(folder: Path) -> subprocess.Popen:
    code = (
        "import sys, time; from pathlib import Path; from pipeline.store.guards import OutputLock\n"
        f"with OutputLock(Path({str(folder)!r}), 'shards'):\n"
        "    print('held', flush=True); time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_refuses_naming_the_holder_and_a_dead_holder_is_taken_over(root_copy):
    photos, root = root_copy
    holder = _hold_lock(root / "shards")
    try:
        with pytest.raises(
            OutputConflictError, match=rf"another run \(densecurate shards on host .*, pid {holder.pid}"
        ):
            run_shard_stage([photos], root, ShardConfig.model_validate({**SHARDING, "shard_size": 7}))
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    summary = run_shard_stage([photos], root, ShardConfig.model_validate(SHARDING))  # stale lock: taken over
    assert summary.shards_reused == summary.shards == 4


def _corrupt_one_jpeg(tar_path: Path) -> str:
    """Overwrite bytes inside the first JPEG member (same size); returns its key."""
    with tarfile.open(tar_path) as tf:
        member = next(m for m in tf if m.name.endswith(".jpg"))
    start = member.offset_data + member.size // 4
    count = min(3000, member.size // 2)
    with tar_path.open("r+b") as fh:
        fh.seek(start)
        fh.write(random.Random(0).randbytes(count))
    return member.name.split(".")[0]


def test_a_damaged_image_is_found_by_verify_refused_by_curate_and_repaired(root_copy, tmp_path, capsys):
    photos, root = root_copy
    tar = root / "shards" / "00001.tar"
    key = _corrupt_one_jpeg(tar)
    # Unnoticed by a plain rerun (same sizes, same members) ...
    assert run_shard_stage([photos], root, ShardConfig.model_validate(SHARDING)).shards_reused == 4
    assert main(["verify", str(root)]) == 0
    capsys.readouterr()
    # ... but found by a deep verify, and refused by curate.
    assert main(["verify", str(root), "--deep"]) == 3
    out = capsys.readouterr().out
    assert "00001.tar" in out and key in out and "00000.tar" not in out
    with pytest.raises(DamagedInputError, match=f"{key}.*does not match its stored sha256"):
        run_curate_stage(root, tmp_path / "curated", CurateConfig(field="alt_text"))
    others = {p.name: p.stat().st_mtime_ns for p in (root / "shards").glob("0000[023].tar")}
    repaired = run_shard_stage([photos], root, ShardConfig.model_validate({**SHARDING, "repair": True}))
    assert (repaired.shards, repaired.shards_reused) == (4, 3)
    assert {p.name: p.stat().st_mtime_ns for p in (root / "shards").glob("0000[023].tar")} == others
    assert main(["verify", str(root), "--deep"]) == 0


def test_a_garbled_caption_table_is_found_and_exactly_it_is_redone(root_copy, tiny_llava_dir, capsys):
    _, root = root_copy
    table = root / "captions" / "tiny" / "00002.parquet"
    data = bytearray(table.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little") + 8
    middle = (len(data) - footer) // 2
    data[8 : 8 + middle] = random.Random(1).randbytes(middle)  # the data pages; the footer (metadata) stays intact
    table.write_bytes(bytes(data))
    assert pq.ParquetFile(table).metadata.num_rows > 0  # the metadata still reads: a plain rerun trusts it
    assert run_caption_stage(root, _caption_config(tiny_llava_dir)).shards_reused == 4
    assert main(["verify", str(root)]) == 3
    assert "captions/tiny/00002.parquet" in capsys.readouterr().out
    repaired = run_caption_stage(root, _caption_config(tiny_llava_dir, repair=True))
    assert (repaired.shards, repaired.shards_reused) == (4, 3)
    assert main(["verify", str(root)]) == 0


@pytest.mark.slow
def test_report_and_stats_name_stale_fields(root_copy, tiny_llava_dir, capsys):
    _, root = root_copy
    run_caption_stage(root, _caption_config(tiny_llava_dir, tokens=6, replace=True))  # re-caption, but do not re-score
    capsys.readouterr()
    assert main(["stats", str(root)]) == 0
    err = capsys.readouterr().err
    assert "stale density: 'tiny' (4 shards)" in err and "alt_text" not in err
    assert main(["report", str(root)]) == 0
    assert "stale density: 'tiny'" in capsys.readouterr().err
    run_score_stage(root, ScoreConfig(fields=("tiny",), min_count=1))
    assert main(["stats", str(root)]) == 0
    assert "stale" not in capsys.readouterr().err


def test_features_refuse_the_output_of_a_failed_curate(root_copy, tiny_pixart_dir, tmp_path):
    _, root = root_copy
    curated = tmp_path / "curated"
    run_curate_stage(root, curated, CurateConfig(field="alt_text"))
    (curated / "00001_stats.json").unlink()  # as a curate killed before finishing shard 1 leaves it
    (curated / "00002_stats.json").unlink()
    config = FeaturesConfig(vae=str(tiny_pixart_dir), text_encoder=str(tiny_pixart_dir), resolution=64)
    with pytest.raises(MissingInputError, match=r"2 of the 4 shards in .*curated are not finished"):
        run_features_stage(curated, tmp_path / "features", config)
    assert not (tmp_path / "features").exists()


def test_captioning_over_a_full_run_of_other_settings_asks_for_replace(root_copy, tiny_llava_dir, capsys):
    _, root = root_copy
    captions = root / "captions" / "tiny"
    before = tree_digest(captions)
    with pytest.raises(OutputConflictError, match=r"would replace 10 captions of 4 shards .*'tiny'.*--replace"):
        run_caption_stage(root, _caption_config(tiny_llava_dir, tokens=5))
    assert tree_digest(captions) == before
    assert main(["caption", str(root), "--model", str(tiny_llava_dir), "--name", "tiny", "--max-new-tokens", "5"]) == 2
    assert "worker-seconds of captioning" in capsys.readouterr().err
    summary = run_caption_stage(root, _caption_config(tiny_llava_dir, tokens=5, replace=True))
    assert summary.totals["count"] == 10
    assert {r["max_new_tokens"] for r in pq.read_table(captions / "00000.parquet").to_pylist()} == {5}
    again = run_caption_stage(root, _caption_config(tiny_llava_dir, tokens=5))  # the same settings: all done
    assert again.shards_reused == 4


@pytest.mark.slow
def test_grounding_with_another_rule_asks_for_replace(root_copy, tiny_clip_dir):
    from pipeline.stages.ground import run_ground_stage
    from schemas.ground_config import GroundConfig

    _, root = root_copy

    def config(**extra) -> GroundConfig:
        return GroundConfig.model_validate({"clip": {"model": f"local-dir:{tiny_clip_dir}"}, **extra})

    run_ground_stage(root, config())
    grounding = root / "grounding" / "alt_text"
    before = tree_digest(grounding)
    with pytest.raises(OutputConflictError, match=r"another CLIP model or rule \(4 shards by .*--replace"):
        run_ground_stage(root, config(grounding={"z_threshold": 1.0}))
    assert tree_digest(grounding) == before
    replaced = run_ground_stage(root, config(grounding={"z_threshold": 1.0}, replace=True))
    assert replaced.grounding.shards_reused == 0
    assert pq.read_metadata(grounding / "00000.parquet") is not None


@pytest.mark.parametrize(
    ("command", "option"),
    [
        (["ground", "{root}", "--clip-model", "local-dir:x", "--z-threshold", "nan"], "--z-threshold"),
        (["ground", "{root}", "--clip-model", "local-dir:x", "--dup-threshold", "inf"], "--dup-threshold"),
        (["shard", "{root}", "--out", "{out}", "--max-aspect", "inf"], "--max-aspect"),
        (["caption", "{root}", "--model", "m", "--temperature", "nan"], "--temperature"),
        (["curate", "{root}", "--out", "{out}", "--field", "alt_text", "--min-clip-score", "nan"], "--min-clip-score"),
        (
            ["features", "{root}", "--out", "{out}", "--vae", "v", "--text-encoder", "t", "--gpus-per-worker", "nan"],
            "--gpus-per-worker",
        ),
    ],
)
def test_every_float_setting_must_be_finite(tmp_path, command, option, capsys):
    args = [part.format(root=tmp_path, out=tmp_path / "out") for part in command]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert option in err and "finite number" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("out", ["/proc/densecurate-out", "/proc/densecurate-out/deeper"])
def test_an_output_folder_that_cannot_be_made_is_one_sentence(built, out, capsys):
    _, root = built
    assert main(["curate", str(root), "--field", "alt_text", "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot make the output folder /proc/densecurate-out") and len(err.splitlines()) == 1


def test_a_report_file_that_cannot_be_written_is_one_sentence(built, capsys):
    _, root = built
    assert main(["report", str(root), "--html", "/proc/densecurate-report.html"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("error: cannot write /proc/densecurate-report.html"), err


def test_max_new_tokens_must_fit_the_models_context(built, tiny_llava_dir, capsys):
    _, root = built
    code = main(
        ["caption", str(root), "--model", str(tiny_llava_dir), "--name", "huge", "--max-new-tokens", "100000000"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "does not fit" in err and "context of 2,048 tokens" in err, err
    assert not (root / "captions" / "huge").exists()


def test_a_text_longer_than_the_cap_is_scored_on_its_start_and_flagged(root_copy):
    photos, root = root_copy
    assert photos.is_dir()
    table = root / "shards" / "00000.parquet"
    rows = pq.read_table(table).to_pylist()
    long_key = next(r["key"] for r in rows if r["status"] == "ok")
    summary = run_score_stage(root, ScoreConfig(nouns={"max_text_chars": 12}, min_count=1))
    density = {r["key"]: r for r in pq.read_table(root / "density" / "alt_text" / "00000.parquet").to_pylist()}
    texts = {r["key"]: r["alt_text"] for r in rows if r["status"] == "ok"}
    assert density[long_key]["cut"] == (len(texts[long_key]) > 12)
    assert sum(r["cut"] for r in density.values()) == sum(len(t or "") > 12 for t in texts.values())
    assert next(iter(summary)).totals["cut"] >= 1


def test_query_on_a_folder_that_is_not_a_dataset_root_writes_nothing(tmp_path, capsys):
    folder = tmp_path / "photos"
    write_sample_folder(folder)
    before = tree_digest(folder)
    assert main(["query", str(folder), "SELECT 1"]) == 2
    assert "is not a dataset root" in capsys.readouterr().err
    assert tree_digest(folder) == before and not (folder / "catalog.duckdb").exists()


def test_a_source_that_is_a_link_loop_is_one_sentence(tmp_path, capsys):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert main(["shard", str(tmp_path / "a"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a symbolic link loop" in err and len(err.splitlines()) == 1, err
