"""Records from uncompressed tars (SA-1B tars, img2dataset/webdataset shards)."""

from __future__ import annotations

import tarfile
from pathlib import Path

from pipeline.sources.files import over_limit
from pipeline.sources.records import DEFAULT_LIMITS, InputRecord, MemberRef, ReadLimits, make_key
from pipeline.sources.tar_members import TarSample, list_tar_samples


def _size_problem(sample: TarSample, image: MemberRef, limits: ReadLimits) -> tuple[str, str] | None:
    """``file_too_large`` for an image member, ``bad_metadata`` for a sidecar member, over its limit (by header)."""
    if image.size > limits.max_file_bytes:
        what = f"tar member {image.name!r}"
        return ("file_too_large", over_limit(what, image.size, limits.max_file_bytes, "--max-file-bytes"))
    for ext in ("json", "txt"):
        side = sample.members.get(ext)
        if side is not None and side.size > limits.max_sidecar_bytes:
            what = f"tar member {side.name!r}"
            return ("bad_metadata", over_limit(what, side.size, limits.max_sidecar_bytes, "--max-sidecar-bytes"))
    return None


def list_tar_records(
    tar_path: Path, *, source: str, kind: str, limits: ReadLimits = DEFAULT_LIMITS, read_path: Path | None = None
) -> list[InputRecord]:
    """One record per sample key in the tar; unusable samples carry their skip reason.

    ``read_path`` is the file to open when ``tar_path`` (the name records carry) is a link.
    """
    real = read_path or tar_path
    try:
        samples, stopped = list_tar_samples(real)
    except (tarfile.TarError, OSError) as exc:
        return [tar_problem(tar_path, source, kind, "", f"{tar_path} is not a readable uncompressed tar ({exc})")]
    records = []
    for sample in samples:
        image = sample.image()
        skip = None
        if sample.problems:
            skip = sample.problems[0]
        elif image is None:
            names = ", ".join(sorted(sample.members)) or "nothing"
            skip = ("no_image", f"sample {sample.prefix!r} has no image member (has {names})")
        else:
            skip = _size_problem(sample, image, limits)
        records.append(
            InputRecord(
                key=make_key(source, sample.prefix),
                source=source,
                original_id=sample.prefix,
                location=f"{tar_path}::{image.name if image else sample.prefix}",
                kind=kind,
                tar=real,
                image_member=image,
                json_member=sample.members.get("json"),
                txt_member=sample.members.get("txt"),
                preset_skip=skip,
                limits=limits,
            )
        )
    if stopped is not None:
        detail = f"{tar_path} ends early after {len(samples)} samples ({stopped}); later members are lost"
        records.append(tar_problem(tar_path, source, kind, "-unreadable-rest", detail))
    return records


def tar_problem(tar_path: Path, source: str, kind: str, suffix: str, detail: str, code: str = "bad_tar") -> InputRecord:
    """A record standing for the part of a tar that cannot be listed, so the loss is on record."""
    original_id = f"{tar_path.stem}{suffix}"
    return InputRecord(
        key=make_key(source, original_id),
        source=source,
        original_id=original_id,
        location=str(tar_path),
        kind=kind,
        preset_skip=(code, detail),
    )
