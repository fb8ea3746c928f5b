"""The one way densecurate writes a file or folder: under a temporary name, renamed when complete.

A reader never sees a half-written output: it finds the old one, the new one, or none. A killed
writer leaves only ``NAME.tmp-PID``, which the next writer of ``NAME`` deletes.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from schemas.errors import OutputPathError

TMP_MARK = ".tmp-"


def temp_path(path: Path) -> Path:
    """The in-progress name of ``path`` (unique per process)."""
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


def is_temp(path: Path) -> bool:
    """Whether ``path`` is an in-progress (or abandoned) output."""
    return TMP_MARK in path.name


def make_folder(folder: Path) -> Path:
    """Make ``folder`` and its parents; one sentence (``OutputPathError``) where that cannot be done. A full disk
    stays an ``OSError`` (the environment's failure, not the user's)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise OutputPathError(
            f"cannot make the output folder {folder}: {exc.strerror or exc}; choose a folder that can be written"
        ) from exc
    return folder


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _writer_alive(temp: Path) -> bool:
    """Whether the process that named ``temp`` (``NAME.tmp-PID``) still runs on this machine."""
    pid = temp.name.rpartition("-")[2]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(*finals: Path) -> None:
    """Delete the in-progress files or folders that killed runs left for these outputs (a live
    writer's are left alone). Lists each output's folder: see ``remove_stale_temps_in``."""
    for final in finals:
        for stale in final.parent.glob(f"{final.name}{TMP_MARK}*"):
            if not _writer_alive(stale):
                _remove(stale)


def remove_stale_temps_in(folder: Path) -> None:
    """Delete every in-progress output that killed runs left in ``folder``, in one listing. The runner
    calls it for each output folder under its lock, so per-shard writes need not list the folder
    (a folder of a million shards would cost a million listings)."""
    if not folder.is_dir():
        return
    with os.scandir(folder) as entries:
        stale = [Path(e.path) for e in entries if TMP_MARK in e.name]
    for path in stale:
        if not _writer_alive(path):
            _remove(path)


@contextmanager
def atomic_output(final: Path, *, clean_stale: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``final`` to write a file or folder to.

    When the block ends normally the temporary path replaces ``final``; when it raises, the
    temporary path is deleted and ``final`` is left as it was. ``clean_stale`` False: the caller's
    folder was cleaned already (``remove_stale_temps_in``).
    """
    make_folder(final.parent)
    if clean_stale:
        remove_stale_temps(final)
    tmp = temp_path(final)
    try:
        yield tmp
    except OSError as exc:
        _remove(tmp)
        if exc.errno == errno.ENOENT and os.fsdecode(exc.filename or "").startswith(str(tmp)):
            # its folder exists, yet a file cannot be made there (a virtual file system such as /proc)
            raise OutputPathError(f"cannot write {final}: {exc.strerror}; choose a path that can be written") from exc
        raise
    except BaseException:
        _remove(tmp)
        raise
    if tmp.is_dir() and final.is_dir():  # os.replace cannot replace a non-empty folder
        old = final.with_name(f"{final.name}{TMP_MARK}old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        _remove(old)
    else:
        os.replace(tmp, final)


def write_atomic(final: Path, data: bytes | str, *, clean_stale: bool = True) -> None:
    """Write ``data`` (text as UTF-8) to ``final`` atomically."""
    with atomic_output(final, clean_stale=clean_stale) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
