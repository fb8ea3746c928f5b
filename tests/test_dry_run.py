"""`densecurate run SPEC --dry-run` says what each step would do and writes nothing."""

from __future__ import annotations

import pytest
import yaml

from densecurate.cli import main
from pipeline.sample_data import write_sample_folder


@pytest.mark.slow
def test_a_dry_run_writes_nothing_then_counts_what_is_done(ray_local, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_sample_folder(tmp_path / "photos")
    spec = {
        "name": "dry",
        "root": "root",
        "shard": {"inputs": ["photos"], "shard_size": 4},
        "score": {"fields": ["alt_text"], "min_count": 1},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", "spec.yaml", "--dry-run"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "densecurate shard: 1 shards planned: 0 already done, 1 to run" in out
    assert "densecurate score: plans after the earlier steps (" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "spec.yaml"]  # nothing written

    assert main(["run", "spec.yaml"]) == 0
    capsys.readouterr()
    assert main(["run", "spec.yaml", "--dry-run", "--stage", "score"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out == "densecurate score: 4 shards planned: 4 already done, 0 to run"  # 13 inputs, 10 written
