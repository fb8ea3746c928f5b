"""The per-shard stage runner: one Ray task per unfinished shard, finished shards skipped."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

JobT = TypeVar("JobT")
Stats = dict[str, Any]

# Read by Ray when it is imported: with it off, a local Ray takes 127.0.0.1 as its node address and
# every Ray service listens on loopback only (Ray's default is the machine's external address).
RAY_LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` or ``RAY_ADDRESS`` (a cluster; set inside Ray jobs), or start a local Ray
    bound to 127.0.0.1; no-op if connected."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        os.environ.setdefault(RAY_LOOPBACK_SWITCH, "0")
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)


def cluster_cpus() -> int:
    """CPUs of the connected Ray cluster (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def start_model_actors(
    actor_cls: type, args: tuple, *, count_cap: int, workers: int | None, gpus_per_worker: float, device: str
) -> tuple[list[Any], str]:
    """Start model-holding actors: one per ``gpus_per_worker`` GPUs, or CPU actors sharing the cores.

    ``args`` go to the actor's constructor followed by its torch CPU thread count (None on GPUs).
    Actors restart when they die and retry the call they were running. Returns them and the device kind.
    """
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus and gpus_per_worker > 0 and device != "cpu":
        count = workers or max(1, int(gpus // gpus_per_worker))
        resources: dict[str, float] = {"num_gpus": gpus_per_worker, "num_cpus": 1}
        threads, kind = None, "cuda"
    else:
        count = workers or 1
        threads = max(1, cluster_cpus() // count)
        resources, kind = {"num_cpus": threads}, "cpu"
    remote_cls = ray.remote(max_restarts=2, max_task_retries=2)(actor_cls)
    actors = [remote_cls.options(**resources).remote(*args, threads) for _ in range(max(1, min(count, count_cap)))]
    return actors, kind


@dataclass
class StageRun:
    """What a stage run did: stats of every shard, and which shards this run produced."""

    stats: list[Stats] = field(default_factory=list)
    produced: int = 0
    reused: int = 0
    items_processed: int = 0
    seconds: float = 0.0


class TaskLauncher:
    """Runs each job as a Ray task of ``fn``; at most ``capacity`` at once."""

    def __init__(self, fn: Callable[[Any], Stats], *, capacity: int, num_cpus: float = 1.0) -> None:
        import ray

        self.capacity = capacity
        self._remote = ray.remote(num_cpus=num_cpus)(fn)

    def launch(self, job: Any) -> Any:
        return self._remote.remote(job)

    def release(self, ref: Any) -> None:
        """Tasks hold nothing between jobs."""


class ActorLauncher:
    """Runs each job on an idle actor of a pool (``actor.<method>(job)``): one job per actor at a time."""

    def __init__(self, actors: Sequence[Any], method: str) -> None:
        self.capacity = len(actors)
        self._idle = list(actors)
        self._busy: dict[Any, Any] = {}
        self._method = method

    def launch(self, job: Any) -> Any:
        actor = self._idle.pop()
        ref = getattr(actor, self._method).remote(job)
        self._busy[ref] = actor
        return ref

    def release(self, ref: Any) -> None:
        self._idle.append(self._busy.pop(ref))


def run_shard_jobs(
    jobs: Sequence[JobT],
    launcher: TaskLauncher | ActorLauncher,
    *,
    finished: Callable[[JobT], Stats | None],
    items_in: Callable[[JobT], int],
    label: str = "shards",
    item_label: str | None = "images",
) -> StageRun:
    """Launch every job that ``finished`` does not vouch for; a rich progress bar counts shards and items."""
    import ray

    run: StageRun = StageRun()
    todo = []
    for job in jobs:
        done = finished(job)
        if done is None:
            todo.append(job)
        else:
            run.stats.append(done)
            run.reused += 1
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    started = time.perf_counter()
    with Progress(*columns, transient=False) as progress:
        shard_bar = progress.add_task(label, total=len(jobs), completed=run.reused)
        item_bar = progress.add_task(item_label, total=sum(items_in(j) for j in todo)) if item_label else None
        queue = list(reversed(todo))
        pending: dict[Any, JobT] = {}
        while queue or pending:
            while queue and len(pending) < launcher.capacity:
                job = queue.pop()
                pending[launcher.launch(job)] = job
            ready, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready[0])
            launcher.release(ready[0])
            run.stats.append(ray.get(ready[0]))
            run.produced += 1
            run.items_processed += items_in(job)
            progress.advance(shard_bar)
            if item_bar is not None:
                progress.advance(item_bar, items_in(job))
    run.seconds = time.perf_counter() - started
    return run
