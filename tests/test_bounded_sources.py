"""Bounded sources: only regular files are read, every read has a byte limit, sizes have upper bounds.

The reproductions that hung or grew without end (a FIFO, a character device, ``/dev/zero`` in a
table, ``--resize 100000``) run in a subprocess with a timeout and an address-space cap, so a
regression fails the test instead of hanging it or exhausting the machine.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from densecurate.cli import main
from pipeline.sources import list_inputs
from pipeline.sources.files import read_bounded
from pipeline.sources.reading import SampleReader
from pipeline.sources.records import ReadLimits, SkipRecord
from schemas.shard_config import ImageSettings, SourceSettings
from tests import image_factory as mk
from tests import tar_factory as tk

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180
# Headroom above what the child has mapped once its imports are done: enough for the work, far
# below what an unbounded read of /dev/zero or a 100000-pixel-side resize asks for.
EXTRA_ADDRESS_SPACE = 1 << 30

_CAP_MEMORY = f"""
import resource
def cap_memory():
    size_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:"))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (size_kb * 1024 + {EXTRA_ADDRESS_SPACE}, hard))
"""

# The shard stage's per-shard work without Ray (whose object store would not fit the cap): plan as the
# stage does, then list and write every input unit in this process.
_STAGE_SCRIPT = (
    _CAP_MEMORY
    + """
import json, sys
from pathlib import Path
from pipeline.stages.shard import ShardStage, write_unit
from schemas.shard_config import ShardConfig
srcs, root, config = json.loads(sys.argv[1])
stage = ShardStage([Path(s) for s in srcs], Path(root), ShardConfig.model_validate(config))
jobs = stage.plan()
cap_memory()
print(sum(write_unit(job)["count"] for job in jobs))
"""
)


def run_limited(script: str, *args: str) -> subprocess.CompletedProcess:
    """``script`` in a fresh interpreter, killed after ``TIMEOUT_S``; fails the test on a hang or an error."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", script, *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {TIMEOUT_S} s: a read that never ends")
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def make_fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def make_zero_device(path: Path) -> Path | None:
    """A character device like /dev/zero (1, 5) at ``path``; None where this user may not make one."""
    try:
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 5))
    except PermissionError:
        return None
    return path


def photo_jpeg(size=(300, 200)) -> bytes:
    return mk.jpeg_bytes(mk.photo_image(size))


