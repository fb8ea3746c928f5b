"""The runner's progress display: a bar of shards and one of items (with rate and ETA), and plain lines
every few seconds when the output is not a terminal (a job's log is a file)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from datetime import timedelta

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from pipeline.core.stage import ShardJob

POLL_S = 0.5  # how often the runner takes the workers' reports while it waits for a shard
PROGRESS_EVERY_ENV = "DENSECURATE_PROGRESS_EVERY_S"
DEFAULT_PROGRESS_EVERY_S = 10.0

progress_console = Console()


def progress_every_s() -> float:
    """Seconds between plain progress lines when the output is not a terminal (``DENSECURATE_PROGRESS_EVERY_S``)."""
    try:
        return max(0.0, float(os.environ.get(PROGRESS_EVERY_ENV, DEFAULT_PROGRESS_EVERY_S)))
    except ValueError:
        return DEFAULT_PROGRESS_EVERY_S


class RateColumn(ProgressColumn):
    """``12.3 captions/s``: the bar's rate in its own unit."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {task.fields.get('unit', '')}/s" if speed else "", style="progress.data.speed")


PROGRESS_COLUMNS = (
    TextColumn("{task.description}"),
    BarColumn(),
    MofNCompleteColumn(),
    RateColumn(),
    TimeElapsedColumn(),
    TextColumn("ETA"),
    TimeRemainingColumn(),
)


def _eta(seconds: float | None) -> str:
    return "-" if seconds is None else str(timedelta(seconds=round(seconds)))


class ProgressBars:
    """The shard bar and, with an item label, the item bar that the workers' reports move inside a shard."""

    def __init__(
        self,
        progress: Progress,
        label: str,
        item_label: str | None,
        total: int,
        reused: int,
        todo: Sequence[ShardJob],
    ) -> None:
        self.progress, self.label, self.item_label = progress, label, item_label
        self.shards = progress.add_task(label, total=total, completed=reused, unit="shards")
        self.items = (
            progress.add_task(item_label, total=sum(j.items for j in todo), unit=item_label) if item_label else None
        )
        self._shown: dict[int, int] = {}  # per job (its run sequence number), the items its reports moved
        self._items: dict[int, int] = {}  # per job launched, its items
        self._every = progress_every_s()
        self._last_line = time.monotonic()

    def launched(self, seq: int, items: int) -> None:
        self._items[seq] = items

    def items_reported(self, reports: dict[int, int]) -> None:
        """Advance the item bar by what the workers reported (never past a job's own count: a retried job
        reports again)."""
        if self.items is None:
            return
        for seq, items in reports.items():
            shown = self._shown.get(seq, 0)
            step = max(0, min(items, self._items.get(seq, 0) - shown))
            self._shown[seq] = shown + step
            self.progress.advance(self.items, step)

    def job_done(self, seq: int, items: int) -> None:
        """A job finished: the shard bar moves, the item bar gets the job's items its reports did not show."""
        self.progress.advance(self.shards)
        if self.items is not None:
            self._items.pop(seq, None)
            self.progress.advance(self.items, items - self._shown.pop(seq, 0))

    def log_if_due(self, *, force: bool = False) -> None:
        """When the output is not a terminal, a plain line of the figures every ``progress_every_s()``."""
        console = self.progress.console
        if console.is_terminal or not (force or time.monotonic() - self._last_line >= self._every):
            return
        self._last_line = time.monotonic()
        shards = self.progress.tasks[self.shards]
        parts = [f"{self.label}: {shards.completed:,.0f}/{shards.total:,.0f} shards"]
        if self.items is not None:
            items = self.progress.tasks[self.items]
            speed = items.finished_speed or items.speed
            parts.append(f"{items.completed:,.0f}/{items.total:,.0f} {self.item_label}")
            parts.append(f"{speed:,.1f} {self.item_label}/s" if speed else f"0 {self.item_label}/s")
            parts.append(f"ETA {_eta(items.time_remaining)}")
        console.print(", ".join(parts), soft_wrap=True)
