"""A stored byte that changes is found: by `verify` (`--deep` for what only a digest or a checksum shows), by
every stage that reads it, and `--repair` redoes exactly the damaged output. Each test reproduces a change
that once passed unnoticed."""

from __future__ import annotations

import json
import re
import shutil
import struct
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from densecurate.cli import main
from pipeline.sample_data import write_sample_folder
from pipeline.stages.caption import CaptionStage, CaptionWorker
from pipeline.stages.curate import run_curate_stage
from pipeline.stages.features import FeaturesStage, FeaturesWorker
from pipeline.stages.score import run_score_stage
from pipeline.stages.shard import run_shard_stage
from pipeline.store.parquet_meta import write_table_atomic
from pipeline.store.shard_reading import iter_shard_samples
from pipeline.store.shard_writer import WRITER_STATS, ShardWriter
from pipeline.store.verify import DamagedInputError, checked_samples
from schemas.caption_config import CaptionConfig
from schemas.features_config import FeaturesConfig
from schemas.layout import shard_files_in
from schemas.score_config import CurateConfig, ScoreConfig
from schemas.shard_config import ShardConfig
from schemas.tables import CURATED_SCHEMA, DENSITY_SCHEMA, FEATURES_SCHEMA
from trainer.features import FEATURE_EXT, Features

SHARDING = {"shard_size": 10, "image": {"resize": 64}}
SHARD_REPAIR = "then the shard stage again with --repair"


@pytest.fixture(scope="module")
def scored(ray_local, tmp_path_factory) -> tuple[Path, Path]:
    """The 10 sample photos in one shard, alt_text scored; and the photos."""
    base = tmp_path_factory.mktemp("stored")
    photos = write_sample_folder(base / "photos", with_bad_files=False)
    root = base / "root"
    run_shard_stage([photos], root, ShardConfig.model_validate(SHARDING))
    run_score_stage(root, ScoreConfig(fields=("alt_text",), min_count=1))
    return photos, root


@pytest.fixture
def root(scored, tmp_path) -> Path:
    """A private copy of the scored root to damage."""
    shutil.copytree(scored[1], tmp_path / "root")
    return tmp_path / "root"


