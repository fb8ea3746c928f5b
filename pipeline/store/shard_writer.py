"""Write one output shard atomically: ``NNNNN.tar`` + ``NNNNN.parquet`` + ``NNNNN_stats.json``.

Each file is written under a temporary name and renamed when complete, the stats file last, so a
shard whose stats file exists and agrees with the other two is finished. The stats record the
sha256 of the tar (every member and header) and of the Parquet file, which a deep check compares.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.store.parquet_meta import file_sha256, write_parquet
from pipeline.store.ray_node import ray_node_id
from schemas.atomic import atomic_output, write_atomic
from schemas.layout import ShardFiles
from schemas.tables import SAMPLES_SCHEMA, STATUS_OK, STATUS_SKIPPED

# The stats a writer computes; the others are the caller's ``extra_stats``.
WRITER_STATS = frozenset(
    {
        "count",
        "successes",
        "skipped",
        "skipped_by_reason",
        "status_dict",
        "start_time",
        "end_time",
        "duration",
        "tar_bytes",
        "tar_sha256",
        "parquet_sha256",
        "node_id",
    }
)


def finished_stats(files: ShardFiles, fingerprint: str) -> dict[str, Any] | None:
    """The shard's stats if it is complete, consistent and was made with ``fingerprint``, else None."""
    stats = read_stats(files)
    return stats if stats is not None and stats.get("inputs_fingerprint") == fingerprint else None


def _tar_agrees(tar: Path, stats: dict[str, Any]) -> bool:
    """Whether the tar is the one the stats were written with: its size as recorded (``tar_bytes``),
    or, for shards written before sizes were recorded, as many samples as written."""
    if "tar_bytes" in stats:
        return tar.stat().st_size == stats["tar_bytes"]
    with tarfile.open(tar, mode="r:") as tf:
        return stats.get("successes") == sum(1 for m in tf if m.name.endswith(".json"))


def read_stats(files: ShardFiles) -> dict[str, Any] | None:
    """The shard's stats if it is complete and consistent (row count, tar size), else None."""
    if not all(p.is_file() for p in files.all()):
        return None
    try:
        stats = json.loads(files.stats.read_text())
        rows = pq.ParquetFile(files.parquet).metadata.num_rows
        agrees = stats.get("count") == rows and _tar_agrees(files.tar, stats)
    except (OSError, ValueError, tarfile.TarError, pa.ArrowException):
        return None
    return stats if agrees else None


class _DigestingFile:
    """A binary file being written that computes the sha256 of what is written to it."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self.handle.write(data)


class ShardWriter:
    """Collects a shard's rows and tar samples; a context manager that commits all three files when
    its block succeeds and leaves nothing behind when it raises. It runs inside a stage's jobs, whose
    output folder the runner has cleaned of stale temporary files.

    ``extra_stats`` (the fingerprint and what the shard came from) go into the stats file; after the
    block, ``stats`` holds what was written.
    """

    def __init__(self, files: ShardFiles, extra_stats: dict[str, Any], schema: pa.Schema = SAMPLES_SCHEMA) -> None:
        self.files = files
        self.schema = schema
        self.extra_stats = extra_stats
        self.rows: list[dict[str, Any]] = []
        self.stats: dict[str, Any] = {}
        self._stack = ExitStack()

    def __enter__(self) -> Self:
        self.started = time.time()
        with ExitStack() as stack:
            tar_tmp = stack.enter_context(atomic_output(self.files.tar, clean_stale=False))
            self._tar_file = _DigestingFile(stack.enter_context(tar_tmp.open("wb")))
            self._tar = stack.enter_context(tarfile.open(fileobj=self._tar_file, mode="w|"))
            self._stack = stack.pop_all()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self._stack.__exit__(exc_type, exc, tb)  # closes and deletes the temporary tar
            return
        self._stack.close()  # ends the tar, renames it into place
        self._commit_tables()

    def add_sample(self, key: str, files: dict[str, bytes | str], row: dict[str, Any]) -> None:
        """Store ``KEY.ext`` members (webdataset's layout, extensions sorted) for an ok record and its Parquet row.

        Fixed mtime, mode and owner make the tar bytes reproducible run to run.
        """
        for ext in sorted(files):
            value = files[ext]
            data = value.encode() if isinstance(value, str) else value
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "", ""
            self._tar.addfile(info, io.BytesIO(data))
        self.rows.append({**row, "key": key, "status": STATUS_OK, "reason": None, "error": None})

    def add_skipped(self, key: str, code: str, detail: str, row: dict[str, Any]) -> None:
        """Record a skipped input with its reason (nothing goes into the tar)."""
        self.rows.append({**row, "key": key, "status": STATUS_SKIPPED, "reason": code, "error": detail})

    def _commit_tables(self) -> None:
        """Write the Parquet file, then the stats file (which marks the shard complete)."""
        with atomic_output(self.files.parquet, clean_stale=False) as tmp:
            write_parquet(pa.Table.from_pylist(self.rows, schema=self.schema), tmp)
            parquet_sha256 = file_sha256(tmp)
        skipped = Counter(r["reason"] for r in self.rows if r["status"] == STATUS_SKIPPED)
        ok = len(self.rows) - sum(skipped.values())
        ended = time.time()
        self.stats = {
            "count": len(self.rows),
            "successes": ok,
            "skipped": sum(skipped.values()),
            "skipped_by_reason": dict(sorted(skipped.items())),
            # img2dataset's names, so its tooling reads our stats too.
            "status_dict": {"success": ok, **dict(sorted(skipped.items()))},
            "start_time": self.started,
            "end_time": ended,
            "duration": ended - self.started,
            "tar_bytes": self.files.tar.stat().st_size,
            "tar_sha256": self._tar_file.sha256.hexdigest(),
            "parquet_sha256": parquet_sha256,
            "node_id": ray_node_id(),  # the Ray node that wrote the shard (None outside Ray)
            **self.extra_stats,
        }
        write_atomic(self.files.stats, json.dumps(self.stats, indent=2, sort_keys=True), clean_stale=False)
