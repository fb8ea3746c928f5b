"""Read a listed record back: image bytes, alt text and source metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

from pipeline.sources.files import file_too_large, open_regular, read_regular_file, sidecar_too_large
from pipeline.sources.records import InputRecord, LoadedSample, MemberRef, SkipRecord, clean_text
from pipeline.sources.sa1b import sa1b_meta
from pipeline.sources.tar_members import read_member


def _parse_json_object(raw: bytes, where: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SkipRecord("bad_metadata", f"{where}: malformed JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise SkipRecord("bad_metadata", f"{where}: JSON is a {type(obj).__name__}, not an object")
    return obj


def _text(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    text = raw.decode("utf-8", errors="replace").strip()
    return text or None


class SampleReader:
    """Loads records; keeps each tar open once for all the records of a shard. Use as a context."""

    def __init__(self) -> None:
        self._tars: dict[Path, IO[bytes]] = {}

    def __enter__(self) -> SampleReader:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._tars.values():
            handle.close()
        self._tars.clear()

    def _member(self, tar: Path, ref: MemberRef) -> bytes:
        handle = self._tars.get(tar)
        if handle is None:
            handle = self._tars[tar] = open_regular(tar, follow_links=False)
        return read_member(handle, ref)

    def _read(self, rec: InputRecord, path: Path | None, member: MemberRef | None, *, sidecar: bool) -> bytes | None:
        """The bytes of the record's file or tar member, at most its limit; None when it has none.

        Only regular files are opened (links were resolved when listing; a Parquet table's paths
        are followed, since a table names paths anywhere). An image over ``--max-file-bytes`` is
        ``file_too_large``, a sidecar over ``--max-sidecar-bytes`` is ``bad_metadata``.
        """
        limit = rec.limits.max_sidecar_bytes if sidecar else rec.limits.max_file_bytes
        if path is not None:
            return read_regular_file(path, limit, follow_links=rec.kind == "parquet", sidecar=sidecar)
        if member is None or rec.tar is None:
            return None
        if member.size > limit:  # by its header: never read
            too_large = sidecar_too_large if sidecar else file_too_large
            raise too_large(f"tar member {member.name!r}", member.size, limit)
        try:
            return self._member(rec.tar, member)
        except (OSError, EOFError) as exc:
            raise SkipRecord("read_error", f"cannot read {member.name}: {exc}") from None

    def load(self, rec: InputRecord) -> LoadedSample:
        """The record's bytes and metadata; raises ``SkipRecord`` with the reason when unusable."""
        if rec.preset_skip is not None:
            raise SkipRecord(*rec.preset_skip)
        image = self._read(rec, rec.path, rec.image_member, sidecar=False)
        if image is None:
            raise SkipRecord("no_image", f"{rec.location} has no image")
        raw_json = self._read(rec, rec.json_path, rec.json_member, sidecar=True)
        alt_text = _text(self._read(rec, rec.txt_path, rec.txt_member, sidecar=True)) or rec.alt_text
        meta = dict(rec.meta)
        if raw_json is not None:
            obj = _parse_json_object(raw_json, f"{rec.location} metadata")
            if rec.kind == "sa1b":
                meta.update(sa1b_meta(obj))
            else:
                meta.update(obj)
                if alt_text is None and isinstance(obj.get("caption"), str):
                    alt_text = clean_text(obj["caption"]).strip() or None
        return LoadedSample(image=image, alt_text=alt_text, meta=meta)
