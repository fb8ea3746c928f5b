"""Progress inside a shard: a worker reports items as it finishes them; the runner shows a rate and an ETA.

The runner makes one ``ProgressCounter`` actor per run and runs each job inside ``reporting(counter, seq)``;
the stage's code calls ``report_items(n)`` where it finishes items (a caption, an image). Reports are sent
at most every ``SEND_EVERY_S`` seconds per worker and once more when the job ends, without waiting.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

SEND_EVERY_S = 0.5

_counter: Any = None  # the run's ProgressCounter actor handle, inside a job
_seq: int | None = None  # which job of the run this process works on
_unsent = 0
_last_sent = 0.0


class ProgressCounter:
    """A Ray actor: the items each job of a run reported since the runner last took them."""

    def __init__(self) -> None:
        self._done: dict[int, int] = {}

    def add(self, seq: int, items: int) -> None:
        self._done[seq] = self._done.get(seq, 0) + items

    def take(self) -> dict[int, int]:
        """The items reported per job since the last call."""
        done, self._done = self._done, {}
        return done


def _send() -> None:
    global _unsent, _last_sent
    if _counter is not None and _seq is not None and _unsent:
        _counter.add.remote(_seq, _unsent)
    _unsent, _last_sent = 0, time.monotonic()


def report_items(items: int = 1) -> None:
    """Count ``items`` finished by the job this process runs; outside a run (or without a counter) nothing."""
    global _unsent
    if _counter is None:
        return
    _unsent += items
    if time.monotonic() - _last_sent >= SEND_EVERY_S:
        _send()


@contextmanager
def reporting(counter: Any, seq: int) -> Iterator[None]:
    """Within the block, ``report_items`` counts for job ``seq`` of the run whose counter is ``counter``."""
    global _counter, _seq, _unsent, _last_sent
    _counter, _seq, _unsent, _last_sent = counter, seq, 0, time.monotonic()
    try:
        yield
    finally:
        _send()
        _counter, _seq = None, None


def run_task(fn: Any, job: Any, counter: Any, seq: int) -> Any:
    """A Ray task's body: ``fn(job)``, reporting for job ``seq``."""
    with reporting(counter, seq):
        return fn(job)
