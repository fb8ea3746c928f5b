"""Exact (sha256) and near-duplicate (cosine) clusters: pairs, chains, the kept sample, both search paths."""

from __future__ import annotations

import math

import faiss
import numpy as np
import pytest

from pipeline.grounding import near_duplicates
from pipeline.grounding.near_duplicates import DuplicateSearch, duplicate_clusters, ivf_lists


def at_angles(*degrees: float, dim: int = 4) -> np.ndarray:
    """Unit vectors in the plane of the first two axes, at these angles (cosine of a pair: cos of the difference)."""
    out = np.zeros((len(degrees), dim), np.float32)
    out[:, 0] = np.cos(np.radians(degrees))
    out[:, 1] = np.sin(np.radians(degrees))
    return out


def axes(n: int) -> np.ndarray:
    """n orthogonal unit vectors."""
    return np.eye(n, dtype=np.float32)


def row(key: str, cluster: str, kind: str | None, similarity: float) -> dict:
    return {"key": key, "cluster": cluster, "kept": key == cluster, "kind": kind, "similarity": similarity}


def approx_rows(rows: list[dict]) -> list[dict]:
    return [{**r, "similarity": pytest.approx(r["similarity"], abs=1e-5)} for r in rows]


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_exact_duplicates_by_sha256_even_when_embeddings_differ():
    rows = duplicate_clusters(["b", "a", "c"], axes(3), ["h1", "h1", "h2"], DuplicateSearch(0.9))
    assert rows == [row("a", "a", None, 1.0), row("b", "a", "exact", 0.0)]


def test_missing_sha256_never_pairs():
    assert duplicate_clusters(["a", "b"], axes(2), [None, None], DuplicateSearch(0.9)) == []


def test_semantic_pairs_at_or_above_threshold_only():
    # cos 20° = 0.940 (pair), cos 30° = 0.866 (not), cos 60° = 0.5 exactly (pair at threshold 0.5 only)
    emb = np.concatenate([at_angles(0, 20), at_angles(100, 130)])
    keys = ["p1", "p2", "q1", "q2"]
    rows = duplicate_clusters(keys, emb, [None] * 4, DuplicateSearch(0.9))
    assert rows == approx_rows([row("p1", "p1", None, 1.0), row("p2", "p1", "semantic", math.cos(math.radians(20)))])
    boundary = np.array([[1.0, 0.0], [0.5, math.sqrt(0.75)]], np.float32)  # inner product exactly 0.5 in float32
    rows = duplicate_clusters(["x", "y"], boundary, [None, None], DuplicateSearch(0.5))
    assert rows == approx_rows([row("x", "x", None, 1.0), row("y", "x", "semantic", 0.5)])
    assert duplicate_clusters(["x", "y"], boundary, [None, None], DuplicateSearch(0.5001)) == []


def test_chain_forms_one_cluster_below_threshold_at_its_ends():
    step = math.degrees(math.acos(0.95))  # neighbours at cos 0.95, the ends at cos(2·step) = 0.805
    rows = duplicate_clusters(["c", "b", "a"], at_angles(2 * step, step, 0), [None] * 3, DuplicateSearch(0.94))
    assert rows == approx_rows(
        [row("a", "a", None, 1.0), row("b", "a", "semantic", 0.95), row("c", "a", "semantic", 2 * 0.95**2 - 1)]
    )


def test_exact_and_semantic_pairs_chain_together():
    # k0 ~ k1 by embedding, k1 and k2 share bytes (orthogonal embeddings), k3 is alone: k2 is "semantic" to k0
    emb = np.concatenate([at_angles(0, 10), axes(4)[2:4]])
    rows = duplicate_clusters(["k0", "k1", "k2", "k3"], emb, [None, "s", "s", None], DuplicateSearch(0.9))
    assert rows == approx_rows(
        [
            row("k0", "k0", None, 1.0),
            row("k1", "k0", "semantic", math.cos(math.radians(10))),
            row("k2", "k0", "semantic", 0.0),
        ]
    )
    # a member sharing the kept sample's bytes is "exact", also when it is similar too
    rows = duplicate_clusters(["k0", "k1", "k2"], emb[:3], ["t", "t", "u"], DuplicateSearch(0.9))
    assert rows == approx_rows([row("k0", "k0", None, 1.0), row("k1", "k0", "exact", math.cos(math.radians(10)))])


