"""The stage protocol: what every per-shard stage declares; ``pipeline.core.runner.run_stage`` does the rest.

A stage is three things (see docs/ARCHITECTURE.md):

- **plan**: one job per output shard, each with the fingerprint its finished output must carry
  (``fingerprint(settings, upstream)``), so a rerun knows which shards are done;
- **per-shard work**: a pure function run as a Ray task (``Tasks``), or a method of a model-holding
  Ray actor (``Actors``: one per GPU, or CPU actors without GPUs);
- **summary**: a ``StageSummary`` made from the run's results that renders itself (``render()``),
  for the CLI and job specs alike.

The runner owns everything else: path checks, locks, the guards on earlier outputs, Ray, actors
(always killed), progress, the catalog.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from rich.console import RenderableType
from rich.table import Table

from pipeline.store.parquet_meta import finished_output, read_meta
from pipeline.store.shard_writer import finished_stats, read_stats
from pipeline.store.verify import shard_damage, table_damage
from schemas.layout import DatasetLayout, ShardFiles, shard_files_in, shard_stem

Stats = dict[str, Any]


def fingerprint(settings: str, upstream: str) -> str:
    """The fingerprint of an output: its stage's settings and the fingerprint of what it was made from."""
    return hashlib.sha256((settings + upstream).encode()).hexdigest()


def file_digest(path: Path) -> str:
    """The sha256 of a whole-output input file (e.g. a vocabulary), for a fingerprint."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class ShardJob:
    """One unit of work: output shard ``index`` in ``out_dir``, reusable when it carries ``fingerprint``.

    ``items`` counts the records the job processes (for the progress bar; 0 when not counted).
    A job may own the ``span`` shards from ``index`` on (every job of a stage has the same span).
    """

    index: int
    out_dir: Path
    fingerprint: str
    items: int = 0
    span: int = 1

    def shard_indices(self, stats: Stats | None) -> list[int]:
        """The shards the job makes, given its stats (None: not finished, so the ones known in advance)."""
        return [self.index]

    def existing_indices(self) -> list[int]:
        """The shards of the job that an earlier run finished (what replacing its output replaces)."""
        return [self.index]

    def finished(self) -> Stats | None:
        """The stats of the job's output if it is complete and carries the job's fingerprint, else None."""
        raise NotImplementedError

    def made_from_other_inputs(self) -> bool:
        """Whether a complete output exists that was made from other inputs or settings."""
        raise NotImplementedError

    def damage(self) -> str | None:
        """What is wrong with the job's finished output (deep check), or None when it is intact."""
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class ShardFilesJob(ShardJob):
    """A job whose output is a webdataset shard: ``NNNNN.tar`` + ``.parquet`` + ``_stats.json``."""

    @property
    def files(self) -> ShardFiles:
        return shard_files_in(self.out_dir, self.index)

    def finished(self) -> Stats | None:
        return finished_stats(self.files, self.fingerprint)

    def made_from_other_inputs(self) -> bool:
        stats = read_stats(self.files)
        return stats is not None and stats.get("inputs_fingerprint") != self.fingerprint

    def damage(self) -> str | None:
        return shard_damage(self.files, deep=True)


@dataclass(frozen=True, kw_only=True)
class TableJob(ShardJob):
    """A job whose output is one Parquet table ``NNNNN.parquet`` with its fingerprint and stats inside.

    ``expected_rows``, when set, must match the table's row count for it to count as finished.
    """

    expected_rows: int | None = None

    @property
    def out(self) -> Path:
        return self.out_dir / f"{shard_stem(self.index)}.parquet"

    def finished(self) -> Stats | None:
        return finished_output(self.out, self.fingerprint, self.expected_rows)

    def made_from_other_inputs(self) -> bool:
        meta = read_meta(self.out)
        return meta is not None and meta.get("fingerprint") != self.fingerprint

    def damage(self) -> str | None:
        return table_damage(self.out)


JobT = TypeVar("JobT", bound=ShardJob)


@dataclass(frozen=True)
class Tasks:
    """Per-shard work as a pure function ``fn(job) -> stats``, one Ray task per shard (CPU stages).

    At most ``workers`` run at once (default: one per CPU of the cluster).
    """

    fn: Callable[[Any], Stats]
    workers: int | None = None