def shard_rows(root: Path) -> dict[str, dict]:
    rows = [r for p in sorted((root / "shards").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    return {r["key"]: r for r in rows}


@pytest.fixture
def hostile_sources(tmp_path):
    """A folder, an img2dataset folder and a table holding every case of the three defects."""
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(photo_jpeg())
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "photo.jpg").write_bytes(photo_jpeg())
    (folder / "photo.txt").write_text("a cup of coffee")
    (folder / "inside.jpg").symlink_to(folder / "photo.jpg")  # a link inside the source: read
    (folder / "outside.jpg").symlink_to(outside)  # a link out of the source: never read
    make_fifo(folder / "pipe.jpg")
    has_device = make_zero_device(folder / "zero.jpg") is not None
    (folder / "big.jpg").write_bytes(os.urandom(300_000))  # over the 200 kB cap of the test
    (folder / "meta.jpg").write_bytes(photo_jpeg())
    (folder / "meta.json").write_text(json.dumps({"pad": "x" * 5000}))  # over the 1 kB sidecar cap
    (folder / "dir.jpg").mkdir()  # a folder is no input

    laion = tmp_path / "laion"
    laion.mkdir()
    with tarfile.open(laion / "00000.tar", "w") as tf:
        tk.add_bytes(tf, "000.jpg", photo_jpeg())
        tk.add_bytes(tf, "000.txt", b"fine")
        tk.add_bytes(tf, "001.jpg", os.urandom(300_000))
        tk.add_bytes(tf, "002.jpg", photo_jpeg())
        tk.add_bytes(tf, "002.json", json.dumps({"pad": "x" * 5000}).encode())
    make_fifo(laion / "fifo.tar")  # a FIFO named like a shard: never opened

    table_dir = tmp_path / "table"
    table_dir.mkdir()
    rows = [
        {"image_path": str(folder / "photo.jpg"), "caption": "ok"},
        {"image_path": str(folder / "inside.jpg"), "caption": "a link: followed"},
        {"image_path": "/dev/zero", "caption": "never ends"},
        {"image_path": str(folder / "pipe.jpg"), "caption": "blocks on open"},
        {"image_path": str(folder / "big.jpg"), "caption": "too large"},
    ]
    pq.write_table(pa.Table.from_pylist(rows), table_dir / "t.parquet")
    return {"folder": folder, "laion": laion, "table": table_dir / "t.parquet", "has_device": has_device}


LIMITS = {"max_file_bytes": 200_000, "max_sidecar_bytes": 1000}


def test_non_regular_and_oversized_inputs_are_skipped_by_the_stage(hostile_sources, tmp_path):
    srcs = [hostile_sources[k] for k in ("folder", "laion", "table")]
    root = tmp_path / "root"
    config = {"shard_size": 4, "sources": LIMITS, "image": {"resize": 128}}
    done = run_limited(_STAGE_SCRIPT, json.dumps([[str(s) for s in srcs], str(root), config]))
    inputs = int(done.stdout.split()[-1])
    rows = shard_rows(root)
    assert len(rows) == inputs  # every input is a row
    reasons = {r["original_id"]: (r["source"], r["reason"]) for r in rows.values()}
    folder = hostile_sources["folder"]
    expected = {
        "photo": ("folder", None),
        "inside": ("folder", None),
        "outside": ("folder", "not_regular_file"),
        "pipe": ("folder", "not_regular_file"),
        "big": ("folder", "file_too_large"),
        "meta": ("folder", "bad_metadata"),
        "000": ("img2dataset", None),
        "001": ("img2dataset", "file_too_large"),
        "002": ("img2dataset", "bad_metadata"),
        "fifo": ("img2dataset", "not_regular_file"),
        str(folder / "photo").lstrip("/"): ("parquet", None),
        str(folder / "inside").lstrip("/"): ("parquet", None),
        "dev/zero": ("parquet", "not_regular_file"),
        str(folder / "pipe").lstrip("/"): ("parquet", "not_regular_file"),
        str(folder / "big").lstrip("/"): ("parquet", "file_too_large"),
    }
    if hostile_sources["has_device"]:
        expected["zero"] = ("folder", "not_regular_file")
    assert reasons == expected
    errors = {r["original_id"]: r["error"] for r in rows.values()}
    assert "outside the source" in errors["outside"] and "named pipe" in errors["pipe"]
    assert "character device" in errors["dev/zero"]
    assert "over --max-file-bytes 200000 bytes" in errors["big"] and "300000 bytes" in errors["big"]
    assert "tar member '001.jpg' is 300000 bytes" in errors["001"]
    assert "over --max-sidecar-bytes 1000 bytes" in errors["meta"] and "over --max-sidecar-bytes" in errors["002"]


def test_reads_are_checked_and_bounded_even_without_a_listing_skip(hostile_sources, tmp_path):
    """The shard task refuses on its own: a file swapped for a FIFO or a device after listing."""
    script = (
        _CAP_MEMORY
        + """
import json, sys
from pathlib import Path
from pipeline.sources.records import InputRecord, MemberRef, ReadLimits, SkipRecord
from pipeline.sources.reading import SampleReader
folder, laion = map(Path, sys.argv[1:3])
limits = ReadLimits(max_file_bytes=200_000, max_sidecar_bytes=1000)
def rec(name, **kw):
    kw.setdefault("kind", "folder")
    return InputRecord(key=f"folder-{name}", source="folder", original_id=name, location=name, limits=limits, **kw)
records = [
    rec("pipe", path=folder / "pipe.jpg"),
    rec("zero", path=folder / "zero.jpg"),
    rec("devzero", path=Path("/dev/zero"), kind="parquet"),
    rec("outside_link", path=folder / "outside.jpg"),
    rec("big", path=folder / "big.jpg"),
    rec("pipe_sidecar", path=folder / "photo.jpg", json_path=folder / "pipe.jpg"),
    rec("big_sidecar", path=folder / "photo.jpg", txt_path=folder / "meta.json"),
    rec("member", tar=laion / "00000.tar", image_member=MemberRef("001.jpg", 0, 300_000)),
    rec("member_bomb", tar=laion / "00000.tar", image_member=MemberRef("x.jpg", 0, 1 << 40)),
    rec("fifo_tar", tar=laion / "fifo.tar", image_member=MemberRef("x.jpg", 512, 10)),
    rec("ok", path=folder / "photo.jpg"),
]
cap_memory()
out = {}
with SampleReader() as reader:
    for r in records:
        try:
            out[r.original_id] = ["ok", len(reader.load(r).image)]
        except SkipRecord as skip:
            out[r.original_id] = [skip.code, skip.detail]
print(json.dumps(out))
"""
    )
    done = run_limited(script, str(hostile_sources["folder"]), str(hostile_sources["laion"]))
    out = json.loads(done.stdout.splitlines()[-1])
    codes = {k: v[0] for k, v in out.items()}
    expected = {
        "pipe": "not_regular_file",
        "zero": "not_regular_file" if hostile_sources["has_device"] else "read_error",
        "devzero": "not_regular_file",
        "outside_link": "not_regular_file",  # a folder record never follows a link
        "big": "file_too_large",
        "pipe_sidecar": "not_regular_file",
        "big_sidecar": "bad_metadata",
        "member": "file_too_large",
        "member_bomb": "file_too_large",
        "fifo_tar": "not_regular_file",
        "ok": "ok",
    }
    assert codes == expected
    assert "is 1099511627776 bytes (1024.0 GiB), over --max-file-bytes" in out["member_bomb"][1]
    assert "over --max-sidecar-bytes 1000 bytes" in out["big_sidecar"][1]


def test_a_read_stops_one_byte_past_the_limit_when_the_file_grew():
    assert read_bounded(io.BytesIO(b"x" * 100), size_hint=10, limit=50) == b"x" * 51
    assert read_bounded(io.BytesIO(b"x" * 30), size_hint=10, limit=50) == b"x" * 30
    assert read_bounded(io.BytesIO(b""), size_hint=0, limit=50) == b""
    grown = os.urandom(3 << 20)  # grew by megabytes: read on in chunks, still stopping at the limit
    assert read_bounded(io.BytesIO(grown), size_hint=10, limit=(5 << 20) // 2) == grown[: ((5 << 20) // 2) + 1]


def test_listing_opens_nothing_and_keeps_the_defaults(hostile_sources):
    records = {r.original_id: r for r in list_inputs([hostile_sources["folder"]], SourceSettings())}
    assert records["pipe"].preset_skip[0] == "not_regular_file"
    assert records["outside"].preset_skip[0] == "not_regular_file"
    assert records["inside"].preset_skip is None and records["inside"].path == hostile_sources["folder"] / "photo.jpg"
    assert records["big"].preset_skip is None  # 300 kB is far below the 256 MiB default
    assert records["photo"].limits == ReadLimits(256 << 20, 16 << 20)
    assert "dir" not in records
    with SampleReader() as reader:
        assert reader.load(records["inside"]).image == (hostile_sources["folder"] / "photo.jpg").read_bytes()


def test_sa1b_json_over_the_sidecar_limit_is_bad_metadata(tmp_path):
    src = tmp_path / "sa1b"
    src.mkdir()
    with tarfile.open(src / "sa_000000.tar", "w") as tf:
        tk.add_bytes(tf, "sa_1.jpg", photo_jpeg())
        tk.add_bytes(tf, "sa_1.json", tk.sa1b_annotation(1, masks=50))
        tk.add_bytes(tf, "sa_2.jpg", photo_jpeg())
        tk.add_bytes(tf, "sa_2.json", tk.sa1b_annotation(2, masks=2))
    settings = SourceSettings(max_sidecar_bytes=2000)
    records = {r.original_id: r for r in list_inputs([src], settings)}
    code, detail = records["sa_1"].preset_skip
    assert code == "bad_metadata" and "sa_1.json" in detail and "over --max-sidecar-bytes 2000 bytes" in detail
    assert records["sa_2"].preset_skip is None
    with SampleReader() as reader:
        assert reader.load(records["sa_2"]).meta["num_masks"] == 2


def test_a_fifo_source_or_tar_is_refused_without_opening(tmp_path):
    from pipeline.sources import SourceError

    fifo = make_fifo(tmp_path / "in.tar")
    with pytest.raises(SourceError, match="named pipe"):
        list_inputs([fifo], SourceSettings(format="img2dataset"))
    shards = tmp_path / "shards"
    shards.mkdir()
    make_fifo(shards / "a.tar")
    (record,) = list_inputs([shards], SourceSettings())  # --format auto must not open the FIFO either
    assert record.preset_skip[0] == "not_regular_file"


def test_resize_and_output_sizes_have_upper_bounds(tmp_path, capsys):
    with pytest.raises(ValidationError, match="--resize 100000 is above --max-output-side 8192"):
        ImageSettings(resize=100000)
    assert ImageSettings(resize=9000, max_output_side=9000).resize == 9000
    with pytest.raises(ValidationError, match="less than or equal to 65535"):
        ImageSettings(max_output_side=100000)
    with pytest.raises(ValidationError, match=r"--resize 4000 makes images of at least 4000x4000 .* --max-pixels"):
        ImageSettings(resize=4000, max_pixels=1_000_000)
    # The default bound changes no dump (shard fingerprints hash it); another value round-trips.
    assert ImageSettings().model_dump_json() == (
        '{"resize":512,"crop":"none","min_size":64,"max_aspect":4.0,"max_pixels":100000000,"jpeg_quality":95}'
    )
    wide = ImageSettings(resize=9000, max_output_side=9000)
    assert ImageSettings.model_validate(wide.model_dump()) == wide
    assert ImageSettings.model_validate_json(wide.model_dump_json()) == wide

    out = tmp_path / "root"
    assert main(["shard", str(tmp_path), "--out", str(out), "--resize", "100000"]) == 2
    err = capsys.readouterr().err
    assert "(--resize)" in err and "--resize 100000 is above --max-output-side 8192" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["shard", str(tmp_path), "--out", str(out), "--resize", "2000", "--max-pixels", "1000000"]) == 2
    assert "more than --max-pixels 1000000" in capsys.readouterr().err
    assert main(["shard", str(tmp_path), "--out", str(out), "--max-sidecar-bytes", "0"]) == 2
    assert "(--max-sidecar-bytes)" in capsys.readouterr().err
    assert not out.exists()


def test_an_upscale_past_max_pixels_is_skipped_before_resizing(tmp_path):
    script = (
        _CAP_MEMORY
        + """
import json, sys
from pipeline.sources.imaging import process_image
from pipeline.sources.records import SkipRecord
from schemas.shard_config import ImageSettings
from tests import image_factory as mk
cap_memory()
narrow = mk.png_bytes(mk.photo_image((64, 256)))  # aspect 4, the default limit
cases = {
    "upscale": (narrow, ImageSettings(resize=8192)),  # 8192x32768: 268M pixels
    "upscale_crop": (narrow, ImageSettings(resize=8192, crop="center")),
    "fits": (mk.jpeg_bytes(mk.photo_image((100, 100))), ImageSettings(resize=1024, crop="center")),
}
out = {}
for name, (data, settings) in cases.items():
    try:
        img = process_image(data, settings)
        out[name] = ["ok", f"{img.width}x{img.height}"]
    except SkipRecord as skip:
        out[name] = [skip.code, skip.detail]
print(json.dumps(out))
"""
    )
    out = json.loads(run_limited(script).stdout.splitlines()[-1])
    assert out["upscale"][0] == "too_many_pixels"
    assert out["upscale"][1] == (
        "resizing 64x256 to short side --resize 8192 makes 8192x32768 = 268435456 pixels, over --max-pixels 100000000"
    )
    assert out["upscale_crop"][0] == "too_many_pixels"
    assert out["fits"] == ["ok", "1024x1024"]


def test_process_image_refuses_when_the_resized_image_exceeds_max_pixels():
    from pipeline.sources.imaging import process_image

    data = mk.jpeg_bytes(mk.photo_image((300, 200)))
    with pytest.raises(SkipRecord) as info:
        process_image(data, ImageSettings(resize=700, max_pixels=700_000))  # 1050x700 = 735000
    assert info.value.code == "too_many_pixels" and "1050x700 = 735000 pixels" in info.value.detail
    assert process_image(data, ImageSettings(resize=600, max_pixels=600_000)).width == 900  # 900x600 fits


@pytest.mark.slow
def test_the_shard_command_finishes_on_a_fifo_a_device_and_dev_zero(tmp_path):
    """The reproduction itself: `densecurate shard` (Ray and all) on the inputs that used to hang it."""
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "photo.jpg").write_bytes(photo_jpeg())
    make_fifo(folder / "pipe.jpg")
    has_device = make_zero_device(folder / "zero.jpg") is not None
    table = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist([{"image_path": "/dev/zero"}]), table)
    root = tmp_path / "root"
    cmd = [sys.executable, "-m", "densecurate", "shard", str(folder), str(table), "--out", str(root)]
    try:
        done = subprocess.run(
            [*cmd, "--workers", "1", "--resize", "128"], cwd=REPO, capture_output=True, text=True, timeout=300
        )
    except subprocess.TimeoutExpired:
        pytest.fail("densecurate shard still running after 300 s")
    assert done.returncode == 0, done.stderr[-3000:]
    reasons = {r["original_id"]: r["reason"] for r in shard_rows(root).values()}
    expected = {"photo": None, "pipe": "not_regular_file", "dev/zero": "not_regular_file"}
    if has_device:
        expected["zero"] = "not_regular_file"
    assert reasons == expected


def test_changed_read_limits_change_the_shard_fingerprint_only_when_set(tmp_path):
    from pipeline.stages.shard import ShardStage
    from schemas.shard_config import ShardConfig

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(mk.jpeg_bytes(mk.photo_image((300, 200))))
    table = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"image_path": [str(photos / "a.jpg")]}), table)

    def fingerprints(**sources) -> list[str]:
        config = ShardConfig.model_validate({"sources": {"format": "parquet", **sources}})
        return [job.fingerprint for job in ShardStage([table], tmp_path / "root", config).plan()]

    default = fingerprints()
    assert fingerprints(max_file_bytes=256 * 2**20) == default  # the default, spelled out: no change
    assert fingerprints(max_file_bytes=1000) != default  # a Parquet row is checked only when read
    assert fingerprints(max_sidecar_bytes=1000) != default
