"""Planning from input files: units, their numbers, folder buckets, Parquet row groups."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.sources import list_unit, plan_units
from pipeline.sources.folder import name_bucket
from pipeline.stages.shard import ShardStage, run_shard_stage
from schemas.errors import OutputConflictError
from schemas.layout import PARTS_PER_INPUT
from schemas.shard_config import ShardConfig, SourceSettings
from tests import image_factory as mk
from tests import tar_factory as tk


def _photos(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    photo = mk.jpeg_bytes(mk.photo_image((96, 80)))
    for name in names:
        (folder / name).write_bytes(photo)
    return folder


def _keys(root: Path) -> list[str]:
    rows = [r for p in (root / "shards").glob("*.parquet") for r in pq.read_table(p).to_pylist()]
    return sorted(r["key"] for r in rows)


def test_tars_are_planned_from_their_names_and_a_broken_one_is_one_skipped_record(ray_local, tmp_path):
    tars = tmp_path / "tars"
    tars.mkdir()
    tk.write_img2dataset_output(tmp_path / "laion", n=3)
    (tmp_path / "laion" / "00000.tar").rename(tars / "a.tar")
    (tars / "b.tar").write_bytes(b"\x1f\x8b" + b"\x00" * 2000)  # not a plain tar
    units = plan_units([tars], SourceSettings(format="img2dataset"), shard_size=2)
    assert [u.uid for u in units] == [f"tar:{tars.resolve() / 'a.tar'}", f"tar:{tars.resolve() / 'b.tar'}"]
    summary = run_shard_stage([tars], tmp_path / "root", ShardConfig(shard_size=2, sources={"format": "img2dataset"}))
    assert (summary.inputs, summary.written, dict(summary.skipped_by_reason)) == (4, 3, {"bad_tar": 1})
    assert sorted(p.name for p in (tmp_path / "root" / "shards").glob("*_stats.json")) == [
        "00000_stats.json",
        "00001_stats.json",
        "10000_stats.json",
    ]
    numbers = json.loads((tmp_path / "root" / "shards" / "_inputs.json").read_text())["inputs"]
    assert numbers == [u.uid for u in units]
    plan = json.loads((tmp_path / "root" / "shards" / "_plan.json").read_text())["shards"]
    assert plan == [0, 1, PARTS_PER_INPUT]


def test_a_large_folder_is_split_into_buckets_that_keep_their_files(ray_local, tmp_path):
    names = [f"img{i:03d}.jpg" for i in range(20)]
    photos = _photos(tmp_path / "photos", names)
    config = ShardConfig(shard_size=1, image={"min_size": 8})
    units = plan_units([photos], config.sources, shard_size=1)
    assert [u.bucket for u in units] == [(0, 3), (1, 3), (2, 3)]  # 20 images > 8 shards of 1
    listed = {u.bucket[0]: [r.original_id for r in list_unit(u)] for u in units}
    assert sorted(i for ids in listed.values() for i in ids) == [n.removesuffix(".jpg") for n in names]
    assert all(name_bucket(f"{i}.jpg", 3) == b for b, ids in listed.items() for i in ids)
    root = tmp_path / "root"
    run_shard_stage([photos], root, config)
    before = {p.name: p.read_bytes() for p in (root / "shards").glob("*[0-9].*")}
    # More files later: the folder keeps its 3 buckets (a fresh plan would make 4); the folder changed,
    # so its shards are replaced only with --replace, and only the parts whose records changed.
    _photos(photos, [f"new{i}.jpg" for i in range(10)])
    with pytest.raises(OutputConflictError, match="--replace"):
        run_shard_stage([photos], root, config)
    grown = run_shard_stage([photos], root, config.model_copy(update={"replace": True}))
    assert grown.inputs == 30 and grown.written == 30
    assert len(grown.run.results) == 3
    assert _keys(root) == sorted(
        f"folder-{n.removesuffix('.jpg')}" for n in [*names, *(f"new{i}.jpg" for i in range(10))]
    )
    after = {p.name: p.read_bytes() for p in (root / "shards").glob("*[0-9].*")}
    assert any(after.get(name) == data for name, data in before.items() if name.endswith(".tar"))


def test_parquet_row_groups_are_units_read_by_the_workers(ray_local, tmp_path):
    photo = tmp_path / "one.jpg"
    photo.write_bytes(mk.jpeg_bytes(mk.photo_image((100, 100))))
    table = tmp_path / "t.parquet"
    rows = [{"image_path": "one.jpg", "id": f"r{i}", "caption": f"cup {i}"} for i in range(7)]
    pq.write_table(pa.Table.from_pylist(rows), table, row_group_size=3)
    settings = SourceSettings(id_column="id")
    units = plan_units([table], settings, shard_size=2)
    assert [u.rows for u in units] == [(0, 0, 3), (1, 0, 3), (2, 0, 1)]
    assert [r.original_id for u in units for r in list_unit(u)] == [f"r{i}" for i in range(7)]
    summary = run_shard_stage([table], tmp_path / "root", ShardConfig(shard_size=2, sources=settings))
    assert (summary.inputs, summary.written, summary.shards) == (7, 7, 5)
    alt = {r["original_id"]: r["alt_text"] for p in (tmp_path / "root" / "shards").glob("*.parquet")
           for r in pq.read_table(p).to_pylist()}  # fmt: skip
    assert alt == {f"r{i}": f"cup {i}" for i in range(7)}


def test_inputs_numbered_by_another_run_meanwhile_are_refused(tmp_path):
    tk.write_img2dataset_output(tmp_path / "laion", n=2)
    root = tmp_path / "root"
    stage = ShardStage([tmp_path / "laion"], root, ShardConfig())
    stage.plan()
    (root / "shards").mkdir(parents=True)
    (root / "shards" / "_inputs.json").write_text(json.dumps({"inputs": ["tar:/elsewhere/x.tar"]}))
    with pytest.raises(OutputConflictError, match="another shard run numbered new inputs"):
        stage.commit_plan()


def test_the_same_tar_named_twice_is_one_input(ray_local, tmp_path):
    tk.write_img2dataset_output(tmp_path / "laion", n=2)
    tar = next((tmp_path / "laion").glob("*.tar"))
    summary = run_shard_stage([tmp_path / "laion", tar], tmp_path / "root", ShardConfig())
    assert (summary.inputs, summary.written, len(summary.run.results)) == (2, 2, 1)
    with tarfile.open(tmp_path / "root" / "shards" / "00000.tar") as tf:
        assert len(tf.getnames()) == 6  # jpg, json, txt of each


def test_a_cut_short_tar_of_a_finished_input_is_written_again(ray_local, tmp_path):
    photos = _photos(tmp_path / "photos", [f"p{i}.jpg" for i in range(5)])
    root = tmp_path / "root"
    config = ShardConfig(shard_size=2, image={"min_size": 8})
    run_shard_stage([photos], root, config)
    reference = {p.name: p.read_bytes() for p in (root / "shards").glob("*[0-9].*")}
    tar = root / "shards" / "00001.tar"
    tar.write_bytes(tar.read_bytes()[:1000])  # its stats record the tar's size: no tar is read to see it
    again = run_shard_stage([photos], root, config)
    assert (again.shards, again.shards_reused) == (3, 2)
    assert {p.name: p.read_bytes() for p in (root / "shards").glob("*[0-9].*") if p.suffix != ".json"} == {
        name: data for name, data in reference.items() if not name.endswith(".json")
    }


def test_a_folder_that_cannot_be_listed_is_refused_not_skipped(tmp_path, monkeypatch):
    import pipeline.sources.units as units
    from pipeline.sources.errors import SourceError

    photos = _photos(tmp_path / "photos", ["a.jpg"])
    _photos(photos / "locked", ["b.jpg"])
    listing = units.os.scandir

    def refused(path):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied")
        return listing(path)

    monkeypatch.setattr(units.os, "scandir", refused)
    with pytest.raises(SourceError, match=r"cannot list the folder .*locked \(Permission denied\)"):
        plan_units([photos], SourceSettings(), shard_size=10)
