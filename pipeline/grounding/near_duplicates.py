"""Exact and near-duplicate clusters of images, from the sha256 of their JPEG bytes and their CLIP image embeddings.

Two samples are a duplicate pair when they have the same (non-null) sha256 ("exact"), or when the cosine of their
L2-normalised embeddings is at or above a threshold ("semantic"; computed as a float32 inner product). Clusters are
the connected components of all those pairs (a union-find), so a chain a~b~c puts a and c into one cluster even when
a and c are less similar than the threshold. Each cluster keeps one sample: the smallest key in string order, which
does not depend on the input order.

Search, over n embeddings of dimension d (faiss, on the CPU):

* n <= ``exact_limit``: exact, ``IndexFlatIP.range_search``. Time O(n²·d): for n = 10 M, d = 768 that is
  n²·d = 7.7e16 multiply-adds.
* n > ``exact_limit``: approximate, an ``IVF{nlist},Flat`` inner-product index with nlist = round(4·√n) (at most
  n / 39, so that k-means has 39 training points per list), trained by spherical k-means (25 iterations) on a
  seeded sample of at most 64·nlist vectors, probing ``nprobe`` lists per query. A pair is missed when one vector
  lies in a list that the other's query does not probe. Time, with balanced lists: n·(n·nprobe/nlist)·d for the
  scan plus n·nlist·d for assigning the queries (the same again for adding the vectors) plus
  64·nlist·nlist·d·25 for training. For n = 10 M, d = 768, nprobe = 16: nlist = 12,649, each query scans
  ≈ 12,649 vectors, so 9.7e13 (scan) + 2·9.7e13 (assignment) + 2.0e14 (training) ≈ 4.9e14 multiply-adds,
  about 160 times less than the exact search.

Memory, both ways: the index holds one float32 copy of the embeddings, n·d·4 bytes (30.7 GB for n = 10 M, d = 768),
besides the caller's array (float16 input is converted chunk by chunk, never as a whole); IVF adds 8 bytes per
vector (ids) and the centroids. Queries run in chunks of ``QUERY_CHUNK`` rows, so the range-search results held at
once are the pairs of one chunk: fine for sparse duplicates, but a group of m mutual near-duplicates yields m² pairs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import faiss
import numpy as np

QUERY_CHUNK = 16_384  # rows per range-search call (and per conversion to float32)
TRAIN_POINTS_PER_LIST = 64  # IVF k-means sample: at most this many vectors per list
MIN_TRAIN_POINTS_PER_LIST = 39  # faiss warns below this many training vectors per list
NORM_TOLERANCE = 1e-2  # |‖e‖ - 1| allowed: float16 rounding moves a unit norm by < 1e-3


@dataclass(frozen=True)
class DuplicateSearch:
    """How near-duplicates are searched."""

    threshold: float  # cosine similarity at or above which two images are near-duplicates (0 < t <= 1)
    exact_limit: int = 200_000  # up to this many embeddings: exact search (IndexFlatIP); above: IVF
    nprobe: int = 16  # IVF lists probed per query
    seed: int = 0  # chooses the IVF k-means training sample

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"duplicate threshold must be in (0, 1], got {self.threshold}")
        if self.exact_limit < 0:
            raise ValueError(f"exact_limit must be >= 0, got {self.exact_limit}")
        if self.nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {self.nprobe}")


def ivf_lists(n: int) -> int:
    """IVF lists for n vectors: round(4·√n), at most n / 39 (and at least 1)."""
    return max(1, min(round(4 * math.sqrt(n)), n // MIN_TRAIN_POINTS_PER_LIST))


def duplicate_clusters(
    keys: Sequence[str],
    embeddings: np.ndarray,
    sha256: Sequence[str | None],
    search: DuplicateSearch,
    *,
    threads: int | None = None,
) -> list[dict]:
    """Rows for every member of a cluster of >= 2 samples: {"key", "cluster", "kept", "kind", "similarity"}.

    ``cluster`` is the kept sample's key (the cluster's smallest key) and ``kept`` is True only for it. ``kind`` is
    "exact" for a member whose sha256 equals the kept sample's, "semantic" for any other member, and None for the
    kept sample. ``similarity`` is the cosine of the member's embedding to the kept one's (1.0 for the kept row);
    members joined through a chain may lie below the threshold. Rows are sorted by (cluster, key).
    ``threads`` sets faiss's OpenMP threads for this call (None: faiss's default).
    Raises ValueError for inconsistent or invalid input.
    """
    embeddings = np.asarray(embeddings)
    _validate(keys, embeddings, sha256, threads)
    n = len(keys)
    if n == 0:
        return []
    components = _Components(n)
    components.union(*_exact_pairs(sha256))
    with _faiss_threads(threads):
        for queries, found in _semantic_pairs(embeddings, search):
            components.union(queries, found)
    return _rows(keys, embeddings, sha256, components.parent)


class _Components:
    """Union-find over 0..n-1, vectorised: ``parent`` is kept flat, each sample's entry is its component's
    smallest index. A union that joins anything costs a few O(n) passes, little beside one chunk's search."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Join the components of a[k] and b[k] for every k."""
        parent = self.parent
        while True:
            root_a, root_b = parent[a], parent[b]
            differ = root_a != root_b
            if not differ.any():
                return
            a, b, root_a, root_b = a[differ], b[differ], root_a[differ], root_b[differ]
            # Hook each larger root under the smallest root it meets; entries only decrease, so no cycles.
            np.minimum.at(parent, np.maximum(root_a, root_b), np.minimum(root_a, root_b))
            while not np.array_equal(jumped := parent[parent], parent):  # pointer jumping until flat again
                parent[:] = jumped


