"""Every stage run over a dataset root leaves one row in ROOT/history/: what ran, with which settings, when."""

from __future__ import annotations

import pytest

from densecurate.cli import main
from pipeline.sample_data import write_sample_folder
from pipeline.stages.score import run_score_stage
from pipeline.stages.shard import run_shard_stage
from pipeline.store.catalog import run_query
from pipeline.store.verify import verify_folder
from schemas.score_config import ScoreConfig
from schemas.shard_config import ShardConfig


@pytest.fixture(scope="module")
def root(ray_local, tmp_path_factory):
    base = tmp_path_factory.mktemp("history")
    root = base / "root"
    photos = write_sample_folder(base / "photos")
    run_shard_stage([photos], root, ShardConfig(shard_size=5))
    run_score_stage(root, ScoreConfig(min_count=1))
    run_shard_stage([photos], root, ShardConfig(shard_size=5))  # nothing to do: every shard is reused
    return root


def test_each_run_is_a_row_of_the_runs_view(root):
    _, rows = run_query(
        root,
        "SELECT command, name, shards, shards_reused, records, written, device, gpu_seconds, "
        "ended_at >= started_at, length(settings_fingerprint) FROM runs ORDER BY started_at",
    )
    assert rows == [  # the shard stage's job is an input unit: the photo folder, written as 3 shards
        ("shard", "shards", 1, 0, 13, 10, "cpu", 0.0, True, 64),
        ("score", "density/alt_text", 3, 0, 10, 10, "cpu", 0.0, True, 64),
        ("shard", "shards", 1, 1, 0, 0, "cpu", 0.0, True, 64),
    ]
    _, (first, again) = run_query(root, "SELECT settings_fingerprint FROM runs WHERE command = 'shard'")
    assert first == again  # the same settings


def test_stats_says_what_was_run_and_verify_accepts_the_history(root, capsys):
    assert main(["stats", str(root)]) == 0
    out = capsys.readouterr().out
    assert "what was run on this root" in out and "density/alt_text" in out
    assert verify_folder(root, deep=True) == []


def test_a_damaged_history_file_is_left_out_and_named(root, tmp_path, capsys):
    import shutil

    copy = tmp_path / "root"
    shutil.copytree(root, copy)
    damaged = sorted((copy / "history").glob("*.parquet"))[0]
    damaged.write_bytes(damaged.read_bytes()[:50])
    assert main(["query", str(copy), "SELECT count(*) FROM runs"]) == 0
    captured = capsys.readouterr()
    assert "│ 2 " in captured.out or " 2 " in captured.out
    assert main(["stats", str(copy)]) == 0
    assert "nothing: a record of a past run, remove it" in " ".join(capsys.readouterr().out.split())


def test_a_rerun_with_nothing_to_do_starts_no_ray(root, tmp_path):
    import os
    import subprocess
    import sys

    ray_dir = tmp_path / "ray"
    ray_dir.mkdir()
    env = {**os.environ, "RAY_TMPDIR": str(ray_dir), "HF_HUB_OFFLINE": "1"}
    shard = ["shard", str(root.parent / "photos"), "--out", str(root), "--shard-size", "5"]
    for argv in (shard, ["score", str(root), "--min-count", "1"]):
        done = subprocess.run(
            [sys.executable, "-m", "densecurate", *argv], capture_output=True, text=True, env=env, timeout=120
        )
        assert done.returncode == 0, done.stderr
    assert list(ray_dir.iterdir()) == []  # no Ray session was made
    _, rows = run_query(root, "SELECT command, shards_reused = shards, workers FROM runs ORDER BY started_at")
    assert rows[-2:] == [("shard", True, 0), ("score", True, 0)]