@dataclass(frozen=True)
class Actors:
    """Per-shard work as ``cls(*args, cpu_threads=...).<method>(job) -> stats`` on Ray actors (each hosts one
    such worker: ``pipeline.core.workers.WorkerHost``).

    With GPUs in the cluster (and ``gpus_per_worker`` > 0, ``device`` not ``cpu``) each actor takes
    ``gpus_per_worker`` GPUs; otherwise actors share the CPUs: ``one_per_core`` actors of one core
    each, or (the default) ``workers`` actors (default one) that split the cores between them.
    ``setup`` is a method called once on the first actor before any shard, with ``setup_args``;
    ``setup_output`` is what it writes (actors start for it alone when that file is missing).
    ``runtime_env`` is Ray's, for actors that run in another environment (e.g. vLLM's interpreter).
    """

    cls: type
    args: tuple[Any, ...]
    method: str
    workers: int | None = None
    gpus_per_worker: float = 0.0
    device: str = "auto"
    one_per_core: bool = False
    setup: str | None = None
    setup_args: tuple[Any, ...] = ()
    setup_output: Path | None = None
    runtime_env: dict[str, Any] | None = None


@dataclass(frozen=True)
class JobResult(Generic[JobT]):
    """A job with its output's stats; ``reused`` when an earlier run had already made it."""

    job: JobT
    stats: Stats
    reused: bool


@dataclass
class StageRun(Generic[JobT]):
    """What the runner did: every planned job with its stats, and how fast."""

    results: list[JobResult[JobT]] = field(default_factory=list)
    items_processed: int = 0
    seconds: float = 0.0
    workers: int = 0
    device: str = "cpu"

    @property
    def stats(self) -> list[Stats]:
        return [r.stats for r in self.results]

    @property
    def reused(self) -> int:
        return sum(r.reused for r in self.results)


@dataclass
class StageSummary:
    """The base of every stage's summary: the run it describes, and ``render()`` for the CLI and job specs."""

    run: StageRun[Any] = field(repr=False)

    @property
    def shards(self) -> int:
        return len(self.run.results)

    @property
    def shards_reused(self) -> int:
        return self.run.reused

    @property
    def seconds(self) -> float:
        return self.run.seconds

    def shards_row(self) -> tuple[str, str]:
        return ("shards", f"{self.shards} ({self.shards_reused} already done)")

    def render(self) -> RenderableType:
        """The summary as a rich table (or text)."""
        raise NotImplementedError


SummaryT = TypeVar("SummaryT", bound=StageSummary)


class Stage(ABC, Generic[JobT, SummaryT]):
    """One per-shard stage: set the attributes (in ``__init__`` for per-run ones) and implement
    ``plan``, ``work`` and ``summarize``."""

    label: ClassVar[str]  # progress bar and summary title
    item_label: ClassVar[str | None] = None  # what ``ShardJob.items`` counts, None: not shown
    ray_address: str | None = None  # a cluster, or None for a local Ray
    local_cpus: int | None = None  # CPUs of a local Ray (None: every CPU)
    catalog: DatasetLayout | None = None  # the dataset root whose catalog the run refreshes
    inputs: tuple[Path, ...] = ()  # folders (or files) the stage reads
    outputs: tuple[Path, ...] = ()  # folders the stage writes; each is locked during the run
    replace: bool = False  # --replace: the plan may replace or remove finished outputs of an earlier run
    repair: bool = False  # --repair: finished outputs are checked in depth and redone when damaged
    # Stages whose outputs feed GPU-costly later stages refuse to replace finished outputs without --replace.
    guards_finished: ClassVar[bool] = False
    # Stages that take --replace refuse to remove outputs without it; the others report them for `prune`.
    accepts_replace: ClassVar[bool] = False

    @abstractmethod
    def plan(self) -> list[JobT]:
        """One job per output shard; raises a ``UserError`` when there is nothing to work on."""

    @abstractmethod
    def work(self) -> Tasks | Actors:
        """How each job is run."""

    @abstractmethod
    def summarize(self, run: StageRun[JobT]) -> SummaryT:
        """The stage's summary from the run's results."""

    def check(self) -> None:
        """Checks of the settings, before planning and before any worker starts (e.g. that a model exists)."""

    def commit_plan(self) -> None:
        """Record what the plan assigned, for later runs (under the output lock, before any job runs)."""

    def finish(self, run: StageRun[JobT]) -> None:
        """Work on the whole stage's output after every shard is done (e.g. a vocabulary)."""

    def dependents(self, indices: set[int]) -> list[Path]:
        """Later stages' files made from this stage's shards ``indices`` (named when a plan would replace them)."""
        return []


def shards_table(title: str, rows: list[tuple[str, str]]) -> Table:
    """A two-column summary table, the shape most stage summaries take."""
    table = Table(title=title, show_header=False)
    for name, value in rows:
        table.add_row(name, value)
    return table