def planted(n_random: int, n_pairs: int, dim: int, seed: int) -> tuple[np.ndarray, list[str], list[dict]]:
    """Random unit vectors plus a partner at cos > 0.99 for each of the first n_pairs; keys in shuffled order.

    Returns the embeddings, the keys and the expected rows (similarities computed here).
    """
    rng = np.random.default_rng(seed)
    base = unit_rows(rng.standard_normal((n_random, dim)))
    partners = unit_rows(base[:n_pairs] + 0.01 * rng.standard_normal((n_pairs, dim)))
    emb = np.concatenate([base, partners])
    keys = [f"img{i:05d}" for i in rng.permutation(len(emb))]
    expected = []
    for i in range(n_pairs):
        j = n_random + i
        kept, other = sorted([i, j], key=keys.__getitem__)
        expected += [row(keys[kept], keys[kept], None, 1.0), row(keys[other], keys[kept], "semantic", 0.0)]
        expected[-1]["similarity"] = float(emb[i] @ emb[j])
        assert expected[-1]["similarity"] > 0.99
    expected.sort(key=lambda r: (r["cluster"], r["key"]))
    return emb, keys, approx_rows(expected)


@pytest.mark.parametrize("chunk", [near_duplicates.QUERY_CHUNK, 50])
def test_kept_key_is_smallest_and_independent_of_input_order(monkeypatch, chunk):
    monkeypatch.setattr(near_duplicates, "QUERY_CHUNK", chunk)
    emb, keys, expected = planted(300, 12, 16, seed=1)
    sha = [None] * len(keys)
    sha[100] = sha[200] = "same-bytes"  # one exact pair too (neither is planted)
    base = duplicate_clusters(keys, emb, sha, DuplicateSearch(0.98))
    kept = min(keys[100], keys[200])
    exact = [row(kept, kept, None, 1.0), row(max(keys[100], keys[200]), kept, "exact", float(emb[100] @ emb[200]))]
    assert base == sorted(expected + approx_rows(exact), key=lambda r: (r["cluster"], r["key"]))
    rng = np.random.default_rng(7)
    for _ in range(3):
        order = rng.permutation(len(keys))
        shuffled = duplicate_clusters(
            [keys[i] for i in order], emb[order], [sha[i] for i in order], DuplicateSearch(0.98)
        )
        assert shuffled == base


def test_long_shuffled_chain_is_one_cluster():
    # 400 unit vectors 0.1° apart: each joined to its neighbours only (threshold cos 0.15°)
    n = 400
    order = np.random.default_rng(3).permutation(n)
    emb = at_angles(*(0.1 * order))
    keys = [f"k{i:03d}" for i in order]
    rows = duplicate_clusters(keys, emb, [None] * n, DuplicateSearch(math.cos(math.radians(0.15))))
    assert [r["key"] for r in rows] == sorted(keys)
    assert {r["cluster"] for r in rows} == {"k000"}
    assert sum(r["kept"] for r in rows) == 1


def test_row_types_and_float16_input():
    emb, keys, expected = planted(50, 3, 8, seed=2)
    rows = duplicate_clusters(keys, emb.astype(np.float16), [None] * len(keys), DuplicateSearch(0.98))
    assert [(r["key"], r["cluster"], r["kept"], r["kind"]) for r in rows] == [
        (r["key"], r["cluster"], r["kept"], r["kind"]) for r in expected
    ]
    assert all(type(r["similarity"]) is float and type(r["kept"]) is bool for r in rows)
    assert all(
        r["similarity"] == pytest.approx(e["similarity"].expected, abs=2e-3)
        for r, e in zip(rows, expected, strict=True)
    )


