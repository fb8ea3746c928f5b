"""Is a finished output intact? Used by ``densecurate verify``, by every stage's ``--repair``, and by the
stages that read stored samples.

A shard is intact when its stats, Parquet and tar agree, the Parquet reads in full with its stage's
columns, the tar reads to its end, and every written sample has its members in the tar; deep, when
also the tar and the Parquet match the sha256 their stats record (shards written before those were
recorded: every stored image matches its own sha256) and every Parquet page matches its checksum.
A table (captions, density, vocabulary, ...) is intact when it reads in full (deep: every page
checksum verified), its columns are its stage's, and it holds the row count its stage recorded.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.store.parquet_meta import file_sha256
from pipeline.store.shard_reading import iter_shard_samples
from pipeline.store.shard_writer import read_stats
from schemas.errors import MissingInputError, UserError
from schemas.layout import (
    TABLE_GLOBS,
    DatasetLayout,
    ShardFiles,
    is_dataset_root,
    shard_files_in,
    shard_indices_in,
)
from schemas.tables import (
    CALIBRATION_SCHEMA,
    CAPTIONS_SCHEMA,
    CURATED_SCHEMA,
    DENSITY_SCHEMA,
    DUPLICATES_SCHEMA,
    EMBEDDINGS_SCHEMA,
    FEATURES_SCHEMA,
    GROUNDING_SCHEMA,
    PARQUET_META_KEY,
    RUNS_SCHEMA,
    SAMPLES_SCHEMA,
    STATUS_OK,
    VOCAB_SCHEMA,
)

# Each table of a dataset root (``TABLE_GLOBS``) with its stage's schema.
TABLE_SCHEMAS = {
    "samples": SAMPLES_SCHEMA,
    "captions": CAPTIONS_SCHEMA,
    "vocab": VOCAB_SCHEMA,
    "density": DENSITY_SCHEMA,
    "embeddings": EMBEDDINGS_SCHEMA,
    "grounding": GROUNDING_SCHEMA,
    "noun_calibration": CALIBRATION_SCHEMA,
    "duplicates": DUPLICATES_SCHEMA,
    "runs": RUNS_SCHEMA,
}
# The Parquet files of a folder of shards: a root's, curated or feature shards.
SHARD_SCHEMAS = (SAMPLES_SCHEMA, CURATED_SCHEMA, FEATURES_SCHEMA)
# Every schema a stage writes Parquet with: a table known by its path alone must fit one of them.
STAGE_SCHEMAS = (*TABLE_SCHEMAS.values(), CURATED_SCHEMA, FEATURES_SCHEMA)


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
    try:
        expected = json.loads(members["json"]).get("sha256")
    except (ValueError, AttributeError):
        return f"the json of {key} does not parse"
    if expected and hashlib.sha256(members["jpg"]).hexdigest() != expected:
        return f"the image of {key} does not match its stored sha256"
    return None


def repair_hint(tar: Path) -> str:
    """What to run about a damaged shard tar: a deep verify of its folder, then its stage with --repair."""
    folder = tar.parent
    if folder.name == "shards" and is_dataset_root(folder.parent):
        return f"run `densecurate verify {folder.parent} --deep`, then the shard stage again with --repair"
    return f"run `densecurate verify {folder} --deep`, then the stage that wrote it (curate) again with --repair"


def damaged_shard(tar: Path, problem: str) -> DamagedInputError:
    """The one-sentence error for a stage that read a damaged shard tar."""
    return DamagedInputError(f"{tar} is damaged ({problem}): {repair_hint(tar)}")


def checked_samples(tar: Path, wanted: Callable[[str], bool] | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The samples of a finished shard's tar (see ``iter_shard_samples``), each image checked against its
    recorded sha256 before a stage decodes it; a mismatch, or a tar that does not read to its end,
    raises ``damaged_shard``."""
    try:
        for key, members in iter_shard_samples(tar, wanted):
            if problem := image_digest_problem(key, members):
                raise damaged_shard(tar, problem)
            yield key, members
    except (OSError, tarfile.TarError) as exc:
        raise damaged_shard(tar, f"it does not read in full: {exc}") from None


def _schema_problem(found: pa.Schema, schemas: Sequence[pa.Schema]) -> str | None:
    """Why the columns of a table fit none of ``schemas`` (each column must be one of a schema's, of its
    type; older files may lack later columns), or None."""
    misfits = [
        [f.name for f in found if schema.get_field_index(f.name) < 0 or schema.field(f.name).type != f.type]
        for schema in schemas
    ]
    closest = min(misfits, key=len)
    return f"the Parquet file's columns are not its stage's ({', '.join(closest)})" if closest else None


