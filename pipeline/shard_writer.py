"""Write one output shard atomically: ``NNNNN.tar`` + ``NNNNN.parquet`` + ``NNNNN_stats.json``.

Each file is written under a temporary name and renamed when complete, the stats file last, so a
shard whose stats file exists and agrees with the other two is finished.
"""

from __future__ import annotations

import json
import os
import tarfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from schemas.layout import ShardFiles
from schemas.tables import SAMPLES_SCHEMA, STATUS_OK, STATUS_SKIPPED

TMP_MARK = ".tmp-"


def temp_path(path: Path) -> Path:
    """The in-progress name of ``path`` (unique per process)."""
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


def remove_stale_temps(*finals: Path) -> None:
    """Delete the in-progress files a killed run left for these outputs."""
    for final in finals:
        for stale in final.parent.glob(f"{final.name}{TMP_MARK}*"):
            stale.unlink(missing_ok=True)


def finished_stats(files: ShardFiles, fingerprint: str) -> dict[str, Any] | None:
    """The shard's stats if it is complete, consistent and was made with ``fingerprint``, else None."""
    stats = read_stats(files)
    return stats if stats is not None and stats.get("inputs_fingerprint") == fingerprint else None


def prune_outputs(directory: Path, keep: set[int]) -> list[Path]:
    """Delete ``NNNNN.tar``/``.parquet``/``_stats.json`` files whose index is not in ``keep``.

    They are left by an earlier plan with more shards (other inputs or --shard-size); kept, they would
    put the same records into the stage's output twice.
    """
    removed: list[Path] = []
    if not keep:  # an empty plan never empties a folder
        return removed
    for path in sorted(directory.glob("[0-9]*")) if directory.is_dir() else []:
        stem = path.name.split(".")[0].removesuffix("_stats")
        if stem.isdigit() and int(stem) not in keep and TMP_MARK not in path.name:
            path.unlink()
            removed.append(path)
    return removed


def read_stats(files: ShardFiles) -> dict[str, Any] | None:
    """The shard's stats if it is complete and consistent, else None."""
    if not all(p.is_file() for p in files.all()):
        return None
    try:
        stats = json.loads(files.stats.read_text())
        rows = pq.ParquetFile(files.parquet).metadata.num_rows
        with tarfile.open(files.tar, mode="r:") as tf:
            stored = sum(1 for m in tf if m.name.endswith(".json"))
    except (OSError, ValueError, tarfile.TarError, pa.ArrowException):
        return None
    if stats.get("count") != rows or stats.get("successes") != stored:
        return None
    return stats


class ShardWriter:
    """Collects a shard's rows and tar samples, then commits all three files."""

    def __init__(self, files: ShardFiles, schema: pa.Schema = SAMPLES_SCHEMA) -> None:
        self.files = files
        self.schema = schema
        self.rows: list[dict[str, Any]] = []
        self.started = time.time()
        files.tar.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(*files.all())
        self._tar_tmp = temp_path(files.tar)
        self._tar_file = self._tar_tmp.open("wb")
        # Fixed mtime and owner make the tar bytes reproducible run to run.
        self._tar = wds.TarWriter(self._tar_file, user="", group="", mtime=0, encoder=False)

    def add_sample(self, key: str, files: dict[str, bytes | str], row: dict[str, Any]) -> None:
        """Store ``KEY.ext`` members for an ok record and its Parquet row."""
        encoded = {ext: v.encode() if isinstance(v, str) else v for ext, v in files.items()}
        self._tar.write({"__key__": key, **encoded})
        self.rows.append({**row, "key": key, "status": STATUS_OK, "reason": None, "error": None})

    def add_skipped(self, key: str, code: str, detail: str, row: dict[str, Any]) -> None:
        """Record a skipped input with its reason (nothing goes into the tar)."""
        self.rows.append({**row, "key": key, "status": STATUS_SKIPPED, "reason": code, "error": detail})

    def commit(self, extra_stats: dict[str, Any]) -> dict[str, Any]:
        """Finish the tar, write Parquet and stats, and rename each into place; returns the stats."""
        self._tar.close()
        self._tar_file.close()
        os.replace(self._tar_tmp, self.files.tar)
        parquet_tmp = temp_path(self.files.parquet)
        pq.write_table(pa.Table.from_pylist(self.rows, schema=self.schema), parquet_tmp)
        os.replace(parquet_tmp, self.files.parquet)
        skipped = Counter(r["reason"] for r in self.rows if r["status"] == STATUS_SKIPPED)
        ok = len(self.rows) - sum(skipped.values())
        ended = time.time()
        stats = {
            "count": len(self.rows),
            "successes": ok,
            "skipped": sum(skipped.values()),
            "skipped_by_reason": dict(sorted(skipped.items())),
            # img2dataset's names, so its tooling reads our stats too.
            "status_dict": {"success": ok, **dict(sorted(skipped.items()))},
            "start_time": self.started,
            "end_time": ended,
            "duration": ended - self.started,
            **extra_stats,
        }
        stats_tmp = temp_path(self.files.stats)
        stats_tmp.write_text(json.dumps(stats, indent=2, sort_keys=True))
        os.replace(stats_tmp, self.files.stats)
        return stats

    def abort(self) -> None:
        """Drop the in-progress files (used when the task itself fails)."""
        self._tar_file.close()
        self._tar_tmp.unlink(missing_ok=True)
