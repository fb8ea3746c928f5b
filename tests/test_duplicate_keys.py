"""Keys repeated across the dataset: marked after the shard stage, the first occurrence kept, nothing lost."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.stages.shard import run_shard_stage
from pipeline.store.duplicate_keys import key_changes
from pipeline.store.verify import shard_damage
from schemas.layout import shard_files_in
from schemas.shard_config import ShardConfig
from tests import image_factory as mk
from tests import tar_factory as tk


def _photo(seed: int) -> bytes:
    return mk.jpeg_bytes(mk.photo_image((120 + seed, 100)))


def _rows(root: Path) -> list[dict]:
    """Every samples row, shard by shard, with its shard's stem."""
    return [
        {**row, "shard": p.stem}
        for p in sorted((root / "shards").glob("*.parquet"), key=lambda p: int(p.stem))
        for row in pq.read_table(p).to_pylist()
    ]


def _tar_keys(root: Path) -> dict[str, list[str]]:
    keys = {}
    for tar in sorted((root / "shards").glob("*.tar")):
        with tarfile.open(tar) as tf:
            keys[tar.stem] = sorted({m.name.split(".")[0] for m in tf})
    return keys


def _sa1b_tar(path: Path, ids: list[int]) -> Path:
    with tarfile.open(path, "w") as tf:
        for i in ids:
            tk.add_bytes(tf, f"sa_{i}.jpg", _photo(i))
            tk.add_bytes(tf, f"sa_{i}.json", tk.sa1b_annotation(i, masks=2))
    return path


def test_same_id_twice_in_a_folder_keeps_the_first(ray_local, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ["x.jpg", "x.png"]:
        (photos / name).write_bytes(mk.png_bytes(mk.photo_image((100, 100))))
    summary = run_shard_stage([photos], tmp_path / "root", ShardConfig())
    assert (summary.inputs, summary.written, dict(summary.skipped_by_reason)) == (2, 1, {"duplicate_key": 1})
    first, second = _rows(tmp_path / "root")
    assert (first["location"], first["status"]) == (str(photos / "x.jpg"), "ok")
    assert (second["location"], second["status"], second["reason"]) == (
        str(photos / "x.png"),
        "skipped",
        "duplicate_key",
    )
    assert second["error"] == f"key folder-x already belongs to {photos / 'x.jpg'}"
    assert _tar_keys(tmp_path / "root") == {"00000": ["folder-x"]}
    assert shard_damage(shard_files_in(tmp_path / "root" / "shards", 0), deep=True) is None  # x.jpg's bytes kept


def test_a_parquet_row_naming_a_file_twice_is_a_duplicate_not_a_collision(ray_local, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b.jpg").write_bytes(_photo(1))
    (tmp_path / "a_b.jpg").write_bytes(_photo(2))
    table = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist([{"image_path": p} for p in ("a/b.jpg", "a_b.jpg", "a/b.jpg")]), table)
    summary = run_shard_stage([table], tmp_path / "root", ShardConfig())
    assert (summary.written, dict(summary.skipped_by_reason)) == (2, {"duplicate_key": 1})
    rows = _rows(tmp_path / "root")
    assert sorted((r["original_id"], r["reason"] or "") for r in rows) == [
        ("a/b", ""),
        ("a/b", "duplicate_key"),
        ("a_b", ""),
    ]
    dup = next(r for r in rows if r["reason"])
    assert "hash collision" not in dup["error"]


def test_an_id_in_two_tars_is_kept_in_the_earlier_shard_and_a_rerun_changes_nothing(ray_local, tmp_path):
    tars = tmp_path / "sa1b"
    tars.mkdir()
    _sa1b_tar(tars / "sa_000000.tar", [1, 2, 3])
    _sa1b_tar(tars / "sa_000001.tar", [3, 4])
    root = tmp_path / "root"
    summary = run_shard_stage([tars], root, ShardConfig(shard_size=2))
    assert (summary.inputs, summary.written, dict(summary.skipped_by_reason)) == (5, 4, {"duplicate_key": 1})
    # Input 0 makes shards 00000 and 00001, input 1 makes 10000: the copy in the later shard is marked.
    assert _tar_keys(root) == {
        "00000": ["sa1b-sa_1", "sa1b-sa_2"],
        "00001": ["sa1b-sa_3"],
        "10000": ["sa1b-sa_4"],
    }
    dup = next(r for r in _rows(root) if r["reason"] == "duplicate_key")
    assert (dup["shard"], dup["key"]) == ("10000", "sa1b-sa_3")
    assert dup["error"].startswith(f"key sa1b-sa_3 already belongs to {tars / 'sa_000000.tar'}::sa_3.jpg")
    snapshot = {p.name: p.read_bytes() for p in (root / "shards").glob("*[0-9].*")}
    again = run_shard_stage([tars], root, ShardConfig(shard_size=2))
    assert (again.shards, again.shards_reused, again.written) == (3, 3, 4)
    assert again.skipped_by_reason == summary.skipped_by_reason
    assert {p.name: p.read_bytes() for p in (root / "shards").glob("*[0-9].*")} == snapshot
    assert not key_changes(root / "shards")


def test_an_added_input_never_moves_a_kept_copy_and_a_killed_rewrite_is_redone(ray_local, tmp_path):
    tars = tmp_path / "sa1b"
    tars.mkdir()
    _sa1b_tar(tars / "sa_000005.tar", [7, 8])
    root = tmp_path / "root"
    run_shard_stage([tars], root, ShardConfig())
    first = {p.name: p.read_bytes() for p in (root / "shards").glob("00000*")}
    # A new tar sorting before the first one still gets the next number, so the first keeps its shard.
    _sa1b_tar(tars / "sa_000001.tar", [8, 9])
    grown = run_shard_stage([tars], root, ShardConfig())
    assert {p.name: p.read_bytes() for p in (root / "shards").glob("00000*")} == first
    assert _tar_keys(root) == {"00000": ["sa1b-sa_7", "sa1b-sa_8"], "10000": ["sa1b-sa_9"]}
    assert (grown.written, grown.skipped_by_reason["duplicate_key"]) == (3, 1)
    # A run killed while rewriting a shard leaves it unfinished (no stats): the next run writes it again.
    (root / "shards" / "10000_stats.json").unlink()
    again = run_shard_stage([tars], root, ShardConfig())
    assert (again.shards, again.shards_reused) == (2, 1)
    assert _tar_keys(root)["10000"] == ["sa1b-sa_9"]
    assert not key_changes(root / "shards")
