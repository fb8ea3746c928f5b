"""Reproducible samples of keys: chosen from each key and a seed alone, the same for every model and run."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

_RANKS = 2**64


def key_rank(key: str, seed: int) -> int:
    """A uniform 64-bit rank of ``key`` under ``seed`` (sha256, so any machine and Python agree)."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode()).digest()[:8], "big")


def sample_keys(keys: Iterable[str], sample: float, seed: int) -> set[str]:
    """The sampled keys: each key with probability ``sample`` when it is below 1, else the ``sample``
    keys of lowest rank (a larger sample contains every smaller one of the same seed)."""
    if sample < 1:
        bound = sample * _RANKS
        return {k for k in keys if key_rank(k, seed) < bound}
    return set(sorted(keys, key=lambda k: (key_rank(k, seed), k))[: int(sample)])


def describe_sample(sample: float, seed: int) -> str:
    """``"50 keys per shard (seed 0)"`` or ``"5.0% of each shard (seed 0)"``."""
    size = f"{100 * sample:.1f}% of each shard" if sample < 1 else f"{int(sample)} keys per shard"
    return f"{size} (seed {seed})"
