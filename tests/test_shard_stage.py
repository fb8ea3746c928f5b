"""The shard stage end to end on a real local Ray: accounting, resume, and readers of the output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipeline.sample_data import write_sample_folder
from pipeline.stages.shard import run_shard_stage
from schemas.errors import OutputConflictError
from schemas.shard_config import ShardConfig, SourceSettings
from tests import image_factory as mk
from tests import tar_factory as tk

EXPECTED_SKIPS = {
    "zero.jpg": "empty_file",
    "text.jpg": "not_an_image",
    "truncated.jpg": "decode_error",
    "bomb.png": "too_many_pixels",
    "tiny.jpg": "too_small",
    "panorama.jpg": "bad_aspect",
    "badmeta.jpg": "bad_metadata",
}
EXPECTED_OK = ["cmyk.jpg", "png16.png", "rgba.png", "palette.png", "anim.gif", "rotated.jpg", "photo.jpg"]


@pytest.fixture(scope="module")
def hostile_folder(tmp_path_factory) -> Path:
    """Every bad-input case of the issue next to good photos of every mode."""
    d = tmp_path_factory.mktemp("hostile")
    files = {
        "zero.jpg": b"",
        "text.jpg": b"I am a text file with a .jpg name\n",
        "truncated.jpg": mk.truncated_jpeg(),
        "bomb.png": mk.png_bomb(30000, 30000),
        "tiny.jpg": mk.jpeg_bytes(mk.photo_image((40, 40))),
        "panorama.jpg": mk.jpeg_bytes(mk.photo_image((1000, 200))),
        "badmeta.jpg": mk.jpeg_bytes(mk.photo_image((300, 200))),
        "cmyk.jpg": mk.cmyk_jpeg(),
        "png16.png": mk.sixteen_bit_png()[0],
        "rgba.png": mk.transparent_rgba_png(),
        "palette.png": mk.palette_png_with_transparency(),
        "anim.gif": mk.animated_gif(),
        "rotated.jpg": mk.exif_rotated_jpeg(),
        "photo.jpg": mk.jpeg_bytes(mk.photo_image()),
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    (d / "badmeta.json").write_text("{ this is not json")
    (d / "photo.txt").write_text("a cup of coffee on a saucer")
    (d / "photo.json").write_text(json.dumps({"photographer": "unknown"}))
    return d


def shard_rows(root: Path) -> list[dict]:
    """Every row of every shard's Parquet, read with pyarrow."""
    return [row for p in sorted((root / "shards").glob("*.parquet")) for row in pq.read_table(p).to_pylist()]


