"""The history record of one stage run (see ``pipeline.store.run_history``)."""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline.core.stage import Stage, StageRun
from pipeline.store.run_history import RunRecord, command_of
from schemas.layout import DatasetLayout


def _shown(folder: Path, root: Path) -> str:
    """A folder relative to the root when it lies inside it, else its full path."""
    try:
        return str(folder.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(folder)


def _settings_fingerprint(stage: Stage[Any, Any]) -> str | None:
    config = getattr(stage, "config", None)
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest() if config is not None else None


def _written(stats: dict[str, Any]) -> int:
    """Of a table's rows, those that hold a result: written samples, captions that are ok, texts scored."""
    for key in ("successes", "ok"):
        if key in stats:
            return int(stats[key])
    return int(stats.get("count", 0)) - int(stats.get("missing", 0))


def run_record(stage: Stage[Any, Any], run: StageRun[Any], layout: DatasetLayout, started: datetime) -> RunRecord:
    """What ``run`` of ``stage`` did over the root of ``layout``, started at ``started`` and ended now."""
    made = [r.stats for r in run.results if not r.reused]
    workers = run.workers
    gpus = getattr(getattr(stage, "config", None), "gpus_per_worker", 0) or 0
    on_gpu = run.device.startswith("cuda")
    return RunRecord(
        command=command_of(stage.label),
        name=", ".join(_shown(folder, layout.root) for folder in stage.outputs) or None,
        settings_fingerprint=_settings_fingerprint(stage),
        started_at=started,
        ended_at=datetime.now(started.tzinfo),
        shards=len(run.results),
        shards_reused=run.reused,
        records=sum(int(s.get("count", 0)) for s in made),
        written=sum(_written(s) for s in made),
        workers=workers,
        device=run.device,
        worker_seconds=run.seconds * workers,
        gpu_seconds=run.seconds * workers * gpus if on_gpu else 0.0,
    )