def _count_problem(table: pa.Table) -> str | None:
    """Why the row count its stage recorded in the file metadata (if any) is not the table's, or None."""
    raw = (table.schema.metadata or {}).get(PARQUET_META_KEY)
    if raw is None:
        return None
    try:
        count = json.loads(raw)["stats"]["count"]
    except (ValueError, KeyError, TypeError):
        return "its stage metadata does not parse"
    return f"it holds {table.num_rows} rows, its metadata {count}" if count != table.num_rows else None


def table_damage(path: Path, schemas: Sequence[pa.Schema] = STAGE_SCHEMAS, *, deep: bool = True) -> str | None:
    """Why a Parquet table is damaged, or None: it does not read in full (deep: with every page checksum
    verified), its columns fit none of ``schemas``, or its row count is not the one its stage recorded."""
    try:
        table = pq.read_table(path, page_checksum_verification=deep)
    except (OSError, pa.ArrowException) as exc:
        return f"the Parquet file does not read in full ({exc})"
    return _schema_problem(table.schema, schemas) or _count_problem(table)


def _digest_problem(path: Path, recorded: str | None) -> str | None:
    """Why a file does not match the sha256 its shard's stats record (none recorded: nothing to check)."""
    if recorded and file_sha256(path) != recorded:
        return f"{path.name} does not match the sha256 its stats record"
    return None


def _tar_problem(tar: Path, written: set[str], *, check_images: bool) -> str | None:
    """Why the tar does not read to its end, lacks a written sample's members or (``check_images``) holds
    an image that does not match its sha256, or None."""
    stored = set()
    try:
        for key, members in iter_shard_samples(tar):
            stored.add(key)
            if check_images and (problem := image_digest_problem(key, members)):
                return problem
    except (OSError, tarfile.TarError) as exc:
        return f"the tar does not read in full ({exc})"
    missing = written - stored
    return f"{len(missing)} written samples have no members in the tar" if missing else None


def shard_damage(files: ShardFiles, *, deep: bool) -> str | None:
    """What is wrong with a finished shard, or None when it is intact."""
    stats = read_stats(files)
    if stats is None:
        return "its stats, Parquet and tar disagree or are incomplete"
    if deep and (problem := _digest_problem(files.parquet, stats.get("parquet_sha256"))):
        return problem
    if problem := table_damage(files.parquet, SHARD_SCHEMAS, deep=deep):
        return problem
    rows = pq.read_table(files.parquet, columns=["key", "status"]).to_pylist()
    written = {r["key"] for r in rows if r["status"] == STATUS_OK}
    if stats.get("successes") != len(written):
        return f"its stats count {stats.get('successes')} written samples, its Parquet {len(written)}"
    # The tar's digest covers its images: they are hashed one by one only without it, or to name a damaged one.
    tar_digest = _digest_problem(files.tar, stats.get("tar_sha256")) if deep else None
    check_images = deep and (tar_digest is not None or not stats.get("tar_sha256"))
    return _tar_problem(files.tar, written, check_images=check_images) or tar_digest


def verify_shard_folder(folder: Path, *, deep: bool) -> list[Damage]:
    """Every damaged finished shard of a folder of shards (a root's shards, curated or feature shards)."""
    found = []
    for index in shard_indices_in(folder):
        files = shard_files_in(folder, index)
        if problem := shard_damage(files, deep=deep):
            found.append(Damage(files.tar, problem))
    return found


def _schema_of(layout: DatasetLayout, table: Path) -> pa.Schema:
    """The stage schema of one of the root's tables, by the glob of ``TABLE_GLOBS`` it lies in."""
    relative = table.relative_to(layout.root)
    return next(
        TABLE_SCHEMAS[name]
        for name, glob in TABLE_GLOBS.items()
        if len(relative.parts) == len(PurePath(glob).parts) and relative.match(glob)
    )


def verify_root(layout: DatasetLayout, *, deep: bool) -> list[Damage]:
    """Every damaged output of a dataset root: shards and every table of the catalog (see ``DatasetLayout.tables``),
    each table against its stage's schema."""
    found = verify_shard_folder(layout.shards_dir, deep=deep)
    for path in layout.tables():
        if problem := table_damage(path, (_schema_of(layout, path),), deep=deep):
            found.append(Damage(path, problem))
    return found


def verify_folder(folder: Path, *, deep: bool) -> list[Damage]:
    """Verify a dataset root, or a folder of shards (curated or feature shards)."""
    if is_dataset_root(folder):
        return verify_root(DatasetLayout(folder.resolve()), deep=deep)
    if folder.is_dir() and shard_indices_in(folder):
        return verify_shard_folder(folder, deep=deep)
    raise MissingInputError(f"{folder} is neither a dataset root nor a folder of finished shards")