@pytest.fixture(scope="module")
def hostile_run(ray_local, hostile_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("out") / "root"
    summary = run_shard_stage([hostile_folder], root, ShardConfig(shard_size=4))
    return root, summary


def test_every_input_is_a_row_and_each_skip_says_why(hostile_run):
    root, summary = hostile_run
    table = shard_rows(root)
    assert summary.inputs == len(table) == len(EXPECTED_SKIPS) + len(EXPECTED_OK)
    assert summary.written + summary.skipped == summary.inputs
    by_key = {r["key"]: r for r in table}
    for name, code in EXPECTED_SKIPS.items():
        row = by_key[f"folder-{Path(name).stem}"]
        assert (row["status"], row["reason"]) == ("skipped", code), name
        assert row["error"]
    for name in EXPECTED_OK:
        row = by_key[f"folder-{Path(name).stem}"]
        assert row["status"] == "ok" and row["error"] is None, (name, row["error"])
    photo = by_key["folder-photo"]
    assert photo["alt_text"] == "a cup of coffee on a saucer"
    assert json.loads(photo["meta_json"]) == {"photographer": "unknown"}
    assert dict(summary.skipped_by_reason) == {code: 1 for code in EXPECTED_SKIPS.values()}


def test_nothing_is_written_outside_root_and_no_temp_files(hostile_run):
    root, _ = hostile_run
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
    stems = [f"{i:05d}" for i in range(4)]
    suffixes = (".parquet", ".tar", "_stats.json")
    expected = ["catalog.duckdb", "shards"] + [f"shards/{s}{ext}" for s in stems for ext in suffixes]
    # The plan of the last run, the numbers of its inputs, and the lock file of the output folder (free).
    expected += ["shards/_plan.json", "shards/_inputs.json", "shards/.densecurate.lock"]
    history = [n for n in names if n.startswith("history")]  # one record of each run
    assert history[0] == "history" and len(history) > 1 and all("-shard-" in n for n in history[1:])
    assert [n for n in names if not n.startswith("history")] == sorted(expected)
    assert sorted(p.name for p in root.parent.iterdir()) == ["root"]


def test_samples_read_back_with_webdataset(hostile_run):
    root, _ = hostile_run
    ok_keys = {k for (k,) in duckdb.sql(f"SELECT key FROM '{root}/shards/*.parquet' WHERE status = 'ok'").fetchall()}
    urls = [str(p) for p in sorted((root / "shards").glob("*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert {s["__key__"] for s in samples} == ok_keys
    for s in samples:
        meta = s["json"]
        assert s["jpg"].mode == "RGB" and s["jpg"].size == (meta["width"], meta["height"])
        assert min(s["jpg"].size) == 512
        assert meta["key"] == s["__key__"] and meta["source"] == "folder"
    rotated = next(s for s in samples if s["__key__"] == "folder-rotated")
    assert rotated["jpg"].height > rotated["jpg"].width
    photo = next(s for s in samples if s["__key__"] == "folder-photo")
    assert photo["txt"] == "a cup of coffee on a saucer"


def test_samples_read_back_with_ray_data(hostile_run):
    import ray.data

    root, _ = hostile_run
    tars = [str(p) for p in sorted((root / "shards").glob("*.tar"))]
    rows = ray.data.read_webdataset(tars, decoder=None).take_all()
    assert len(rows) == len(EXPECTED_OK)
    assert all(r["jpg"][:2] == b"\xff\xd8" for r in rows)


def test_shards_folder_reads_with_ray_data_as_the_readme_says(hostile_run):
    """The folder holds Parquet, JSON and lock files beside the tars: the README's call reads the tars alone."""
    import ray.data

    root, _ = hostile_run
    rows = ray.data.read_webdataset(f"{root}/shards", file_extensions=["tar"]).take_all()
    assert sorted(r["__key__"] for r in rows) == sorted(f"folder-{Path(name).stem}" for name in EXPECTED_OK)
    assert all(r["jpg"].ndim == 3 and r["json"]["key"] == r["__key__"] for r in rows)


def test_img2dataset_conventions_and_stats(hostile_run):
    root, _ = hostile_run
    for tar in sorted((root / "shards").glob("*.tar")):
        stats = json.loads(tar.with_name(f"{tar.stem}_stats.json").read_text())
        table = pq.read_table(tar.with_suffix(".parquet"))
        with tarfile.open(tar) as tf:
            tar_keys = {m.name.split(".")[0] for m in tf}
        ok = [r["key"] for r in table.to_pylist() if r["status"] == "ok"]
        assert stats["count"] == table.num_rows and stats["successes"] == len(ok)
        assert stats["status_dict"]["success"] == len(ok)
        assert tar_keys == set(ok)


def test_rerun_reuses_finished_shards(hostile_run, hostile_folder):
    root, first = hostile_run
    before = {p.name: p.stat().st_mtime_ns for p in (root / "shards").iterdir()}
    again = run_shard_stage([hostile_folder], root, ShardConfig(shard_size=4))
    assert again.shards_reused == again.shards == 4
    assert (again.written, again.skipped) == (first.written, first.skipped)
    assert {p.name: p.stat().st_mtime_ns for p in (root / "shards").iterdir()} == before


def test_changed_settings_rewrite_shards(ray_local, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(mk.jpeg_bytes(mk.photo_image((400, 300))))
    root = tmp_path / "root"
    run_shard_stage([photos], root, ShardConfig())
    before = (root / "shards" / "00000.tar").read_bytes()
    with pytest.raises(OutputConflictError, match=r"replace 1 and remove 0 finished shards.*--replace"):
        run_shard_stage([photos], root, ShardConfig.model_validate({"image": {"resize": 128}}))
    assert (root / "shards" / "00000.tar").read_bytes() == before
    redo = run_shard_stage([photos], root, ShardConfig.model_validate({"image": {"resize": 128}, "replace": True}))
    assert redo.shards_reused == 0
    (row,) = pq.read_table(root / "shards" / "00000.parquet").to_pylist()
    assert row["height"] == 128


def test_stale_temp_files_are_removed(ray_local, tmp_path):
    photos = write_sample_folder(tmp_path / "photos", with_bad_files=False)
    root = tmp_path / "root"
    (root / "shards").mkdir(parents=True)
    stale = root / "shards" / "00000.tar.tmp-99999"
    stale.write_bytes(b"half a tar")
    elsewhere = root / "shards" / "00007.parquet.tmp-99998"  # a shard this plan does not write
    elsewhere.write_bytes(b"half a table")
    live = root / "shards" / "00008.tar.tmp-1"  # a writer that still runs (pid 1) keeps its file
    live.write_bytes(b"in progress")
    run_shard_stage([photos], root, ShardConfig(shard_size=100))
    assert not stale.exists() and not elsewhere.exists()
    assert live.exists()


def test_hostile_sa1b_tar_end_to_end(ray_local, tmp_path):
    src = tmp_path / "sa1b"
    src.mkdir()
    tk.write_hostile_sa1b_tar(src / "sa_000000.tar")
    root = tmp_path / "root"
    summary = run_shard_stage([src], root, ShardConfig())
    rows = {r["original_id"]: r for r in shard_rows(root)}
    assert summary.inputs == 6 and summary.written == 2
    assert {k: r["reason"] for k, r in rows.items()} == {
        "sa_1": None,
        "sa_4": None,
        "sa_2": "bad_metadata",
        "sa_3": "not_regular_file",
        "../../escaped": "unsafe_member",
        "/abs/escaped": "unsafe_member",
    }
    assert json.loads(rows["sa_1"]["meta_json"])["num_masks"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root", "sa1b"]
    assert not Path("/abs/escaped.jpg").exists()


def test_img2dataset_output_is_resharded(ray_local, tmp_path):
    src = tk.write_img2dataset_output(tmp_path / "laion", n=5)
    root = tmp_path / "root"
    settings = ShardConfig(shard_size=2, sources=SourceSettings(source_name="laion"))
    summary = run_shard_stage([src], root, settings)
    assert (summary.shards, summary.written) == (3, 5)
    rows = shard_rows(root)
    assert {r["alt_text"] for r in rows} == {f"a cup of coffee number {i}" for i in range(5)}
    assert all(json.loads(r["meta_json"])["url"].startswith("https://example.com/") for r in rows)


def test_empty_input_finishes_with_nothing(ray_local, tmp_path):
    (tmp_path / "empty").mkdir()
    summary = run_shard_stage([tmp_path / "empty"], tmp_path / "root", ShardConfig())
    assert (summary.inputs, summary.written, summary.shards) == (0, 0, 0)


def _shard_cmd(src: Path, root: Path) -> list[str]:
    cli = [sys.executable, "-m", "densecurate", "shard", str(src), "--out", str(root)]
    return [*cli, "--shard-size", "2", "--workers", "1", "--resize", "256"]


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every tar's bytes and every Parquet table's rows: what must not depend on interruptions."""
    shards = root / "shards"
    out = {p.name: p.read_bytes() for p in sorted(shards.glob("*.tar"))}
    out.update({p.name: repr(pq.read_table(p).to_pylist()).encode() for p in sorted(shards.glob("*.parquet"))})
    return out


@pytest.mark.slow
def test_sigkill_half_way_then_rerun_equals_uninterrupted_run(tmp_path):
    src = tmp_path / "photos"
    write_sample_folder(src)
    for i in range(3):  # more shards, so there is a "half-way"
        write_sample_folder(src / f"copy{i}", with_bad_files=False)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(_shard_cmd(src, reference), check=True, capture_output=True, timeout=300)
    n_shards = len(list((reference / "shards").glob("*_stats.json")))

    proc = subprocess.Popen(
        _shard_cmd(src, killed), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((killed / "shards").glob("*_stats.json"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list((killed / "shards").glob("*_stats.json")))
    assert 0 < done_at_kill < n_shards, "the kill must land half-way"

    result = subprocess.run(_shard_cmd(src, killed), check=True, capture_output=True, text=True, timeout=300)
    assert "already done" in result.stdout
    assert _snapshot(killed) == _snapshot(reference)
    assert not [p for p in (killed / "shards").iterdir() if ".tmp-" in p.name]


def test_odd_names_and_captions_do_not_stop_the_stage(ray_local, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    odd = os.fsdecode(b"caf\xe9.jpg")
    (photos / odd).write_bytes(mk.jpeg_bytes(mk.photo_image((300, 200))))
    (photos / "surrogate.jpg").write_bytes(mk.jpeg_bytes(mk.photo_image((300, 200))))
    (photos / "surrogate.json").write_text('{"caption": "broken emoji \\ud83d here"}')
    summary = run_shard_stage([photos], tmp_path / "root", ShardConfig())
    assert (summary.inputs, summary.written) == (2, 2)
    rows = {r["key"]: r for r in shard_rows(tmp_path / "root")}
    assert rows["folder-surrogate"]["alt_text"] == "broken emoji \ufffd\ufffd\ufffd here"


def test_a_smaller_plan_replaces_the_shards_of_a_larger_one_only_when_asked(ray_local, tmp_path):
    photos = write_sample_folder(tmp_path / "photos", with_bad_files=False)
    root = tmp_path / "root"
    assert run_shard_stage([photos], root, ShardConfig(shard_size=3)).shards == 4
    with pytest.raises(OutputConflictError, match=r"replace 4 and remove 0 finished shards"):
        run_shard_stage([photos], root, ShardConfig(shard_size=100))
    assert len(list((root / "shards").glob("*_stats.json"))) == 4
    again = run_shard_stage([photos], root, ShardConfig(shard_size=100, replace=True))
    assert again.shards == 1
    names = sorted(p.name for p in (root / "shards").iterdir() if not p.name.startswith((".", "_")))
    assert names == ["00000.parquet", "00000.tar", "00000_stats.json"]
    assert len(shard_rows(root)) == 10
