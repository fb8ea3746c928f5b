"""The one runner of every per-shard stage (the protocol is in ``pipeline.core.stage``).

``run_stage`` checks the stage's paths, plans, locks its output folders, guards the finished
outputs of earlier runs (never replaced or removed without ``--replace``), starts Ray, runs each
unfinished (or, with ``--repair``, damaged) job as a Ray task or on a model-holding actor (always
killed at the end), shows progress, refreshes the dataset's DuckDB catalog and returns the stage's
summary.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

from pipeline.core.progress import ProgressCounter, run_task
from pipeline.core.progress_bars import POLL_S, PROGRESS_COLUMNS, ProgressBars, progress_console
from pipeline.core.ray_cluster import cluster_cpus, init_ray, start_actors
from pipeline.core.run_record import run_record
from pipeline.core.stage import Actors, JobResult, JobT, ShardJob, Stage, StageRun, Stats, SummaryT, Tasks
from pipeline.core.workers import lost_worker, lost_worker_errors, typed_worker_errors
from pipeline.store.catalog import refresh_catalog
from pipeline.store.guards import OutputLock, check_paths, index_of, outputs_outside, write_plan
from pipeline.store.run_history import record_run
from schemas.atomic import remove_stale_temps_in
from schemas.errors import OutputConflictError

console = Console(stderr=True)


class _TaskLauncher:
    """Runs each job as a Ray task of ``fn``; at most ``capacity`` at once."""

    def __init__(self, work: Tasks) -> None:
        import ray

        self.capacity = work.workers or cluster_cpus()
        self._fn = work.fn
        self._remote = ray.remote(num_cpus=1)(run_task)

    def launch(self, job: ShardJob, counter: Any, seq: int) -> Any:
        return self._remote.remote(self._fn, job, counter, seq)

    def release(self, ref: Any) -> None:
        """Tasks hold nothing between jobs."""


class _ActorLauncher:
    """Runs each job on an idle actor of a pool (its worker's ``<method>(job)``): one job per actor at a time."""

    def __init__(self, actors: Sequence[Any], method: str) -> None:
        self.capacity = len(actors)
        self._idle = list(actors)
        self._busy: dict[Any, Any] = {}
        self._method = method

    def launch(self, job: ShardJob, counter: Any, seq: int) -> Any:
        actor = self._idle.pop()
        ref = actor.call_reporting.remote(counter, seq, self._method, job)
        self._busy[ref] = actor
        return ref

    def release(self, ref: Any) -> None:
        self._idle.append(self._busy.pop(ref))


def _owners(jobs: Sequence[ShardJob]) -> dict[Path, set[int]]:
    """Per output folder, the owners (``index // span``) of the shards the plan may write."""
    owners: dict[Path, set[int]] = {}
    for job in jobs:
        owners.setdefault(job.out_dir, set()).add(job.index // job.span)
    return owners


def _write_plans(label: str, jobs: Sequence[ShardJob], stats: Sequence[Stats | None]) -> None:
    """Record per output folder the shards the jobs make (those known: given their stats)."""
    indices: dict[Path, list[int]] = {}
    for job, done in zip(jobs, stats, strict=True):
        indices.setdefault(job.out_dir, []).extend(job.shard_indices(done))
    for folder, planned in indices.items():
        write_plan(folder, label, sorted(planned))


def _guard_earlier_outputs(stage: Stage[JobT, SummaryT], jobs: Sequence[JobT], finished: list[Stats | None]) -> None:
    """Refuse (or, with --replace, carry out) a plan that replaces or removes finished outputs
    (``finished``: each job's ``finished()``, read once by the caller).

    Stages without --replace never remove anything: outputs outside their plan are reported, for
    ``densecurate prune``.
    """
    planned = _owners(jobs)
    span = jobs[0].span if jobs else 1
    outside = [path for folder, keep in planned.items() for path in outputs_outside(folder, keep, span)]
    folders = ", ".join(map(str, planned))
    if not stage.accepts_replace:
        if outside:
            console.print(
                f"[yellow]note:[/yellow] {len(outside)} files in {folders} belong to no shard of this plan "
                "(an earlier, larger run); `densecurate prune ROOT` lists and removes them"
            )
        return
    replaced = [
        index
        for job, done in zip(jobs, finished, strict=True)
        if stage.guards_finished and done is None and job.made_from_other_inputs()
        for index in job.existing_indices()
    ]
    removed = {index_of(path) for path in outside}
    if (removed or replaced) and not stage.replace:
        dependents = stage.dependents(removed | set(replaced))
        also = f", and {len(dependents)} files of later stages were made from them" if dependents else ""
        raise OutputConflictError(
            f"this run would replace {len(replaced)} and remove {len(removed)} finished shards in {folders} "
            f"that an earlier run made from other inputs or settings{also}; check the inputs and options, "
            "or pass --replace to replace them"
        )
    for path in outside:
        path.unlink()


def _todo(
    stage: Stage[JobT, SummaryT], jobs: Sequence[JobT], finished: list[Stats | None], run: StageRun[JobT]
) -> list[JobT]:
    """The jobs to run; finished ones go into ``run`` as reused (unless --repair finds them damaged)."""
    todo: list[JobT] = []
    for job, done in zip(jobs, finished, strict=True):
        problem = job.damage() if done is not None and stage.repair else None
        if problem:
            console.print(f"[yellow]repair:[/yellow] shard {job.index} in {job.out_dir}: {problem}")
        if done is None or problem:
            todo.append(job)
        else:
            run.results.append(JobResult(job, done, reused=True))
    return todo


def run_stage(stage: Stage[JobT, SummaryT]) -> SummaryT:
    """Run every unfinished job of the stage's plan and return its summary."""
    check_paths(stage.inputs, stage.outputs, stage=stage.label, root=stage.catalog.root if stage.catalog else None)
    stage.check()
    jobs = stage.plan()
    started = datetime.now(UTC)
    with ExitStack() as locks:
        for folder in stage.outputs:
            locks.enter_context(OutputLock(folder, stage.label))
            remove_stale_temps_in(folder)  # what killed runs left; jobs' writes need not look again
        finished = [job.finished() for job in jobs]  # each output is read once, under the lock
        _guard_earlier_outputs(stage, jobs, finished)
        stage.commit_plan()
        _write_plans(stage.label, jobs, finished)
        run = _run(stage, jobs, finished)
        _write_plans(stage.label, [r.job for r in run.results], run.stats)
        stage.finish(run)
        if stage.catalog is not None:
            record_run(stage.catalog, run_record(stage, run, stage.catalog, started))
            refresh_catalog(stage.catalog)
    return stage.summarize(run)


def _run(stage: Stage[JobT, SummaryT], jobs: Sequence[JobT], finished: list[Stats | None]) -> StageRun[JobT]:
    """Start Ray and the workers, run the jobs to do, and always stop the actors. With nothing to do, no
    Ray is started: a rerun of a finished stage answers in the time its plan takes."""
    run: StageRun[JobT] = StageRun()
    todo = _todo(stage, jobs, finished, run)
    work = stage.work()
    if not _needs_workers(work, todo):
        run.results.sort(key=lambda result: (str(result.job.out_dir), result.job.index))
        return run
    init_ray(stage.ray_address, None if stage.ray_address else stage.local_cpus)
    import ray  # after init_ray, which sets what Ray reads when it is imported

    actors: list[Any] = []
    try:
        if isinstance(work, Tasks):
            launcher: _TaskLauncher | _ActorLauncher = _TaskLauncher(work)
            run.workers = launcher.capacity
        else:
            actors, run.device = _start_pool(work, todo, stage.label)
            launcher = _ActorLauncher(actors, work.method)
            run.workers = len(actors)
        _run_jobs(stage, todo, launcher, run, total=len(jobs))
    finally:
        for actor in actors:
            ray.kill(actor)
    run.results.sort(key=lambda result: (str(result.job.out_dir), result.job.index))
    return run


def _needs_workers(work: Tasks | Actors, todo: Sequence[ShardJob]) -> bool:
    """Whether a job is left to run, or a pool's set-up has an output still to make."""
    if todo:
        return True
    return isinstance(work, Actors) and work.setup_output is not None and not work.setup_output.exists()


def _start_pool(pool: Actors, todo: Sequence[ShardJob], label: str = "stage") -> tuple[list[Any], str]:
    """The pool's actors, started only when there is work (or a missing setup output), set up once."""
    import ray

    if not todo and (pool.setup_output is None or pool.setup_output.exists()):
        return [], "cpu"
    actors, device = start_actors(pool, count_cap=max(1, len(todo)))
    progress_console.print(f"{label}: {len(actors)} {device} workers starting, each loads its model first")
    if pool.setup:
        try:
            with typed_worker_errors(label):
                ray.get(actors[0].call.remote(pool.setup, *pool.setup_args))
        except BaseException as exc:
            for actor in actors:
                ray.kill(actor)
            if isinstance(exc, lost_worker_errors()):
                raise lost_worker(label, None, exc) from exc
            raise
    return actors, device


def _progress_counter() -> Any:
    """The run's progress counter, on this driver's node: a worker node lost mid-run must not take it along."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(ProgressCounter).options(scheduling_strategy=here).remote()


def _run_jobs(
    stage: Stage[JobT, SummaryT],
    todo: list[JobT],
    launcher: _TaskLauncher | _ActorLauncher,
    run: StageRun[JobT],
    *,
    total: int,
) -> None:
    """Launch the jobs, at most ``launcher.capacity`` at once. Rich progress bars count shards and, for a stage
    with an item label, the items its workers report inside each shard, with a rate and an ETA; when the
    output is not a terminal (a job's log), a plain progress line every ``progress_every_s()`` seconds."""
    import ray

    started = time.perf_counter()
    with Progress(*PROGRESS_COLUMNS, console=progress_console, transient=False) as progress:
        bars = ProgressBars(progress, stage.label, stage.item_label, total, len(run.results), todo)
        counter = _progress_counter() if stage.item_label else None
        queue = list(reversed(todo))
        pending: dict[Any, tuple[JobT, int]] = {}
        while queue or pending:
            while queue and len(pending) < launcher.capacity:
                job = queue.pop()
                pending[launcher.launch(job, counter, len(queue))] = (job, len(queue))
                bars.launched(len(queue), job.items)
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            if counter is not None:
                try:
                    bars.items_reported(ray.get(counter.take.remote(), timeout=POLL_S * 10))
                except (ray.exceptions.RayError, TimeoutError):  # progress is best effort: shards still count
                    counter = None
            bars.log_if_due()
            if not ready:
                continue
            job, seq = pending.pop(ready[0])
            launcher.release(ready[0])
            try:
                with typed_worker_errors(stage.label):
                    stats: Stats = ray.get(ready[0])
            except lost_worker_errors() as exc:
                raise lost_worker(stage.label, job, exc) from exc
            run.results.append(JobResult(job, stats, reused=False))
            run.items_processed += job.items
            bars.job_done(seq, job.items)
        bars.log_if_due(force=True)
    run.seconds = time.perf_counter() - started
