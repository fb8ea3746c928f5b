"""Input sources: plan units from the input files, then list and read each unit inside a shard task."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.sources.detect import FormatChoice
from pipeline.sources.errors import SourceError
from pipeline.sources.records import InputRecord
from pipeline.sources.units import InputUnit, folder_buckets, list_unit, plan_sources, plan_units
from schemas.shard_config import SourceSettings

__all__ = [
    "FormatChoice",
    "InputUnit",
    "SourceError",
    "folder_buckets",
    "list_inputs",
    "list_unit",
    "plan_sources",
    "plan_units",
]


def list_inputs(srcs: Sequence[Path], settings: SourceSettings, shard_size: int = 1000) -> list[InputRecord]:
    """Every record of every source listed in this process, unit after unit.

    What the shard stage's workers list between them; for inspecting a small source, and the
    in-driver baseline of ``bench/scale_bench.py``.
    """
    return [rec for unit in plan_units(list(srcs), settings, shard_size) for rec in list_unit(unit)]
