"""Inputs that change or hold strays: the format a folder is read as, files edited in place, a first
occurrence of a key that goes away, links that loop."""

from __future__ import annotations

import dataclasses
import json
import os
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.sample_data import write_sample_folder
from pipeline.sources import list_inputs
from pipeline.sources.detect import choose_format
from pipeline.sources.errors import SourceError
from pipeline.sources.reading import SampleReader
from pipeline.sources.records import SkipRecord
from pipeline.stages import shard as shard_stage
from pipeline.stages.shard import ShardStage, names_digest, run_shard_stage, write_unit
from pipeline.store.duplicate_keys import key_changes
from schemas.errors import OutputConflictError
from schemas.shard_config import ShardConfig, SourceSettings
from tests import image_factory as mk
from tests import tar_factory as tk

SMALL = {"image": {"min_size": 8, "resize": 64}}


def _jpeg(width: int) -> bytes:
    return mk.jpeg_bytes(mk.photo_image((width, 80)))


def _photos(folder: Path, n: int, first: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(first, first + n):
        (folder / f"p{i:02d}.jpg").write_bytes(_jpeg(96 + i))
    return folder


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            tk.add_bytes(tf, name, data)
    return path


def _rows(root: Path) -> dict[str, dict]:
    """Every samples row by key (keys are unique within the tests' shards)."""
    return {r["key"]: r for p in (root / "shards").glob("*.parquet") for r in pq.read_table(p).to_pylist()}


def _shards(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (root / "shards").glob("*[0-9].*")}


def _later(path: Path) -> None:
    """Move a file's mtime a second on: an edit made later than the run before it."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_auto_reads_a_folder_as_what_most_of_it_holds(tmp_path):
    images = _photos(tmp_path / "images", 3)
    _tar(images / "stray.tar", {"x.txt": b"not a shard"})
    choice = choose_format(images, "auto")
    assert (choice.format, choice.from_tars, choice.describe()) == (
        "folder",
        False,
        "folder (3 images; 1 tar not read)",
    )
    tars = tmp_path / "tars"
    tk.write_img2dataset_output(tars, n=2)
    _tar(tars / "00001.tar", {"000.jpg": _jpeg(100)})
    (tars / "preview.jpg").write_bytes(_jpeg(100))
    choice = choose_format(tars, "auto")
    assert (choice.format, choice.describe()) == ("img2dataset", "img2dataset (2 tars; 1 image not read)")
    # Images in subfolders count (the folder format reads the tree); tars only directly in the folder.
    _photos(tars / "more", 2)
    assert choose_format(tars, "auto").describe() == "folder (3 images; 2 tars not read)"
    (tars / "preview.jpg").unlink()
    with pytest.raises(SourceError, match=r"as many images as tars \(2 each\): pass --format"):
        choose_format(tars, "auto")
    assert choose_format(tars, "img2dataset").from_tars


def test_a_stray_tar_and_a_link_loop_in_a_folder_of_images(ray_local, tmp_path):
    photos = _photos(tmp_path / "photos", 20)
    _tar(photos / "stray.tar", {"x.txt": b"not a shard"})
    (photos / "loop.jpg").symlink_to("loop.jpg")
    summary = run_shard_stage([photos], tmp_path / "root", ShardConfig.model_validate(SMALL))
    assert (summary.inputs, summary.written, dict(summary.skipped_by_reason)) == (21, 20, {"not_regular_file": 1})
    names, values = (list(column.cells) for column in summary.render().columns)
    assert dict(zip(names, values, strict=True))[f"format of {photos}"] == "folder (21 images; 1 tar not read)"
    loop = _rows(tmp_path / "root")["folder-loop"]
    assert (
        loop["error"]
        == f"{photos / 'loop.jpg'} is a symbolic link loop (Too many levels of symbolic links), not a regular file"
    )


def test_a_link_loop_is_never_followed(tmp_path):
    photos = _photos(tmp_path / "photos", 1)
    (photos / "loop.jpg").symlink_to("loop.jpg")
    (photos / "p00.txt").symlink_to("p00.txt")  # a sidecar that loops is no sidecar
    tars = tmp_path / "tars"
    tars.mkdir()
    _tar(tars / "a.tar", {"k.jpg": _jpeg(100)})
    (tars / "b.tar").symlink_to("b.tar")
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"image_path": [str(photos / "loop.jpg")]}), table)
    records = {r.original_id: r for r in list_inputs([photos, tars], SourceSettings())}
    assert records["loop"].preset_skip[0] == "not_regular_file"
    assert (records["p00"].preset_skip, records["p00"].txt_path) == (None, None)
    assert records["b"].preset_skip == ("not_regular_file", f"{tars / 'b.tar'} is a symbolic link loop "
                                        "(Too many levels of symbolic links), not a regular file")  # fmt: skip
    (row,) = list_inputs([table], SourceSettings())
    with SampleReader() as reader, pytest.raises(SkipRecord) as skipped:
        reader.load(row)
    assert skipped.value.code == "not_regular_file" and str(photos / "loop.jpg") in skipped.value.detail


def test_a_file_edited_in_place_is_refused_then_rewritten_with_replace(ray_local, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(_jpeg(100))
    (photos / "a.txt").write_text("old")
    (photos / "b.jpg").write_bytes(_jpeg(120))
    root = tmp_path / "root"
    config = ShardConfig.model_validate({**SMALL, "shard_size": 1})
    run_shard_stage([photos], root, config)
    before = _shards(root)
    # Same names, new bytes: the folder's own mtime does not change.
    (photos / "a.jpg").write_bytes(_jpeg(140))
    (photos / "a.txt").write_text("new")
    _later(photos / "a.txt")
    with pytest.raises(OutputConflictError, match=r"replace 2 and remove 0 finished shards.*--replace"):
        run_shard_stage([photos], root, config)
    replaced = run_shard_stage([photos], root, config.model_copy(update={"replace": True}))
    assert (replaced.shards, replaced.shards_reused, replaced.written) == (2, 1, 2)
    a = _rows(root)["folder-a"]
    assert (a["alt_text"], a["original_width"]) == ("new", 140)
    after = _shards(root)
    assert after["00001.tar"] == before["00001.tar"] and after["00000.tar"] != before["00000.tar"]  # b kept
    again = run_shard_stage([photos], root, config)
    assert (again.shards, again.shards_reused) == (2, 2)


def test_a_tar_or_table_changed_in_place_is_rewritten_with_replace(ray_local, tmp_path):
    tars = tmp_path / "tars"
    tars.mkdir()
    _tar(tars / "a.tar", {"k.jpg": _jpeg(100), "k.txt": b"old"})
    photo = tmp_path / "one.jpg"
    photo.write_bytes(_jpeg(100))
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"image_path": [str(photo)], "caption": ["old caption"]}), table)
    root, config = tmp_path / "root", ShardConfig.model_validate({**SMALL, "sources": {"format": "auto"}})
    run_shard_stage([tars, table], root, config)
    _tar(tars / "a.tar", {"k.jpg": _jpeg(130), "k.txt": b"new"})  # same member names
    pq.write_table(pa.table({"image_path": [str(photo)], "caption": ["new caption"]}), table)  # same path
    with pytest.raises(OutputConflictError, match="--replace"):
        run_shard_stage([tars, table], root, config)
    run_shard_stage([tars, table], root, config.model_copy(update={"replace": True}))
    rows = _rows(root)
    assert (rows["img2dataset-k"]["alt_text"], rows["img2dataset-k"]["original_width"]) == ("new", 130)
    assert rows[next(k for k in rows if k.startswith("parquet-"))]["alt_text"] == "new caption"


def test_shards_made_before_file_contents_were_fingerprinted_stay_current(tmp_path, monkeypatch):
    """A root written when a folder was stamped by its own mtime and shards by their records' names."""
    photos = _photos(tmp_path / "photos", 3)
    root = tmp_path / "root"
    config = ShardConfig.model_validate({**SMALL, "shard_size": 2})
    with monkeypatch.context() as earlier:
        earlier.setattr(shard_stage, "inputs_digest", names_digest)
        for job in ShardStage([photos], root, config).plan():
            write_unit(dataclasses.replace(job, fingerprint=job.legacy_fingerprint, legacy_fingerprint=None))
    snapshot = _shards(root)
    (job,) = ShardStage([photos], root, config).plan()
    assert (job.finished(), job.made_from_other_inputs()) == (None, False)  # listed once more, nothing to replace
    assert write_unit(job)["written"] == 0
    assert job.finished() is not None
    tables = {name: data for name, data in _shards(root).items() if not name.endswith(".json")}
    assert tables == {name: data for name, data in snapshot.items() if not name.endswith(".json")}
    # From now on an edit is seen, and the shards without contents in their fingerprint are replaced.
    (photos / "p02.jpg").write_bytes(_jpeg(150))
    (job,) = ShardStage([photos], root, config).plan()
    assert job.made_from_other_inputs()


def _sa1b_tar(path: Path, ids: list[int]) -> Path:
    members = {}
    for i in ids:
        members[f"sa_{i}.jpg"] = _jpeg(100 + i)
        members[f"sa_{i}.json"] = tk.sa1b_annotation(i, masks=1)
    return _tar(path, members)


def _content(root: Path) -> tuple[list[dict], list[bytes]]:
    """The rows (without timings) and tar bytes of every shard, in shard order."""
    shards = sorted((root / "shards").glob("*.parquet"), key=lambda p: int(p.stem))
    rows = [r for p in shards for r in pq.read_table(p).to_pylist()]
    return rows, [p.with_suffix(".tar").read_bytes() for p in shards]


def test_a_key_whose_first_occurrence_is_gone_is_written_again(ray_local, tmp_path):
    tars = tmp_path / "sa1b"
    tars.mkdir()
    first, second, third = (_sa1b_tar(tars / f"sa_00000{n}.tar", [n, 9]) for n in range(3))
    root = tmp_path / "root"
    config = ShardConfig.model_validate(SMALL)
    run_shard_stage([first, second, third], root, config)
    kept = [r["location"] for r in _content(root)[0] if r["key"] == "sa1b-sa_9" and r["status"] == "ok"]
    assert kept == [f"{first}::sa_9.jpg"]
    # The tar holding the first sa_9 goes: the second one is written again, the third names it.
    again = run_shard_stage([second, third], root, config.model_copy(update={"replace": True}))
    assert (again.written, dict(again.skipped_by_reason)) == (3, {"duplicate_key": 1})
    fresh = tmp_path / "fresh"
    run_shard_stage([second, third], fresh, config)
    assert _content(root) == _content(fresh)
    marked = next(r for r in _content(root)[0] if r["reason"])
    assert marked["error"] == f"key sa1b-sa_9 already belongs to {second}::sa_9.jpg"
    assert not key_changes(root / "shards")
    assert json.loads((root / "shards" / "10000_stats.json").read_text())["successes"] == 2


def test_an_input_tar_cut_inside_a_header_records_what_is_lost(tmp_path):
    tar = tmp_path / "sa_000000.tar"
    with tarfile.open(tar, "w") as tf:
        for image_id in range(1, 11):
            tk.add_bytes(tf, f"sa_{image_id}.jpg", mk.jpeg_bytes(mk.photo_image((300, 200))))
            tk.add_bytes(tf, f"sa_{image_id}.json", tk.sa1b_annotation(image_id, masks=1))
    with tarfile.open(tar) as tf:
        fifth = tf.getmembers()[8]  # sa_5.jpg
    data = bytearray(tar.read_bytes())
    data[fifth.offset + 100 : fifth.offset + 200] = bytes(100)  # its header garbled: tarfile stops quietly there
    tar.write_bytes(bytes(data))
    records = list_inputs([tar], SourceSettings(format="sa1b"))
    lost = [r for r in records if r.preset_skip and r.preset_skip[0] == "bad_tar"]
    assert len(records) == 5 and len(lost) == 1
    assert "ends early after 4 samples" in lost[0].preset_skip[1]


def test_writing_the_sample_again_leaves_its_files_as_they_were(tmp_path):
    """A resubmitted job writes the sample photos again: unchanged files must keep their mtimes, or every shard
    made from them would look made from other inputs."""
    photos = write_sample_folder(tmp_path / "photos")
    before = {p.name: p.stat().st_mtime_ns for p in photos.iterdir()}
    time.sleep(0.01)
    write_sample_folder(photos)
    assert {p.name: p.stat().st_mtime_ns for p in photos.iterdir()} == before
