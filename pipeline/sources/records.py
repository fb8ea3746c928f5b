"""Input records: what a source lists, and how a shard task reads one back."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.shard_config import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_SIDECAR_BYTES

_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_SAFE_ID = re.compile(r"[A-Za-z0-9_-]*")
# The shape of a hashed key: a flattened id (always holding a ``_``) then ``-`` and 8 lowercase hex digits.
_HASHED_SHAPE = re.compile(r"_.*-[0-9a-f]{8}\Z")


class SkipRecord(Exception):
    """A record that is not written; ``code`` is short and groupable, ``detail`` says why."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def clean_text(text: str) -> str:
    """``text`` as valid UTF-8: undecodable bytes of file names and lone surrogates become U+FFFD."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def make_key(source: str, original_id: str) -> str:
    """A stable, webdataset-safe key ``<source>-<id part>``, distinct for distinct original ids.

    The rule depends on the original id alone (never on what else is listed), so a key never
    changes when inputs are added or a job is rerun:

    * An id made only of ``[A-Za-z0-9_-]`` is used as it is (``sa_10039``, ``000001234``,
      ``IMG_0001``), unless it has the shape of a hashed key (below: a ``_`` somewhere and a tail
      ``-`` + 8 lowercase hex digits), in which case it is hashed like the next case.
    * Any other id (one holding ``/``, ``.``, a space, a non-ASCII character, ...) is flattened,
      every character outside ``[A-Za-z0-9_-]`` becoming ``_``, and ``-`` plus the first 8 hex
      digits of the SHA-1 of its UTF-8 bytes is appended: ``cats/tom`` -> ``cats_tom-e6bc0f9f``,
      while ``cats_tom`` stays ``cats_tom``.

    Kept ids never have the hashed shape and hashed keys always do, so the two kinds never meet;
    two kept ids differ as the ids do; two hashed keys can only meet if their ids flatten alike
    *and* share 32 bits of SHA-1 (``list_inputs`` reports that as ``duplicate_key`` naming both
    ids). Source names hold no ``-``, so the key splits back at its first ``-``. Keys hold no
    ``.``, which webdataset would take as the start of the extension.
    """
    if _SAFE_ID.fullmatch(original_id) and not _HASHED_SHAPE.search(original_id):
        return f"{source}-{original_id}"
    flat = _UNSAFE_KEY_CHARS.sub("_", original_id)
    digest = hashlib.sha1(original_id.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{source}-{flat}-{digest}"


@dataclass(frozen=True)
class MemberRef:
    """A regular file inside an uncompressed tar, read by offset (never extracted)."""

    name: str
    offset: int
    size: int


@dataclass(frozen=True)
class ReadLimits:
    """The most bytes a shard task reads of a record's image and of each of its sidecars."""

    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    max_sidecar_bytes: int = DEFAULT_MAX_SIDECAR_BYTES


DEFAULT_LIMITS = ReadLimits()


@dataclass(frozen=True)
class InputRecord:
    """One input sample. Exactly one of ``path`` (a file) or ``tar`` (+ ``image_member``) holds the image.

    ``json_*``/``txt_*`` point at sidecars; ``alt_text``/``meta`` carry values a table already gave.
    ``preset_skip`` marks a record known bad at listing time (unsafe tar member, duplicate key, ...).
    ``path``/``json_path``/``txt_path`` are the files to open (links already resolved inside the source);
    ``limits`` bounds what is read of them (the source's ``--max-file-bytes``/``--max-sidecar-bytes``).
    """

    key: str
    source: str
    original_id: str
    location: str
    kind: str  # folder | sa1b | img2dataset | parquet: decides how sidecar metadata is read
    path: Path | None = None
    json_path: Path | None = None
    txt_path: Path | None = None
    tar: Path | None = None
    image_member: MemberRef | None = None
    json_member: MemberRef | None = None
    txt_member: MemberRef | None = None
    alt_text: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    preset_skip: tuple[str, str] | None = None
    limits: ReadLimits = DEFAULT_LIMITS


@dataclass
class LoadedSample:
    """A record's raw image bytes with its alt text and source metadata."""

    image: bytes
    alt_text: str | None
    meta: dict[str, Any]