@pytest.mark.parametrize("chunk", [near_duplicates.QUERY_CHUNK, 97])
def test_ivf_path_finds_every_planted_pair_with_all_lists_probed(monkeypatch, chunk):
    monkeypatch.setattr(near_duplicates, "QUERY_CHUNK", chunk)  # 97: queries and additions in many chunks
    indexes: list[tuple[str, faiss.Index]] = []
    real_factory = faiss.index_factory

    def spy(d: int, description: str, metric: int) -> faiss.Index:
        indexes.append((description, index := real_factory(d, description, metric)))
        return index

    monkeypatch.setattr(near_duplicates.faiss, "index_factory", spy)
    emb, keys, expected = planted(1960, 40, 32, seed=0)
    sha = [None] * len(keys)
    nlist = ivf_lists(len(keys))
    assert nlist == len(keys) // 39  # 4·√2000 = 179 lists would leave too few training points per list
    ivf = DuplicateSearch(0.98, exact_limit=50, nprobe=10_000)
    assert duplicate_clusters(keys, emb, sha, ivf) == expected
    [(description, index)] = indexes
    assert (description, index.nprobe, index.ntotal) == (f"IVF{nlist},Flat", nlist, len(keys))  # every list probed
    assert duplicate_clusters(keys, emb, sha, DuplicateSearch(0.98)) == expected  # exact: no false pairs either
    assert len(indexes) == 1


def test_threads_are_restored():
    before = faiss.omp_get_max_threads()
    rows = duplicate_clusters(["a", "b"], at_angles(0, 1), [None, None], DuplicateSearch(0.9), threads=1)
    assert [r["key"] for r in rows] == ["a", "b"]
    assert faiss.omp_get_max_threads() == before


def test_empty_input():
    assert duplicate_clusters([], np.zeros((0, 512), np.float16), [], DuplicateSearch(0.95)) == []
    assert duplicate_clusters([], np.zeros((0, 1)), [], DuplicateSearch(0.95, exact_limit=0)) == []


@pytest.mark.parametrize(
    ("keys", "emb", "sha", "message"),
    [
        (["a", "b"], axes(3), [None, None], "differ in length"),
        (["a", "b"], axes(2), [None], "differ in length"),
        (["a"], np.ones(4, np.float32) / 2, [None], "2-D"),
        (["a", "b"], np.eye(2, dtype=np.int64), [None, None], "floating point"),
        (
            ["a", "b"],
            np.array([[1.0, 0.0], [np.nan, 0.0]], np.float32),
            [None, None],
            r"embedding 1 \('b'\) is not finite",
        ),
        (["a", "b"], np.array([[1.0, 0.0], [2.0, 0.0]], np.float32), [None, None], "not L2-normalised"),
        (["a", "a"], axes(2), [None, None], "unique"),
        (["a", 2], axes(2), [None, None], "keys must be strings"),
        (["a", "b"], axes(2), [None, b"x"], "sha256 values"),
        (["a"], np.zeros((1, 0), np.float32), [None], "0 dimensions"),
    ],
)
def test_invalid_input(keys, emb, sha, message):
    with pytest.raises(ValueError, match=message):
        duplicate_clusters(keys, emb, sha, DuplicateSearch(0.9))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": 0.9, "nprobe": 0}, "nprobe"),
        ({"threshold": 0.9, "exact_limit": -1}, "exact_limit"),
    ],
)
def test_invalid_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DuplicateSearch(**kwargs)


def test_invalid_threads():
    with pytest.raises(ValueError, match="threads"):
        duplicate_clusters(["a"], axes(1), [None], DuplicateSearch(0.9), threads=0)
