"""List the samples of an uncompressed tar (webdataset grouping) without extracting anything."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pipeline.sources.records import MemberRef
from pipeline.sources.tar_end import require_tar_end

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass
class TarSample:
    """Members sharing a webdataset key (``dir/base`` before the first dot of the basename)."""

    prefix: str
    members: dict[str, MemberRef] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (code, detail) of unusable members

    def image(self) -> MemberRef | None:
        for ext in IMAGE_EXTENSIONS:
            if ext in self.members:
                return self.members[ext]
        return None


def _split_name(name: str) -> tuple[str, str]:
    path = PurePosixPath(name)
    base, _, ext = path.name.partition(".")
    prefix = str(path.parent / base) if str(path.parent) != "." else base
    return prefix, ext.lower()


def _member_problem(member: tarfile.TarInfo) -> tuple[str, str] | None:
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts:
        return ("unsafe_member", f"tar member name {member.name!r} points outside the archive")
    if not member.isfile():
        what = "symbolic link" if member.issym() else "hard link" if member.islnk() else "special file"
        return ("not_regular_file", f"tar member {member.name!r} is a {what}")
    return None


def list_tar_samples(tar_path: Path) -> tuple[list[TarSample], str | None]:
    """Samples of ``tar_path`` in member order, and why listing stopped early (None if it did not).

    Raises ``tarfile.ReadError`` if not even the first header is a plain tar header.
    """
    groups: dict[str, TarSample] = {}
    stopped: str | None = None
    with tarfile.open(tar_path, mode="r:") as tf:
        try:
            for member in tf:
                if member.isdir():
                    continue
                prefix, ext = _split_name(member.name.removeprefix("./"))
                sample = groups.setdefault(prefix, TarSample(prefix=prefix))
                problem = _member_problem(member)
                if problem:
                    sample.problems.append(problem)
                else:
                    sample.members[ext] = MemberRef(name=member.name, offset=member.offset_data, size=member.size)
            require_tar_end(tf.fileobj, tf.offset)  # tarfile stops silently at a header cut short
        except tarfile.ReadError as exc:  # truncated or corrupt after some members: keep those
            stopped = str(exc)
    return list(groups.values()), stopped


def read_member(handle, ref: MemberRef) -> bytes:
    """The bytes of one member through an open binary file handle of its tar."""
    handle.seek(ref.offset)
    data = handle.read(ref.size)
    if len(data) != ref.size:
        raise EOFError(f"tar member {ref.name!r} is truncated ({len(data)} of {ref.size} bytes)")
    return data
