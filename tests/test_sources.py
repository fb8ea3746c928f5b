"""Listing inputs: deterministic order, stable unique keys, sidecars, and hostile archives."""

from __future__ import annotations

import json
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.sources import SourceError, list_inputs
from pipeline.sources.detect import choose_format
from pipeline.sources.reading import SampleReader
from pipeline.sources.records import SkipRecord, make_key
from schemas.shard_config import SourceSettings
from tests import image_factory as mk
from tests import tar_factory as tk


def test_keys_are_stable_webdataset_safe_and_distinct():
    assert make_key("sa1b", "sa_123") == "sa1b-sa_123"
    assert make_key("folder", "a_b") == "folder-a_b"
    assert make_key("folder", "a/b") == "folder-a_b-3ec69c85"  # flattening "/" is lossy: hashed
    odd = make_key("folder", "a b.c")
    assert odd.startswith("folder-a_b_c-") and "." not in odd and " " not in odd
    assert make_key("folder", "a b.c") != make_key("folder", "a_b_c")


def test_folder_listing_reads_sidecars_and_is_sorted(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ["b.jpg", "a.png", "sub/c.jpg"]:
        (tmp_path / name).write_bytes(mk.jpeg_bytes(mk.photo_image((100, 100))))
    (tmp_path / "a.txt").write_text("  a cup of coffee \n")
    (tmp_path / "a.json").write_text(json.dumps({"license": "cc-by"}))
    (tmp_path / "b.json").write_text("{not json")
    (tmp_path / "notes.md").write_text("ignored")
    records = list_inputs([tmp_path], SourceSettings())
    assert [r.key for r in records] == ["folder-a", "folder-b", "folder-sub_c-4a8de02d"]
    with SampleReader() as reader:
        a = reader.load(records[0])
        assert a.alt_text == "a cup of coffee"
        assert a.meta == {"license": "cc-by"}
        with pytest.raises(SkipRecord) as info:
            reader.load(records[1])
        assert info.value.code == "bad_metadata"
        assert reader.load(records[2]).alt_text is None


def test_hostile_sa1b_tar_is_listed_without_extracting(tmp_path):
    tar = tk.write_hostile_sa1b_tar(tmp_path / "sa_000000.tar")
    assert choose_format(tar, "auto").format == "sa1b"
    records = {r.original_id: r for r in list_inputs([tar], SourceSettings())}
    assert set(records) == {"sa_1", "sa_2", "sa_3", "sa_4", "../../escaped", "/abs/escaped"}
    assert records["../../escaped"].preset_skip[0] == "unsafe_member"
    assert records["/abs/escaped"].preset_skip[0] == "unsafe_member"
    assert records["sa_3"].preset_skip[0] == "not_regular_file"
    with SampleReader() as reader:
        one = reader.load(records["sa_1"])
        assert one.meta == {"image_id": 1, "width": 300, "height": 200, "file_name": "sa_1.jpg", "num_masks": 3}
        with pytest.raises(SkipRecord, match="bad_metadata"):
            reader.load(records["sa_2"])
        assert reader.load(records["sa_4"]).meta == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sa_000000.tar"]
    assert not (tmp_path.parent / "escaped.jpg").exists()


def test_extracted_sa1b_folder(tmp_path):
    (tmp_path / "sa_7.jpg").write_bytes(mk.jpeg_bytes(mk.photo_image((300, 200))))
    (tmp_path / "sa_7.json").write_bytes(tk.sa1b_annotation(7, masks=5))
    assert choose_format(tmp_path, "auto").format == "sa1b"
    (record,) = list_inputs([tmp_path], SourceSettings())
    assert record.key == "sa1b-sa_7"
    with SampleReader() as reader:
        assert reader.load(record).meta["num_masks"] == 5


def test_img2dataset_output_keeps_alt_text_and_metadata(tmp_path):
    out = tk.write_img2dataset_output(tmp_path / "laion", n=3)
    assert choose_format(out, "auto").format == "img2dataset"
    records = list_inputs([out], SourceSettings(source_name="laion"))
    assert [r.key for r in records] == ["laion-000000000", "laion-000000001", "laion-000000002"]
    with SampleReader() as reader:
        sample = reader.load(records[1])
    assert sample.alt_text == "a cup of coffee number 1"
    assert sample.meta["url"] == "https://example.com/1.jpg"


def test_corrupt_tar_is_one_skipped_record(tmp_path):
    bad = tmp_path / "broken.tar"
    bad.write_bytes(b"\x1f\x8b" + b"\x00" * 2000)  # gzip magic: not a plain tar
    (record,) = list_inputs([bad], SourceSettings(format="img2dataset"))
    assert record.preset_skip[0] == "bad_tar"


def test_truncated_tar_member_is_a_read_error(tmp_path):
    tar = tmp_path / "t.tar"
    with tarfile.open(tar, "w") as tf:
        tk.add_bytes(tf, "k.jpg", mk.jpeg_bytes(mk.photo_image((300, 200))))
    tar.write_bytes(tar.read_bytes()[:3000])
    record, rest = list_inputs([tar], SourceSettings(format="img2dataset"))
    assert rest.original_id == "t-unreadable-rest" and rest.preset_skip[0] == "bad_tar"
    with SampleReader() as reader, pytest.raises(SkipRecord, match="read_error"):
        reader.load(record)


def test_parquet_table_source(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "one.jpg").write_bytes(mk.jpeg_bytes(mk.photo_image((200, 200))))
    rows = [
        {"path": "img/one.jpg", "text": "a coffee cup", "license": "cc0"},
        {"path": None, "text": "no image", "license": "cc0"},
    ]
    table = tmp_path / "table.parquet"
    pq.write_table(pa.Table.from_pylist(rows), table)
    assert choose_format(table, "auto").format == "parquet"
    settings = SourceSettings(image_column="path", caption_column="text")
    one, missing = sorted(list_inputs([table], settings), key=lambda r: r.preset_skip is not None)
    assert one.key == "parquet-img_one-fe79261d"
    assert one.alt_text == "a coffee cup" and one.meta == {"license": "cc0"}
    assert missing.preset_skip[0] == "missing_path"
    with pytest.raises(SourceError, match="no column 'nope'"):
        list_inputs([table], SourceSettings(image_column="nope"))


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        list_inputs([tmp_path / "nowhere"], SourceSettings())


def test_tar_cut_short_keeps_the_members_before_the_cut(tmp_path):
    tar = tmp_path / "cut.tar"
    photo = mk.jpeg_bytes(mk.photo_image((300, 200)))
    with tarfile.open(tar, "w") as tf:
        tk.add_bytes(tf, "a.jpg", photo)
        tk.add_bytes(tf, "b.jpg", photo)
    whole = tar.read_bytes()
    tar.write_bytes(whole[: 512 + len(photo) + 1024])  # a's header and data, then part of b's data
    records = {r.original_id: r for r in list_inputs([tar], SourceSettings(format="img2dataset"))}
    assert set(records) == {"a", "b", "cut-unreadable-rest"}
    assert records["cut-unreadable-rest"].preset_skip[0] == "bad_tar"
    with SampleReader() as reader:
        assert reader.load(records["a"]).image == photo
        with pytest.raises(SkipRecord, match="read_error"):
            reader.load(records["b"])


def test_undecodable_names_and_captions_are_cleaned(tmp_path):
    from pipeline.sources.records import clean_text

    assert clean_text("x\ud83dy") == "x\ufffd\ufffd\ufffdy"
    name = os.fsdecode(b"caf\xe9.jpg")  # a Latin-1 file name on a UTF-8 system
    (tmp_path / name).write_bytes(mk.jpeg_bytes(mk.photo_image((100, 100))))
    (record,) = list_inputs([tmp_path], SourceSettings())
    assert record.key.startswith("folder-caf_-") and record.key.isascii()
