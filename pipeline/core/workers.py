"""The workers on Ray actors: the set-up every model-holding worker shares, the host that starts a worker
and keeps a failed start typed, and the errors the driver raises for a worker that failed.

A worker class (``Actors.cls``) is never a Ray actor itself: ``start_actors`` starts ``WorkerHost``
actors, each of which builds one worker and runs its methods (``call``). A constructor that raises
leaves the actor alive with a ``WorkerStartError``, which each call raises: Ray hands the driver the
exception object a call raised (``RayTaskError.cause``), but only the text of one a constructor raised.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from pipeline.core.progress import reporting
from schemas.errors import EnvironmentFailure, UserError

if TYPE_CHECKING:
    from pipeline.core.stage import ShardJob

ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ModelWorker:
    """The base of the workers that hold a torch model (caption, embed, ground, features).

    ``cpu_threads`` is the share of the cores that ``start_actors`` gives each of the CPU actors that
    split them (None on a GPU, or for an actor of one core): torch's threads are capped to it.
    """

    def __init__(self, cpu_threads: int | None = None) -> None:
        if cpu_threads:
            import torch

            torch.set_num_threads(cpu_threads)
        self.cpu_threads = cpu_threads


class WorkerStartError(Exception):
    """A worker's constructor raised: the ``UserError`` or ``EnvironmentFailure`` it raised (``error``), or
    else its last traceback line (``reason``: ``Class: message``)."""

    def __init__(self, reason: str, error: UserError | EnvironmentFailure | None = None) -> None:
        super().__init__(reason, error)
        self.reason = reason
        self.error = error

    def __str__(self) -> str:
        return self.reason

    @classmethod
    def of(cls, exc: Exception) -> WorkerStartError:
        """The envelope of what a constructor raised."""
        error = exc if isinstance(exc, UserError | EnvironmentFailure) else None
        return cls(traceback.format_exception_only(exc)[-1].strip(), error)


class WorkerHost:
    """A Ray actor that builds ``cls(*args, **kwargs)`` and runs its methods; when the constructor raised,
    every call raises a ``WorkerStartError`` chained to what it raised (its traceback shows where)."""

    def __init__(self, cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._start_error: Exception | None = None
        try:
            self._worker = cls(*args, **kwargs)
        except Exception as exc:
            self._start_error = exc

    def call(self, method: str, *args: Any) -> Any:
        """``worker.<method>(*args)``."""
        if self._start_error is not None:
            raise WorkerStartError.of(self._start_error) from self._start_error
        return getattr(self._worker, method)(*args)

    def call_reporting(self, counter: Any, seq: int, method: str, *args: Any) -> Any:
        """``worker.<method>(*args)``, its ``report_items`` counted for job ``seq`` of the run's counter."""
        with reporting(counter, seq):
            return self.call(method, *args)


def host_class(cls: type) -> type[WorkerHost]:
    """``WorkerHost`` under the worker's class name, which Ray shows in its log lines and actor lists."""
    return type(cls.__name__, (WorkerHost,), {})


def could_not_start(label: str, reason: str) -> EnvironmentFailure:
    return EnvironmentFailure(
        f"the {label} workers could not start ({reason}); check the model and device options "
        "(`densecurate --debug ...` shows the workers' traceback)"
    )


@contextmanager
def typed_worker_errors(label: str) -> Iterator[None]:
    """Around ``ray.get``: a ``UserError`` or ``EnvironmentFailure`` that a Ray task or worker raised is
    raised as the original object, a worker that could not start as one sentence; anything else (a bug)
    passes as Ray raised it, with the remote traceback."""
    from ray.exceptions import RayTaskError

    try:
        yield
    except RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, WorkerStartError):
            raise (cause.error or could_not_start(label, cause.reason)) from exc
        if isinstance(cause, UserError | EnvironmentFailure):
            raise cause from exc
        raise


def lost_worker_errors() -> tuple[type[BaseException], ...]:
    """Ray's errors for a worker (actor or task process) that died, or a node that was lost."""
    from ray import exceptions

    names = ("RayActorError", "WorkerCrashedError", "OutOfMemoryError", "NodeDiedError")
    return tuple(getattr(exceptions, name) for name in names if hasattr(exceptions, name))


def lost_worker(label: str, job: ShardJob | None, exc: BaseException) -> EnvironmentFailure:
    """The one-sentence error for a worker Ray lost: one whose actor could not start (its class or arguments
    did not load where it runs: Ray gives only the text, whose last line is shown), or one that died more
    often than it may restart (``max_restarts``/``max_task_retries``)."""
    if getattr(exc, "actor_init_failed", False):
        lines = [ln.strip() for ln in ANSI.sub("", str(exc)).splitlines() if ln.strip()]
        return could_not_start(label, lines[-1] if lines else type(exc).__name__)
    where = f"running shard {job.index} of {job.out_dir}" if job is not None else "during its setup"
    return EnvironmentFailure(
        f"a {label} worker died more often than it may restart {where} (killed for memory, crashed, or its "
        f"node was lost: {type(exc).__name__}); rerun the same command to go on (finished shards are kept)"
    )
