"""Guards the runner applies to every stage, so that a mistyped command never destroys data.

- **Paths**: an output folder may not equal, contain or sit inside an input folder, nor lie in a
  reserved folder of another dataset root, nor hold another stage's output or a training run (each
  folder's ``_plan.json`` names the stage that wrote it).
- **Lock**: one run at a time per output folder; a second run refuses, naming the holder. The lock
  is an OS file lock, so the lock of a dead process is free again (and taken over).
- **Plans**: each output folder records the shard indices its last plan made (``_plan.json``), so a
  later stage can tell complete upstream folders from partial ones.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from filelock import FileLock, Timeout

from pipeline.store.run_history import command_of
from schemas.atomic import is_temp, make_folder, write_atomic
from schemas.errors import MissingInputError, OutputConflictError
from schemas.layout import (
    CHECKPOINTS_DIR,
    PLAN_FILE,
    RESERVED_NAMES,
    TRAIN_CONFIG_FILE,
    is_dataset_root,
    shard_indices_in,
)

LOCK_FILE = ".densecurate.lock"
HOLDER_FILE = ".densecurate.lock.json"


def _relation(output: Path, source: Path) -> str | None:
    if output == source:
        return "is"
    if source.is_relative_to(output):
        return "contains"
    if output.is_relative_to(source):
        return "is inside"
    return None


def _require_folder_path(output: Path) -> None:
    """Refuse an output folder that is, or lies under, an existing file (a folder cannot be made there)."""
    for path in (output, *output.parents):
        if path.exists():
            if not path.is_dir():
                raise OutputConflictError(
                    f"{path} is a file, not a folder: the output {output} cannot be written there; choose a "
                    "folder (it is made when missing)"
                )
            return


def _resolved(path: Path) -> Path:
    """``path`` with its links resolved; a symbolic-link loop is one sentence."""
    try:
        return path.resolve()
    except RuntimeError as exc:  # Python 3.11 reports a link loop so
        raise MissingInputError(f"{path} is a symbolic link loop ({exc}): name the folder or file it means") from exc


def _reserved_folder_holding(output: Path) -> Path | None:
    """The reserved folder of a dataset root (``ROOT/captions``, ``ROOT/density``, ...) that is or holds ``output``."""
    for folder in (output, *output.parents):
        if folder.name in RESERVED_NAMES and is_dataset_root(folder.parent):
            return folder
    return None


def _refuse_other_owner(output: Path, stage: str) -> None:
    """Refuse a folder that another stage's run wrote (its recorded plan names that stage) or a training run."""
    try:
        owner = json.loads((output / PLAN_FILE).read_text())["stage"]
    except (OSError, ValueError, KeyError, TypeError):
        owner = None
    if owner is not None and owner != stage:
        raise OutputConflictError(
            f"{output} holds the output of `densecurate {command_of(owner)}`; this "
            f"{command_of(stage)} run would write over it: choose "
            "another output folder"
        )
    if (output / TRAIN_CONFIG_FILE).is_file() and (output / CHECKPOINTS_DIR).is_dir():
        raise OutputConflictError(f"{output} is a training run's folder; choose another output folder")


def check_paths(inputs: Iterable[Path], outputs: Iterable[Path], *, stage: str, root: Path | None = None) -> None:
    """Refuse outputs that overlap an input, that another stage wrote, or that lie in a dataset root's reserved
    folders other than those of ``root`` (the stage's own dataset root; None for a folder the user chose, which
    may not be a dataset root either)."""
    resolved_inputs = [_resolved(Path(p)) for p in inputs]
    for output in (_resolved(Path(p)) for p in outputs):
        _require_folder_path(output)
        for source in resolved_inputs:
            relation = _relation(output, source)
            if relation:
                raise OutputConflictError(
                    f"the output folder {output} {relation} the input {source}: writing there would destroy "
                    "the input; choose an output folder outside the inputs"
                )
        reserved = _reserved_folder_holding(output)
        if reserved is not None and reserved.parent != root:
            raise OutputConflictError(
                f"{output} is in the {reserved.name}/ folder of the dataset root {reserved.parent}, which a stage of "
                "that root owns; choose another output folder"
            )
        if root is None and is_dataset_root(output):
            raise OutputConflictError(f"{output} is a dataset root; write this stage's output to a folder of its own")
        _refuse_other_owner(output, stage)
    if root is not None:
        _refuse_other_owner(root, stage)  # a dataset root made inside curated shards or a training run


class OutputLock:
    """An exclusive lock on an output folder for one stage run; refuses when another run holds it."""

    def __init__(self, folder: Path, stage: str) -> None:
        self.folder = folder
        self.stage = stage
        self._lock = FileLock(folder / LOCK_FILE)

    def __enter__(self) -> Self:
        make_folder(self.folder)
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise OutputConflictError(
                f"{self.folder} is being written by another run ({self._holder()}); wait for it to finish, "
                "or stop it first"
            ) from None
        holder = {"stage": self.stage, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        write_atomic(self.folder / HOLDER_FILE, json.dumps(holder))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        (self.folder / HOLDER_FILE).unlink(missing_ok=True)
        self._lock.release()

    def _holder(self) -> str:
        try:
            info: dict[str, Any] = json.loads((self.folder / HOLDER_FILE).read_text())
        except (OSError, ValueError):
            return "holder unknown"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
        return f"densecurate {info.get('stage')} on host {info.get('host')}, pid {info.get('pid')}, since {since}"


def index_of(path: Path) -> int:
    """The shard index of an output file (``00042.tar``, ``00042_stats.json`` -> 42)."""
    return int(path.name.split(".")[0].removesuffix("_stats"))


def outputs_outside(folder: Path, keep: set[int], span: int = 1) -> list[Path]:
    """The finished output files in ``folder`` whose shard's owner (index // ``span``) is not in ``keep``
    (in-progress ones excluded)."""
    if not folder.is_dir():
        return []
    return [
        path
        for path in sorted(folder.glob("[0-9]*"))
        if not is_temp(path)
        and path.name.split(".")[0].removesuffix("_stats").isdigit()
        and index_of(path) // span not in keep
    ]


@dataclass(frozen=True)
class UpstreamShards:
    """How complete a folder of shards is: the indices its last plan made, and those finished."""

    folder: Path
    planned: tuple[int, ...]
    finished: tuple[int, ...]

    @property
    def missing(self) -> list[int]:
        done = set(self.finished)
        return [i for i in self.planned if i not in done]


def write_plan(folder: Path, stage: str, indices: Sequence[int]) -> None:
    """Record the shard indices a stage's plan will make in ``folder`` (left untouched when unchanged)."""
    text = json.dumps({"stage": stage, "shards": sorted(indices)})
    target = folder / PLAN_FILE
    if not (target.is_file() and target.read_text() == text):
        write_atomic(target, text)


def read_upstream(folder: Path) -> UpstreamShards:
    """The planned and finished shards of ``folder`` (planned = finished when no plan was recorded)."""
    finished = tuple(shard_indices_in(folder))
    try:
        planned = tuple(json.loads((folder / PLAN_FILE).read_text())["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        planned = finished
    return UpstreamShards(folder, planned, finished)


def require_complete(folder: Path) -> UpstreamShards:
    """The shards of ``folder``; refuses when some that its last plan made are not finished."""
    upstream = read_upstream(folder)
    if upstream.missing:
        raise MissingInputError(
            f"{len(upstream.missing)} of the {len(upstream.planned)} shards in {folder} are not finished (the run "
            "that writes them failed or is still running): finish that stage first"
        )
    return upstream
