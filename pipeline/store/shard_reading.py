"""Read back the shards the shard stage wrote."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.sources.tar_end import require_tar_end
from schemas.errors import DamagedOutputError
from schemas.layout import DatasetLayout, ShardFiles


def read_shard_stats(layout: DatasetLayout, index: int) -> dict[str, Any]:
    """The stats of a finished shard of the root (its stats file only: nothing else is opened)."""
    return stats_of(layout.shard_files(index))


def stats_of(files: ShardFiles) -> dict[str, Any]:
    """The stats file of a finished shard, as written (no consistency check: see ``read_stats`` for that)."""
    try:
        return json.loads(files.stats.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedOutputError(
            f"{files.stats} does not read as a shard's stats ({exc}): `densecurate verify` on its folder lists the "
            "damaged outputs, and rerunning the stage that wrote it with --repair rewrites them"
        ) from None


def iter_shard_samples(
    tar_path: Path, wanted: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` per sample, streamed from one of our shard tars (never extracted); with
    ``wanted``, only the samples whose key it accepts (the others' bytes are not read).

    Raises ``tarfile.ReadError`` (before the last sample) when the tar does not read to its end.
    """
    key: str | None = None
    members: dict[str, bytes] = {}
    with tar_path.open("rb") as handle, tarfile.open(fileobj=handle, mode="r:") as tf:
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
            data = tf.extractfile(member)
            members[ext] = data.read() if data else b""
        require_tar_end(handle, tf.offset)
    if key is not None:
        yield key, members
