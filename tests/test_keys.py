"""Keys from original ids: injective, stable across reruns and added inputs, and webdataset-safe."""

from __future__ import annotations

import hashlib
import itertools
import random
import re
import tarfile
from collections.abc import Iterable

import webdataset as wds

from pipeline.sources import list_inputs
from pipeline.sources.records import make_key
from schemas.shard_config import SourceSettings
from tests import image_factory as mk
from tests import tar_factory as tk

KEY_SHAPE = re.compile(r"[A-Za-z0-9_]+-[A-Za-z0-9_-]*")


def _photo(seed: int) -> bytes:
    return mk.jpeg_bytes(mk.photo_image((100 + seed, 100)))


def _assert_injective(ids: Iterable[str]) -> None:
    keys: dict[str, str] = {}
    for original_id in sorted(set(ids)):
        key = make_key("folder", original_id)
        assert KEY_SHAPE.fullmatch(key), (original_id, key)
        assert key not in keys, f"{original_id!r} and {keys[key]!r} share the key {key}"
        keys[key] = original_id


def test_existing_key_forms_are_kept():
    assert make_key("sa1b", "sa_10039") == "sa1b-sa_10039"
    assert make_key("laion", "000001234") == "laion-000001234"
    assert make_key("folder", "cats_tom") == "folder-cats_tom"
    assert make_key("folder", "t-unreadable-rest") == "folder-t-unreadable-rest"
    assert make_key("folder", "IMG-20240101") == "folder-IMG-20240101"  # no "_": cannot look hashed
    # ids that were hashed before keep their key exactly
    assert make_key("folder", "a b.c") == "folder-a_b_c-" + hashlib.sha1(b"a b.c").hexdigest()[:8]


def test_lossy_ids_get_a_hash_of_the_id_alone():
    assert make_key("folder", "cats/tom") == "folder-cats_tom-e6bc0f9f"
    assert make_key("folder", "a/b") == "folder-a_b-3ec69c85"
    assert make_key("folder", "a b") == "folder-a_b-7dbde935"
    assert make_key("folder", "a.b") == "folder-a_b-69f6642c"


def test_ids_that_differ_only_in_separator_unsafe_characters_or_case_get_distinct_keys():
    _assert_injective({"a/b", "a_b", "a b", "a.b", "a:b", "a\\b", "a/b/c", "a_b/c", "a/b_c", "a_b_c", "a__b"})
    _assert_injective({"a", "A", "a/B", "A/b", "Cat", "cat", "CAT", "caf\u00e9", "caf\u00c9", "caf_"})
    _assert_injective(["x\ud83d", "x\udce9", "x\u00e9", "x_", "x?"])  # lone surrogates from odd file names


def test_an_id_shaped_like_a_hashed_key_does_not_take_that_key():
    hashed = make_key("folder", "a b")  # folder-a_b-7dbde935
    look_alike = hashed.removeprefix("folder-")
    assert make_key("folder", look_alike) != hashed
    assert make_key("folder", look_alike).startswith(f"folder-{look_alike}-")
    assert make_key("folder", look_alike.upper()) == f"folder-{look_alike.upper()}"  # hashes are lowercase
    _assert_injective({"a b", look_alike, f"{look_alike} ", make_key("folder", look_alike).removeprefix("folder-")})


def test_no_two_distinct_ids_share_a_key_exhaustive_and_random():
    alphabet = "a_/. b"
    ids = {"".join(t) for n in range(7) for t in itertools.product(alphabet, repeat=n)}  # 55987 ids
    _assert_injective(ids)
    rng = random.Random(20240611)
    wide = "aA_/. b-9\u00e9"
    ids = {"".join(rng.choice(wide) for _ in range(rng.randint(1, 24))) for _ in range(20000)}
    # ids shaped like hashed keys, next to the ids whose keys they imitate
    ids |= {make_key("s", i).removeprefix("s-") for i in list(ids)[:2000]}
    _assert_injective(ids)


def test_folder_with_a_slash_id_and_an_underscore_id_lists_both(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b.jpg").write_bytes(_photo(1))
    (tmp_path / "a_b.jpg").write_bytes(_photo(2))
    records = list_inputs([tmp_path], SourceSettings())
    assert {r.original_id: r.key for r in records} == {"a/b": "folder-a_b-3ec69c85", "a_b": "folder-a_b"}
    assert [r.preset_skip for r in records] == [None, None]
    again = list_inputs([tmp_path], SourceSettings())
    assert [r.key for r in again] == [r.key for r in records]
    # more inputs later, some flattening to the same text: earlier keys stay as they were
    (tmp_path / "a.b.jpg").write_bytes(_photo(3))
    (tmp_path / "a b.jpg").write_bytes(_photo(4))
    grown = {r.original_id: r for r in list_inputs([tmp_path], SourceSettings())}
    assert {i: grown[i].key for i in ("a/b", "a_b")} == {"a/b": "folder-a_b-3ec69c85", "a_b": "folder-a_b"}
    assert len({r.key for r in grown.values()}) == 4
    assert all(r.preset_skip is None for r in grown.values())


def test_keys_survive_a_webdataset_round_trip(tmp_path):
    ids = ["a/b", "a_b", "a b", "a.b", "A.B", "sa_1", "x.tar.gz", "caf\u00e9"]
    keys = [make_key("folder", i) for i in ids]
    tar = tmp_path / "00000.tar"
    with tarfile.open(tar, "w") as tf:
        for i, key in enumerate(keys):
            tk.add_bytes(tf, f"{key}.jpg", _photo(i))
            tk.add_bytes(tf, f"{key}.txt", ids[i].encode("utf-8", "surrogatepass"))
    samples = list(wds.WebDataset(str(tar), shardshuffle=False))
    assert [s["__key__"] for s in samples] == keys
    assert [s["txt"].decode() for s in samples] == ids
