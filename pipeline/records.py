"""Input records: what a source lists, and how a shard task reads one back."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")


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
    """A stable, webdataset-safe key ``<source>-<original id>``.

    Path separators become ``_``; any other character outside ``[A-Za-z0-9_-]`` is replaced too,
    and then a short hash of the original id is appended so distinct ids keep distinct keys.
    """
    flat = original_id.replace("/", "_")
    safe = _UNSAFE_KEY_CHARS.sub("_", flat)
    if safe != flat:
        digest = hashlib.sha1(original_id.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        safe = f"{safe}-{digest}"
    return f"{source}-{safe}"


@dataclass(frozen=True)
class MemberRef:
    """A regular file inside an uncompressed tar, read by offset (never extracted)."""

    name: str
    offset: int
    size: int


@dataclass(frozen=True)
class InputRecord:
    """One input sample. Exactly one of ``path`` (a file) or ``tar`` (+ ``image_member``) holds the image.

    ``json_*``/``txt_*`` point at sidecars; ``alt_text``/``meta`` carry values a table already gave.
    ``preset_skip`` marks a record known bad at listing time (unsafe tar member, duplicate key, ...).
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


@dataclass
class LoadedSample:
    """A record's raw image bytes with its alt text and source metadata."""

    image: bytes
    alt_text: str | None
    meta: dict[str, Any]