def _members(tar: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(tar) as tf:
        return list(tf)


def _member(tar: Path, ext: str) -> tarfile.TarInfo:
    return next(m for m in _members(tar) if m.name.endswith(f".{ext}"))


def _flip(path: Path, offset: int, mask: int = 0x01) -> None:
    """Flip the bits of ``mask`` in the byte at ``offset`` (same size, so the file still agrees with its stats)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def _zero_member(tar: Path, ext: str) -> str:
    """Overwrite the first ``ext`` member's bytes with zeros; returns its key."""
    member = _member(tar, ext)
    with tar.open("r+b") as fh:
        fh.seek(member.offset_data)
        fh.write(bytes(member.size))
    return member.name.split(".")[0]


def _forget_digests(stats_file: Path) -> None:
    """Make a shard's stats look as they were written before file digests were recorded."""
    stats = json.loads(stats_file.read_text())
    del stats["tar_sha256"], stats["parquet_sha256"]
    stats_file.write_text(json.dumps(stats))


def _verify(folder: Path, capsys, *flags: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["verify", str(folder), *flags])
    return code, capsys.readouterr().out


def _small_shard(folder: Path, samples: int = 3) -> Path:
    """A shard of ``samples`` tiny samples written by the shard writer (no stage run); returns its tar."""
    files = shard_files_in(folder, 0)
    with ShardWriter(files, {"inputs_fingerprint": "test"}) as writer:
        for n in range(samples):
            writer.add_sample(
                f"k{n}", {"txt": f"text {n}", "json": "{}"}, {"source": "s", "original_id": str(n), "location": "l"}
            )
    return files.tar


def test_a_flipped_alt_text_is_found_by_a_deep_verify_and_repaired(scored, root, capsys):
    tar = root / "shards" / "00000.tar"
    stats = json.loads((root / "shards" / "00000_stats.json").read_text())
    assert stats["tar_sha256"] and stats["parquet_sha256"]
    _flip(tar, _member(tar, "txt").offset_data)
    assert _verify(root, capsys)[0] == 0  # sizes and members agree: only the digest tells
    code, out = _verify(root, capsys, "--deep")
    assert code == 3 and "00000.tar: 00000.tar does not match the sha256 its stats record" in out
    repaired = run_shard_stage([scored[0]], root, ShardConfig.model_validate({**SHARDING, "repair": True}))
    assert (repaired.shards, repaired.shards_reused) == (1, 0)
    assert _verify(root, capsys, "--deep")[0] == 0


def test_a_shard_written_before_digests_were_recorded_has_its_images_checked(root, capsys):
    tar = root / "shards" / "00000.tar"
    _forget_digests(root / "shards" / "00000_stats.json")
    _flip(tar, _member(tar, "txt").offset_data)
    assert _verify(root, capsys, "--deep")[0] == 0  # no digest of its texts to compare
    key = _zero_member(tar, "jpg")
    code, out = _verify(root, capsys, "--deep")
    assert code == 3 and f"the image of {key} does not match its stored sha256" in out


def _second_sample(tar: Path) -> tarfile.TarInfo:
    """The first member of the tar's second sample."""
    members = _members(tar)
    return next(m for m in members if m.name.split(".")[0] != members[0].name.split(".")[0])


def _cut_inside_second_header(tar: Path) -> None:
    tar.write_bytes(tar.read_bytes()[: _second_sample(tar).offset + 100])


def _garble_second_header(tar: Path) -> None:
    _flip(tar, _second_sample(tar).offset + 1)  # the name: the header checksum no longer matches


def _cut_after_a_member(tar: Path) -> None:
    member = _members(tar)[1]
    tar.write_bytes(tar.read_bytes()[: member.offset_data + 512])  # no end-of-archive marker


@pytest.mark.parametrize("damage", [_cut_inside_second_header, _garble_second_header, _cut_after_a_member])
def test_a_tar_that_does_not_read_to_its_end_is_damaged(tmp_path, damage, capsys):
    tar = _small_shard(tmp_path)
    assert [key for key, _ in iter_shard_samples(tar)] == ["k0", "k1", "k2"]
    damage(tar)
    with pytest.raises(tarfile.ReadError):
        list(iter_shard_samples(tar))
    with pytest.raises(
        DamagedInputError, match=rf"^{tar} is damaged \(.*\): run `densecurate verify {tmp_path} --deep`"
    ):
        list(checked_samples(tar))
    code, out = _verify(tmp_path, capsys)
    assert code == 3 and "00000.tar" in out


@pytest.mark.slow
def test_curate_refuses_a_cut_tar_and_both_repairs_restore_every_sample(scored, root, tmp_path, capsys):
    curated = tmp_path / "curated"
    tar = root / "shards" / "00000.tar"
    _cut_inside_second_header(tar)
    refused = (
        rf"{tar} is damaged \(it does not read in full: .* before its end\): run `densecurate verify {root} --deep`"
    )
    with pytest.raises(DamagedInputError, match=refused + re.escape(f", {SHARD_REPAIR}")):  # raised in a Ray task
        run_curate_stage(root, curated, CurateConfig(field="alt_text"))
    assert not list(curated.glob("*_stats.json"))
    run_shard_stage([scored[0]], root, ShardConfig.model_validate({**SHARDING, "repair": True}))
    assert run_curate_stage(root, curated, CurateConfig(field="alt_text")).inputs == 10
    # A curated shard left short by a source that stopped early (as curate once wrote one) is redone by --repair.
    files = shard_files_in(curated, 0)
    stats = json.loads(files.stats.read_text())
    first = next(iter_shard_samples(files.tar))
    extra = {k: v for k, v in stats.items() if k not in WRITER_STATS}
    with ShardWriter(files, extra, schema=CURATED_SCHEMA) as writer:
        writer.add_sample(*first, {"field": "alt_text"})
    assert run_curate_stage(root, curated, CurateConfig(field="alt_text")).inputs == 1  # consistent in itself
    repaired = run_curate_stage(root, curated, CurateConfig(field="alt_text", repair=True))
    assert (repaired.inputs, repaired.shards_reused) == (10, 0)
    assert pq.read_metadata(files.parquet).num_rows == 10


def _flip_bit_of_value(path: Path, column: str, bit: int) -> tuple[int, int]:
    """Flip ``bit`` of the first row's int32 ``column`` value where the file stores it; returns (old, new)."""
    old = pq.read_table(path).column(column)[0].as_py()
    chunk = pq.read_metadata(path).row_group(0).column(pq.read_schema(path).names.index(column))
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data = path.read_bytes()
    at = data.index(struct.pack("<i", old), start, start + chunk.total_compressed_size)
    _flip(path, at + bit // 8, 1 << bit % 8)
    return old, pq.read_table(path).column(column)[0].as_py()


@pytest.mark.slow
def test_a_changed_value_in_a_table_is_found_by_its_page_checksum(root, capsys):
    table = root / "density" / "alt_text" / "00000.parquet"
    old, new = _flip_bit_of_value(table, "n_nouns", 19)
    assert new == old + 524_288  # the file still reads, with 2^19 more nouns
    assert _verify(root, capsys)[0] == 0
    code, out = _verify(root, capsys, "--deep")
    assert code == 3 and "density/alt_text/00000.parquet: the Parquet file does not read in full" in out
    assert "CRC checksum verification failed" in out
    repaired = run_score_stage(root, ScoreConfig(fields=("alt_text",), min_count=1, repair=True))
    assert [(f.shards, f.shards_reused) for f in repaired] == [(1, 0)]
    assert _verify(root, capsys, "--deep")[0] == 0


def _rename_in_footer(path: Path, column: str) -> None:
    data = path.read_bytes()
    footer = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    _flip(path, data.index(column.encode(), footer) + len(column) - 1, 0x1C)


@pytest.mark.parametrize("table", ["density/alt_text/00000.parquet", "shards/00000.parquet"])
def test_a_renamed_column_is_damage(root, table, capsys):
    column = "n_nouns" if table.startswith("density") else "alt_text"
    _rename_in_footer(root / table, column)
    assert column not in pq.read_schema(root / table).names  # the file reads, with another column name
    code, out = _verify(root, capsys)
    assert code == 3 and f"damaged {root / table.replace('.parquet', '')}" in out
    assert "the Parquet file's columns are not its stage's" in out


def test_a_changed_feature_value_is_found_by_a_deep_verify(tmp_path, capsys):
    files = shard_files_in(tmp_path, 0)
    feats = Features(vae=torch.randn(8, 4, 4).half(), t5=torch.randn(3, 8).half())
    with ShardWriter(files, {"inputs_fingerprint": "test"}, schema=FEATURES_SCHEMA) as writer:
        writer.add_sample("k0", {FEATURE_EXT: feats.to_bytes(), "txt": "a cat", "json": "{}"}, {"caption": "a cat"})
    member = _member(files.tar, FEATURE_EXT)
    _flip(files.tar, member.offset_data + member.size - 2)  # the lowest bit of the last fp16 value
    changed = Features.from_bytes(next(iter_shard_samples(files.tar))[1][FEATURE_EXT])
    assert not changed.nonfinite()  # it loads, finite, with one value changed
    assert not (torch.equal(changed.vae, feats.vae) and torch.equal(changed.t5, feats.t5))
    assert _verify(tmp_path, capsys)[0] == 0
    code, out = _verify(tmp_path, capsys, "--deep")
    assert code == 3 and "does not match the sha256 its stats record" in out


def test_stage_tables_carry_page_checksums(tmp_path):
    path = tmp_path / "t.parquet"
    row = {"key": "k", "field": "f", "missing": False, "n_tokens": 3, "n_nouns": 8, "nouns": ["cat"]}
    write_table_atomic(path, [row], DENSITY_SCHEMA, {"fingerprint": "f", "stats": {"count": 1}})
    assert _flip_bit_of_value(path, "n_nouns", 19) == (8, 524_296)
    with pytest.raises(OSError, match="CRC checksum verification failed"):
        pq.read_table(path, page_checksum_verification=True)


@pytest.mark.slow
def test_every_stage_that_decodes_an_image_checks_its_sha256_first(
    root, tiny_llava_dir, tiny_clip_dir, tiny_pixart_dir, tmp_path, capsys
):
    tar = root / "shards" / "00000.tar"
    key = _zero_member(tar, "jpg")
    refused = (
        f"{tar} is damaged (the image of {key} does not match its stored sha256): "
        f"run `densecurate verify {root} --deep`, {SHARD_REPAIR}"
    )
    caption = CaptionConfig.model_validate({"name": "tiny", "model": {"model": str(tiny_llava_dir)}})
    with pytest.raises(DamagedInputError, match=f"^{re.escape(refused)}$"):
        CaptionWorker(caption).caption_shard(CaptionStage(root, caption).plan()[0])
    capsys.readouterr()
    assert main(["ground", str(root), "--clip-model", f"local-dir:{tiny_clip_dir}", "--batch-size", "4"]) == 2
    err = capsys.readouterr().err  # the embedding pass, in a Ray actor: one sentence, no traceback
    assert refused in " ".join(err.split()) and "Traceback" not in err
    features = FeaturesConfig(vae=str(tiny_pixart_dir), text_encoder=str(tiny_pixart_dir), resolution=64)
    with pytest.raises(DamagedInputError, match=f"^{re.escape(refused)}$"):
        FeaturesWorker(features).encode_shard(FeaturesStage(root / "shards", tmp_path / "f", features).plan()[0])


def test_a_changed_count_in_a_shards_stats_is_found(root, capsys):
    stats = root / "shards" / "00000_stats.json"
    text = stats.read_text()
    assert '"successes": 10' in text
    stats.write_text(text.replace('"successes": 10', '"successes": 18'))  # one bit: "0" -> "8"
    code, out = _verify(root, capsys)
    assert code == 3 and "its stats count 18 written samples, its Parquet 10" in out


def _zero(path: Path) -> None:
    path.write_bytes(b"")


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.slow
@pytest.mark.parametrize(
    "relative, damage",
    [
        ("shards/00000.parquet", _cut),
        ("shards/00000_stats.json", _zero),
        ("density/alt_text/00000.parquet", _cut),
        ("density/alt_text/00000_stats.json", _zero),
    ],
    ids=["cut shard table", "empty shard stats", "cut density table", "empty density stats"],
)
def test_a_damaged_table_or_stats_file_is_a_sentence_or_left_out_for_every_reader(
    root, tmp_path, capsys, relative, damage
):
    """query, stats, report, score and curate over a root with one damaged table or stats file: each answers
    over the rest or stops with one sentence; none shows a traceback."""
    damage(root / relative)
    commands = [
        ["query", str(root), "SELECT count(*) FROM samples"],
        ["stats", str(root)],
        ["report", str(root), "--html", str(tmp_path / "report.html")],
        ["score", str(root), "--field", "alt_text", "--min-count", "1"],
        ["curate", str(root), "--out", str(tmp_path / "curated"), "--field", "alt_text"],
    ]
    for argv in commands:
        code = main(argv)
        err = capsys.readouterr().err
        assert code in (0, 2, 3), (argv, code, err)
        assert "Traceback" not in err, (argv, err)
        if code:
            assert relative.split("/")[-1] in err or "verify" in err, (argv, err)
