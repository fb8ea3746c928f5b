"""One run per ``run_dir``: a new run never mixes with an old run's checkpoints, a resume never silently
changes the config the checkpoints were trained with.

``prepare_run_dir`` runs once before training (in the driver, before any Ray Train worker starts):

- a run_dir that is a dataset root or a folder of shards another stage wrote is refused, and run_dir is
  made (one sentence when it cannot be);
- without ``resume``, a run_dir that holds a checkpoint is refused, unless ``overwrite`` first deletes
  what the old run wrote there (``RUN_OUTPUTS``; other files in run_dir are left alone);
- with ``resume``, the config is compared with the run's saved ``config.yaml``; a change in anything but
  ``steps``, the logging settings and the speed settings (``RESUMABLE_FIELDS``) is refused unless
  ``allow_config_change``.
  Every change that goes ahead is appended to ``config_changes.jsonl`` (step, time, field, old, new) and
  the saved config is replaced, so ``export`` sees the config the last steps were trained with.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from schemas.atomic import make_folder, write_atomic
from schemas.errors import ConfigError, OutputConflictError
from schemas.layout import CHECKPOINTS_DIR, PLAN_FILE, TRAIN_CONFIG_FILE, is_dataset_root
from schemas.train_config import TrainConfig
from schemas.validation import load_yaml
from trainer.checkpoint import latest_checkpoint

CHANGES_FILE = "config_changes.jsonl"

# Everything a run writes to run_dir (checkpoints first: an interrupted --overwrite leaves no checkpoint).
RUN_OUTPUTS = (CHECKPOINTS_DIR, "samples", "tensorboard", "workers", "ray_train", CHANGES_FILE, TRAIN_CONFIG_FILE)

# Fields a resume may change freely: the length of the run, and settings that only decide what is
# logged, saved or sampled (and how many loader processes read the data, which never changes a batch),
# and how many non-finite steps may be skipped (which changes nothing while the steps are finite).
RESUMABLE_FIELDS = frozenset(
    {
        "steps",
        "nan_tolerance",
        "log_every",
        "checkpoint_every",
        "sample_every",
        "sample_prompts",
        "sample_steps",
        "data.num_workers",
        "compile",  # how fast the same model trains, not what it learns
        "tf32",
        "optim.fused",
        "model.gradient_checkpointing",
    }
)
# The run is the folder; how its path is spelled (relative or absolute) is no change.
IGNORED_FIELDS = frozenset({"run_dir"})


def save_config(run_dir: Path, config: TrainConfig) -> None:
    """Write the run's ``config.yaml`` (the one ``export`` uses) atomically."""
    make_folder(run_dir)
    write_atomic(run_dir / TRAIN_CONFIG_FILE, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def prepare_run_dir(
    config: TrainConfig, *, resume: bool, overwrite: bool = False, allow_config_change: bool = False
) -> None:
    """Refuse a run_dir of another stage's output (``require_run_folder``, which makes it) or to mix runs in it
    (``OutputConflictError``), or clear it / record the change."""
    run_dir = Path(config.run_dir)
    if resume and overwrite:
        raise ConfigError("--resume continues the run in run_dir and --overwrite deletes it: pass only one of them")
    require_run_folder(run_dir)
    if overwrite:
        remove_run(run_dir)
        return
    newest = latest_checkpoint(run_dir)
    if newest is None:
        return  # no checkpoint, nothing to mix with
    step = _step_of(newest)
    if not resume:
        raise OutputConflictError(
            f"run_dir {run_dir} already holds a run with checkpoints up to step {step}: pass --resume to "
            "continue it or --overwrite to delete its checkpoints, samples and logs and start over"
        )
    saved = _saved_config(run_dir)
    if saved is None:
        save_config(run_dir, config)
        return
    changes = config_changes(saved, config.model_dump(mode="json"))
    blocking = [c for c in changes if c[0] not in RESUMABLE_FIELDS]
    if blocking and not allow_config_change:
        listed = ", ".join(f"{name} ({_short(old)} -> {_short(new)})" for name, old, new in blocking)
        raise OutputConflictError(
            f"the config differs from the one run_dir {run_dir} was trained with up to step {step} in {listed}: "
            "pass --allow-config-change to resume with the change (recorded in "
            f"{CHANGES_FILE}) or train without --resume and with --overwrite to start over"
        )
    if changes:
        record_changes(run_dir, step, changes)
        save_config(run_dir, config)


def require_run_folder(run_dir: Path) -> None:
    """Refuse a run_dir that is a dataset root or a folder of shards a stage wrote (``OutputConflictError``),
    then make it (``OutputPathError`` when it cannot be made)."""
    if is_dataset_root(run_dir):
        raise OutputConflictError(
            f"run_dir {run_dir} is a dataset root; choose a folder of the training run's own (e.g. runs/NAME)"
        )
    stage = _stage_of(run_dir)
    if stage is not None:
        raise OutputConflictError(
            f"run_dir {run_dir} holds the output of the {stage} stage (its {PLAN_FILE} says so); choose a folder of "
            "the training run's own (e.g. runs/NAME)"
        )
    make_folder(run_dir)


def _stage_of(folder: Path) -> str | None:
    """The stage whose shards ``folder`` holds, as its recorded plan names it (None: no plan)."""
    try:
        stage = json.loads((folder / PLAN_FILE).read_text())["stage"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return str(stage)


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted field, old, new)`` for every field that differs (``IGNORED_FIELDS`` aside), sorted."""
    old, new = _flatten(saved), _flatten(current)
    names = sorted((old.keys() | new.keys()) - IGNORED_FIELDS)
    return [(n, old.get(n), new.get(n)) for n in names if old.get(n) != new.get(n)]


def record_changes(run_dir: Path, step: int, changes: list[tuple[str, Any, Any]]) -> None:
    """Append one JSON line per changed field to ``run_dir/config_changes.jsonl``."""
    when = datetime.now(UTC).isoformat(timespec="seconds")
    lines = "".join(
        json.dumps({"step": step, "time": when, "field": name, "old": old, "new": new}) + "\n"
        for name, old, new in changes
    )
    with open(run_dir / CHANGES_FILE, "a", encoding="utf-8") as handle:
        handle.write(lines)


def remove_run(run_dir: Path) -> None:
    """Delete what a run wrote to ``run_dir`` (``RUN_OUTPUTS``): each is renamed away first, then removed."""
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if not path.exists() and not path.is_symlink():
            continue
        gone = path.with_name(f"{name}.tmp-overwritten-{os.getpid()}")
        os.replace(path, gone)
        if gone.is_dir() and not gone.is_symlink():
            shutil.rmtree(gone)
        else:
            gone.unlink()


def _saved_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's saved config with defaults filled in (as written when its schema no longer validates)."""
    path = run_dir / TRAIN_CONFIG_FILE
    if not path.is_file():
        return None
    data = load_yaml(path.read_text(), str(path)) or {}
    try:
        return TrainConfig.model_validate(data).model_dump(mode="json")
    except ValidationError:
        return data


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def _step_of(checkpoint: Path) -> int:
    """From the folder name ``step-NNNNNNNN`` (its state.json may be damaged: the resume then skips it)."""
    return int(checkpoint.name[5:])


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
