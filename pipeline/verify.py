"""Is a finished output intact? Used by ``densecurate verify`` and by every stage's ``--repair``.

A shard is intact when its stats, Parquet and tar agree, the Parquet reads in full, every written
sample has its members in the tar, and (deep) every stored image matches the sha256 recorded for it.
A table (captions, density, vocabulary) is intact when it reads in full.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.shard_reading import iter_shard_samples
from pipeline.shard_writer import read_stats
from schemas.errors import MissingInputError, UserError
from schemas.layout import DatasetLayout, ShardFiles, is_dataset_root, shard_files_in, shard_indices_in
from schemas.tables import STATUS_OK


class DamagedInputError(UserError):
    """A finished output turned out to be damaged when a later stage read it."""


@dataclass(frozen=True)
class Damage:
    """One damaged output and what is wrong with it."""

    path: Path
    problem: str


def image_digest_problem(key: str, members: dict[str, bytes]) -> str | None:
    """Why a sample's stored JPEG does not match the sha256 in its json member, or None when it does."""
    if "jpg" not in members or "json" not in members:
        return None
    expected = json.loads(members["json"]).get("sha256")
    if expected and hashlib.sha256(members["jpg"]).hexdigest() != expected:
        return f"the image of {key} does not match its stored sha256"
    return None


def table_damage(path: Path) -> str | None:
    """Why a Parquet table does not read in full, or None when it does."""
    try:
        pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        return f"the Parquet file does not read in full ({exc})"
    return None


def shard_damage(files: ShardFiles, *, deep: bool) -> str | None:
    """What is wrong with a finished shard, or None when it is intact."""
    if read_stats(files) is None:
        return "its stats, Parquet and tar disagree or are incomplete"
    problem = table_damage(files.parquet)
    if problem:
        return problem
    rows = pq.read_table(files.parquet, columns=["key", "status"]).to_pylist()
    written = {r["key"] for r in rows if r["status"] == STATUS_OK}
    try:
        stored = set()
        for key, members in iter_shard_samples(files.tar):
            stored.add(key)
            if deep and (problem := image_digest_problem(key, members)):
                return problem
    except (OSError, tarfile.TarError, ValueError) as exc:
        return f"the tar does not read in full ({exc})"
    if written - stored:
        return f"{len(written - stored)} written samples have no members in the tar"
    return None


def verify_shard_folder(folder: Path, *, deep: bool) -> list[Damage]:
    """Every damaged finished shard of a folder of shards (a root's shards, curated or feature shards)."""
    found = []
    for index in shard_indices_in(folder):
        files = shard_files_in(folder, index)
        if problem := shard_damage(files, deep=deep):
            found.append(Damage(files.tar, problem))
    return found


def verify_root(layout: DatasetLayout, *, deep: bool) -> list[Damage]:
    """Every damaged output of a dataset root: shards and every table of the catalog (see ``DatasetLayout.tables``)."""
    found = verify_shard_folder(layout.shards_dir, deep=deep)
    found += [Damage(path, problem) for path in layout.tables() if (problem := table_damage(path))]
    return found


def verify_folder(folder: Path, *, deep: bool) -> list[Damage]:
    """Verify a dataset root, or a folder of shards (curated or feature shards)."""
    if is_dataset_root(folder):
        return verify_root(DatasetLayout(folder.resolve()), deep=deep)
    if folder.is_dir() and shard_indices_in(folder):
        return verify_shard_folder(folder, deep=deep)
    raise MissingInputError(f"{folder} is neither a dataset root nor a folder of finished shards")
