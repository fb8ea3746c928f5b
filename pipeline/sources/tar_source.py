"""Records from uncompressed tars (SA-1B tars, img2dataset/webdataset shards)."""

from __future__ import annotations

import tarfile
from pathlib import Path

from pipeline.records import InputRecord, make_key
from pipeline.sources.tar_members import list_tar_samples


def list_tar_records(tar_path: Path, *, source: str, kind: str) -> list[InputRecord]:
    """One record per sample key in the tar; unusable samples carry their skip reason."""
    try:
        samples, stopped = list_tar_samples(tar_path)
    except (tarfile.TarError, OSError) as exc:
        return [_tar_problem(tar_path, source, kind, "", f"{tar_path} is not a readable uncompressed tar ({exc})")]
    records = []
    for sample in samples:
        image = sample.image()
        skip = None
        if sample.problems:
            skip = sample.problems[0]
        elif image is None:
            names = ", ".join(sorted(sample.members)) or "nothing"
            skip = ("no_image", f"sample {sample.prefix!r} has no image member (has {names})")
        records.append(
            InputRecord(
                key=make_key(source, sample.prefix),
                source=source,
                original_id=sample.prefix,
                location=f"{tar_path}::{image.name if image else sample.prefix}",
                kind=kind,
                tar=tar_path,
                image_member=image,
                json_member=sample.members.get("json"),
                txt_member=sample.members.get("txt"),
                preset_skip=skip,
            )
        )
    if stopped is not None:
        detail = f"{tar_path} ends early after {len(samples)} samples ({stopped}); later members are lost"
        records.append(_tar_problem(tar_path, source, kind, "-unreadable-rest", detail))
    return records


def _tar_problem(tar_path: Path, source: str, kind: str, suffix: str, detail: str) -> InputRecord:
    """A record standing for the part of a tar that cannot be listed, so the loss is on record."""
    original_id = f"{tar_path.stem}{suffix}"
    return InputRecord(
        key=make_key(source, original_id),
        source=source,
        original_id=original_id,
        location=str(tar_path),
        kind=kind,
        preset_skip=("bad_tar", detail),
    )


def list_tar_dir(src: Path, *, source: str, kind: str) -> list[InputRecord]:
    """Records of one tar file, or of every ``*.tar`` directly in a directory."""
    tars = [src] if src.is_file() else sorted(src.glob("*.tar"))
    records: list[InputRecord] = []
    for tar_path in tars:
        records.extend(list_tar_records(tar_path, source=source, kind=kind))
    return records
