"""Only regular files are read, links are not followed out of a source, and every read is bounded.

A FIFO never reaches EOF (and blocks on open), a character device such as ``/dev/zero`` never ends,
and a link may point anywhere on the machine: each is refused before it is opened. What is read
stops one byte past the limit, whatever the file's size said when it was checked.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import IO

from pipeline.sources.records import SkipRecord

_CHUNK = 1 << 20
_KINDS = (
    (stat.S_ISDIR, "directory"),
    (stat.S_ISFIFO, "named pipe (FIFO)"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISLNK, "symbolic link"),
)


def kind_of(mode: int) -> str:
    """``directory``, ``named pipe (FIFO)``, ... for a non-regular file's mode."""
    return next((name for test, name in _KINDS if test(mode)), "special file")


def human_bytes(n: int) -> str:
    """``41943040 bytes (40.0 MiB)``: exact, then readable."""
    if n < 1024:
        return f"{n} bytes"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n} bytes ({n / size:.1f} {unit})"
    return f"{n} bytes"  # pragma: no cover


def over_limit(what: str, size: int | None, limit: int, option: str) -> str:
    """The sentence for a file or member larger than its limit (``size`` None: it grew while read)."""
    if size is None:
        return f"{what} holds more than {option} {human_bytes(limit)}"
    return f"{what} is {human_bytes(size)}, over {option} {human_bytes(limit)}"


def file_too_large(what: str, size: int | None, limit: int) -> SkipRecord:
    """``file_too_large``: an image file or member over ``--max-file-bytes``."""
    return SkipRecord("file_too_large", over_limit(what, size, limit, "--max-file-bytes"))


def sidecar_too_large(what: str, size: int | None, limit: int) -> SkipRecord:
    """``bad_metadata``: a ``.json``/``.txt`` sidecar over ``--max-sidecar-bytes``."""
    return SkipRecord("bad_metadata", over_limit(what, size, limit, "--max-sidecar-bytes"))


def _unreadable_link(path: Path, target: Path, exc: OSError) -> str:
    """The sentence for a symbolic link whose target cannot be examined: a loop, or a missing target."""
    if exc.errno == errno.ELOOP:
        return f"{path} is a symbolic link loop ({exc.strerror}), not a regular file"
    return f"{path} is a symbolic link to {target}, which cannot be read ({exc})"


def listed_file(path: Path, root: Path | None) -> tuple[Path, os.stat_result] | tuple[None, tuple[str, str]]:
    """The regular file ``path`` stands for, with its stat, or a ``not_regular_file`` skip.

    A symbolic link is resolved; with a ``root`` (a source folder, resolved) its target must lie
    inside it. Nothing is opened. Raises ``OSError`` when ``path`` itself cannot be examined.
    """
    st = os.lstat(path)
    real = path
    if stat.S_ISLNK(st.st_mode):
        real = Path(os.path.realpath(path))  # unlike Path.resolve, never raises on a loop
        if root is not None and not real.is_relative_to(root):
            return None, ("not_regular_file", f"{path} is a symbolic link to {real}, outside the source {root}")
        try:
            st = os.stat(real)
        except OSError as exc:
            return None, ("not_regular_file", _unreadable_link(path, real, exc))
    if not stat.S_ISREG(st.st_mode):
        return None, ("not_regular_file", f"{path} is a {kind_of(st.st_mode)}, not a regular file")
    return real, st


def open_regular(path: Path, *, follow_links: bool) -> IO[bytes]:
    """``path`` open for reading, checked to be a regular file before and after opening.

    Refused without opening: a non-regular file (``not_regular_file``), and with ``follow_links``
    false a symbolic link. ``O_NONBLOCK`` keeps the open of a FIFO swapped in since the check from
    blocking; the check after opening then refuses it. Other failures are ``read_error``.
    """
    try:
        before = os.stat(path) if follow_links else os.lstat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SkipRecord("not_regular_file", _unreadable_link(path, path, exc)) from None
        raise SkipRecord("read_error", f"cannot read {path}: {exc}") from None
    if not stat.S_ISREG(before.st_mode):
        raise SkipRecord("not_regular_file", f"{path} is a {kind_of(before.st_mode)}, not a regular file")
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise SkipRecord("read_error", f"cannot read {path}: {exc}") from None
    handle = os.fdopen(fd, "rb")
    after = os.fstat(fd)
    if not stat.S_ISREG(after.st_mode):
        handle.close()
        raise SkipRecord("not_regular_file", f"{path} is a {kind_of(after.st_mode)}, not a regular file")
    return handle


def read_bounded(handle: IO[bytes], size_hint: int, limit: int) -> bytes:
    """What is left of ``handle``, but never more than ``limit + 1`` bytes (more means: over the limit).

    ``size_hint`` (the size by ``fstat``) sizes the first read; a file that grew since is read on
    in chunks of at most 1 MiB until it ends or passes the limit.
    """
    data = handle.read(min(size_hint, limit) + 1)
    chunks, total = [data], len(data)
    while total <= limit:
        more = handle.read(min(limit + 1 - total, _CHUNK))
        if not more:
            break
        chunks.append(more)
        total += len(more)
    return data if len(chunks) == 1 else b"".join(chunks)


def read_regular_file(path: Path, limit: int, *, follow_links: bool, sidecar: bool = False) -> bytes:
    """The bytes of the regular file ``path``; a ``SkipRecord`` when it is not one or is over ``limit``.

    Over the limit is ``file_too_large`` for an image, ``bad_metadata`` for a sidecar (``sidecar``).
    """
    too_large = sidecar_too_large if sidecar else file_too_large
    with open_regular(path, follow_links=follow_links) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > limit:
            raise too_large(str(path), size, limit)
        try:
            data = read_bounded(handle, size, limit)
        except OSError as exc:
            raise SkipRecord("read_error", f"cannot read {path}: {exc}") from None
    if len(data) > limit:  # it grew since its size was taken
        raise too_large(str(path), None, limit)
    return data
