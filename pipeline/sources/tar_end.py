"""Whether a tar archive reads to its end: ``tarfile`` stops silently at a header cut short."""

from __future__ import annotations

import tarfile
from typing import IO

_CHUNK = 1 << 20


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
