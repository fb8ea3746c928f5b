"""Read back the shards the shard stage wrote."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from schemas.layout import DatasetLayout, ShardFiles


def read_shard_stats(layout: DatasetLayout, index: int) -> dict[str, Any]:
    """The stats of a finished shard of the root (its stats file only: nothing else is opened)."""
    return stats_of(layout.shard_files(index))


def stats_of(files: ShardFiles) -> dict[str, Any]:
    """The stats file of a finished shard, as written (no consistency check: see ``read_stats`` for that)."""
    return json.loads(files.stats.read_text())


def iter_shard_samples(
    tar_path: Path, wanted: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` per sample, streamed from one of our shard tars (never extracted); with
    ``wanted``, only the samples whose key it accepts (the others' bytes are not read)."""
    key: str | None = None
    members: dict[str, bytes] = {}
    with tarfile.open(tar_path, mode="r:") as tf:
        for member in tf:
            if not member.isfile():
                continue
            name_key, _, ext = member.name.partition(".")
            if wanted is not None and not wanted(name_key):
                continue
            if name_key != key and key is not None:
                yield key, members
                members = {}
            key = name_key
            handle = tf.extractfile(member)
            members[ext] = handle.read() if handle else b""
    if key is not None:
        yield key, members
