"""Read back the shards the shard stage wrote."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from schemas.errors import DamagedOutputError
from schemas.layout import DatasetLayout, ShardFiles

_CHUNK = 1 << 20


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


def require_tar_end(handle: IO[bytes], offset: int) -> None:
    """Raise ``tarfile.ReadError`` unless the archive's members end at ``offset`` with its end-of-archive
    marker: zero blocks up to the end of the file (``tarfile`` stops silently at a header cut short or
    garbled after the first one, which would drop every later sample)."""
    handle.seek(offset)
    marker = handle.read(tarfile.BLOCKSIZE)
    ended = len(marker) == tarfile.BLOCKSIZE and not marker.strip(b"\0")
    while ended and (chunk := handle.read(_CHUNK)):
        ended = not chunk.strip(b"\0")
    if not ended:
        size = handle.seek(0, 2)
        raise tarfile.ReadError(f"its members stop at byte {offset} of {size}, before its end")


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
