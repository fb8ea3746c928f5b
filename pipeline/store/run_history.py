"""What was run on a dataset root, and when: one small Parquet file per stage run in ``ROOT/history/``.

The catalog's ``runs`` view reads them; ``stats`` shows the latest. A file per run (written atomically)
needs no lock and survives a crash of a later run.
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import pyarrow as pa

from pipeline.store.parquet_meta import write_parquet
from schemas.atomic import atomic_output
from schemas.layout import DatasetLayout
from schemas.tables import RUNS_SCHEMA

# Stage labels that are not their command's name.
_COMMAND_OF_LABEL = {"shards": "shard"}


def command_of(label: str) -> str:
    """The command that runs the stage labelled ``label`` (``shards`` -> ``shard``)."""
    return _COMMAND_OF_LABEL.get(label, label)


@dataclass(frozen=True)
class RunRecord:
    """One stage run over a root: what ran, with which settings, how long and on what."""

    command: str
    name: str | None
    settings_fingerprint: str | None
    started_at: datetime
    ended_at: datetime
    shards: int
    shards_reused: int
    records: int
    written: int
    workers: int
    device: str | None
    worker_seconds: float
    gpu_seconds: float
    host: str = socket.gethostname()


def history_file(layout: DatasetLayout, record: RunRecord) -> Path:
    """``history/STARTED-COMMAND-PID.parquet``: sorted by start time, unique per process."""
    stamp = record.started_at.strftime("%Y%m%dT%H%M%S%fZ")
    return layout.history_dir / f"{stamp}-{record.command}-{os.getpid()}.parquet"


def record_run(layout: DatasetLayout, record: RunRecord) -> Path:
    """Write ``record`` as one row of a new file in the root's history; returns its path."""
    path = history_file(layout, record)
    table = pa.Table.from_pylist([asdict(record)], schema=RUNS_SCHEMA)
    with atomic_output(path) as tmp:
        write_parquet(table, tmp)
    return path