def _validate(keys: Sequence[str], embeddings: np.ndarray, sha256: Sequence[str | None], threads: int | None) -> None:
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array (samples x dimensions), got shape {embeddings.shape}")
    if not np.issubdtype(embeddings.dtype, np.floating):
        raise ValueError(f"embeddings must be floating point, got {embeddings.dtype}")
    if not len(keys) == len(embeddings) == len(sha256):
        raise ValueError(f"keys, embeddings and sha256 differ in length: {len(keys)}, {len(embeddings)}, {len(sha256)}")
    if not all(isinstance(key, str) for key in keys):
        raise ValueError("keys must be strings")
    if len(set(keys)) != len(keys):
        raise ValueError("keys must be unique")
    if not all(h is None or isinstance(h, str) for h in sha256):
        raise ValueError("sha256 values must be strings or None")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if len(keys) and embeddings.shape[1] == 0:
        raise ValueError("embeddings have 0 dimensions")
    for start, chunk in _chunks(embeddings):
        if not np.isfinite(chunk).all():
            row = start + int(np.flatnonzero(~np.isfinite(chunk).all(axis=1))[0])
            raise ValueError(f"embedding {row} ({keys[row]!r}) is not finite")
        norms = np.linalg.norm(chunk, axis=1)
        if (bad := np.flatnonzero(np.abs(norms - 1.0) > NORM_TOLERANCE)).size:
            row = start + int(bad[0])
            raise ValueError(f"embedding {row} ({keys[row]!r}) is not L2-normalised (norm {norms[bad[0]]:.4g})")


def _chunks(embeddings: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(start, float32 contiguous rows) in chunks of QUERY_CHUNK rows."""
    for start in range(0, len(embeddings), QUERY_CHUNK):
        yield start, np.ascontiguousarray(embeddings[start : start + QUERY_CHUNK], dtype=np.float32)


def _exact_pairs(sha256: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (first sample with a sha256, later sample with the same sha256)."""
    first: dict[str, int] = {}
    a: list[int] = []
    b: list[int] = []
    for i, h in enumerate(sha256):
        if h is not None and (j := first.setdefault(h, i)) != i:
            a.append(j)
            b.append(i)
    return np.array(a, np.int64), np.array(b, np.int64)


def _semantic_pairs(embeddings: np.ndarray, search: DuplicateSearch) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(query rows, found rows) with inner product >= threshold, one chunk of queries at a time."""
    n, d = embeddings.shape
    if n > search.exact_limit:
        nlist = ivf_lists(n)
        index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(search.seed)
        sample = np.sort(rng.choice(n, size=min(n, TRAIN_POINTS_PER_LIST * nlist), replace=False))
        index.train(np.ascontiguousarray(embeddings[sample], dtype=np.float32))
        index.nprobe = min(search.nprobe, nlist)
    else:
        index = faiss.IndexFlatIP(d)
    for _, chunk in _chunks(embeddings):
        index.add(chunk)
    # faiss keeps results strictly above the radius: the float32 just below the threshold makes it ">= threshold".
    radius = float(np.nextafter(np.float32(search.threshold), np.float32(-np.inf)))
    for start, chunk in _chunks(embeddings):
        lims, _, found = index.range_search(chunk, radius)
        queries = np.repeat(np.arange(start, start + len(chunk), dtype=np.int64), np.diff(lims.astype(np.int64)))
        other = queries != found
        yield queries[other], found[other]


def _rows(keys: Sequence[str], embeddings: np.ndarray, sha256: Sequence[str | None], root: np.ndarray) -> list[dict]:
    """Output rows of the clusters of >= 2 samples; ``root`` is each sample's component id."""
    members = np.flatnonzero(np.bincount(root, minlength=len(root))[root] >= 2)
    kept_of_root: dict[int, int] = {}
    for i in sorted(members.tolist(), key=keys.__getitem__):
        kept_of_root.setdefault(int(root[i]), i)
    kept = np.array([kept_of_root[int(r)] for r in root[members]], np.int64)
    similarity = np.empty(len(members), np.float32)
    for start in range(0, len(members), QUERY_CHUNK):
        a = np.asarray(embeddings[members[start : start + QUERY_CHUNK]], np.float32)
        b = np.asarray(embeddings[kept[start : start + QUERY_CHUNK]], np.float32)
        similarity[start : start + QUERY_CHUNK] = np.einsum("ij,ij->i", a, b)
    rows = []
    for i, k, sim in zip(members.tolist(), kept.tolist(), similarity.tolist(), strict=True):
        if i == k:
            rows.append({"key": keys[i], "cluster": keys[i], "kept": True, "kind": None, "similarity": 1.0})
        else:
            kind = "exact" if sha256[i] is not None and sha256[i] == sha256[k] else "semantic"
            rows.append({"key": keys[i], "cluster": keys[k], "kept": False, "kind": kind, "similarity": sim})
    rows.sort(key=lambda row: (row["cluster"], row["key"]))
    return rows


@contextmanager
def _faiss_threads(threads: int | None) -> Iterator[None]:
    """faiss's OpenMP threads set to ``threads`` for the block (None: unchanged)."""
    if threads is None:
        yield
        return
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)
