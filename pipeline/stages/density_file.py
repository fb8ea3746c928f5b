"""`densecurate density`: the Table-1 row of a caption table on its own (Parquet, CSV or JSONL), streamed.

The column is read in batches of ``batch_rows`` texts (DuckDB's Arrow reader), so the driver never holds
all captions; batches are tagged by ``DensityWorker`` (one per core as Ray actors, or in this process with
one worker) and their noun counts merged here. Memory is flat in the number of captions and grows only
with the number of distinct nouns (the merged counter). ``--sample N`` estimates nouns per caption on N rows.
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
import random
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
from pydantic import BaseModel, Field

from pipeline.core.stage import Actors
from pipeline.density.nouns import NounExtractor, require_spacy_model
from pipeline.density.table1 import Table1Row, table1_from_counts
from schemas.errors import ConfigError, EnvironmentFailure, MissingInputError
from schemas.score_config import NounSettings
from schemas.validation import SETTINGS

READERS = {".parquet": "read_parquet", ".csv": "read_csv_auto", ".tsv": "read_csv_auto", ".jsonl": "read_json_auto"}
READERS[".json"] = READERS[".ndjson"] = "read_json_auto"
GLOB_CHARS = frozenset("*?[")
DEFAULT_BATCH_ROWS = 8192
# Up to this many captions one process tags them sooner than a local Ray starts and spreads them (measured on
# 2 cores: 10^4 short captions in 7.4 s in this process against 18-20 s with Ray's start-up).
IN_PROCESS_ROWS = 30_000
IN_FLIGHT_PER_WORKER = 2  # batches queued on each worker: one tagged, one waiting
TEXT_CACHE_SIZE = 100_000  # distinct texts a worker remembers across batches (repeats are tagged once)
Z95 = 1.96


class DensityOptions(BaseModel):
    """What `densecurate density` runs with."""

    model_config = SETTINGS

    column: str = Field(..., min_length=1, description="the caption column")
    nouns: NounSettings = NounSettings()
    min_count: int = Field(10, ge=0, description="a noun is valid when seen more than this many times")
    workers: int | None = Field(None, ge=1, description="tagging processes (default: every CPU; 1: this process)")
    ray_address: str | None = None
    sample: int | None = Field(None, ge=1, description="estimate on this many rows instead of all")
    seed: int = Field(0, description="which rows --sample draws")
    batch_rows: int = Field(DEFAULT_BATCH_ROWS, ge=1, description="texts per batch read and tagged")


@dataclass(frozen=True)
class CaptionTable:
    """Where a caption column is: a DuckDB table function and the file, glob or folder glob it reads."""

    path: Path
    reader: str
    pattern: str
    column: str

    def sql(self, select: str) -> str:
        return f"SELECT {select} FROM {self.reader}($pattern)"

    def count_rows(self) -> int:
        """Rows of the table (Parquet: from the footers; CSV/JSON: one scan)."""
        with duckdb.connect() as con:
            ((n,),) = con.sql(self.sql("count(*)"), params={"pattern": self.pattern}).fetchall()
        return int(n)

    def batches(self, batch_rows: int) -> Iterator[list[str | None]]:
        """The column as text, in read order (files of a glob in name order), at most ``batch_rows`` at a time."""
        quoted = '"' + self.column.replace('"', '""') + '"'
        with duckdb.connect() as con:
            reader = con.sql(self.sql(f"{quoted}::VARCHAR"), params={"pattern": self.pattern}).to_arrow_reader(
                batch_rows
            )
            for batch in reader:
                yield batch.column(0).to_pylist()


def open_table(path: Path, column: str) -> CaptionTable:
    """The caption table at ``path`` (a file; a glob of files with one suffix; a folder: its ``**/*.parquet``),
    checked to exist and to have ``column``; every failure is one sentence."""
    text = str(path)
    if path.is_dir():
        reader, pattern = READERS[".parquet"], str(path / "**" / "*.parquet")
    else:
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            raise ConfigError(f"cannot read {path}: use a .parquet, .csv, .tsv or .jsonl file, a glob or a folder")
        pattern = text
        if not GLOB_CHARS & set(text) and not path.is_file():
            raise MissingInputError(f"{path} does not exist")
    with duckdb.connect() as con:
        if GLOB_CHARS & set(pattern) and not con.execute("SELECT 1 FROM glob(?) LIMIT 1", [pattern]).fetchall():
            raise MissingInputError(f"no file matches {pattern}")
        names = [d[0] for d in con.sql(f"DESCRIBE SELECT * FROM {reader}($p)", params={"p": pattern}).fetchall()]
    if column not in names:
        raise ConfigError(f"{path} has no column {column!r} (columns: {', '.join(names)})")
    return CaptionTable(path, reader, pattern, column)


def sample_positions(n_rows: int, n_sample: int, seed: int) -> list[int]:
    """The rule of ``--sample``: ``min(n_sample, n_rows)`` row positions (0-based, in read order) drawn without
    replacement by ``random.Random(seed).sample(range(n_rows), k)``, sorted; the same rows on every run."""
    return sorted(random.Random(seed).sample(range(n_rows), min(n_sample, n_rows)))


def sampled_batches(
    batches: Iterable[list[str | None]], positions: list[int], batch_rows: int
) -> Iterator[list[str | None]]:
    """The texts at ``positions`` (sorted) of the row stream, regrouped into batches of at most ``batch_rows``."""
    chosen: list[str | None] = []
    start = 0
    for texts in batches:
        end = start + len(texts)
        lo, hi = bisect.bisect_left(positions, start), bisect.bisect_left(positions, end)
        for p in positions[lo:hi]:
            chosen.append(texts[p - start])
            if len(chosen) == batch_rows:
                yield chosen
                chosen = []
        start = end
    if chosen:
        yield chosen


@dataclass
class BatchCounts:
    """Noun counts of some captions: captions, missing ones, nouns (and their squares per caption), lemmas."""

    captions: int = 0
    missing: int = 0
    total_nouns: int = 0
    sum_squares: int = 0  # sum over captions of (nouns in the caption)^2, for the sample's variance
    nouns: Counter[str] = field(default_factory=Counter)

    def merge(self, other: BatchCounts) -> None:
        self.captions += other.captions
        self.missing += other.missing
        self.total_nouns += other.total_nouns
        self.sum_squares += other.sum_squares
        self.nouns.update(other.nouns)


class DensityWorker:
    """Holds one spaCy pipeline and counts the nouns of a batch of texts (a Ray actor, or in this process).

    Identical texts are tagged once per batch, and once across batches while among the last
    ``TEXT_CACHE_SIZE`` distinct texts tagged; tagging a text does not depend on its batch.
    """

    def __init__(self, nouns: NounSettings, cache_size: int = TEXT_CACHE_SIZE) -> None:
        self.extractor = NounExtractor(nouns)
        self.cache: OrderedDict[str, tuple[str, ...]] = OrderedDict()
        self.cache_size = cache_size

    def count(self, texts: list[str | None], keep_nouns: bool) -> BatchCounts:
        """Counts of the batch; with ``keep_nouns`` also every lemma's count."""
        repeats = Counter(t for t in texts if t and t.strip())
        known = {t: self.cache[t] for t in repeats if t in self.cache}
        new = [t for t in repeats if t not in known]
        known.update(zip(new, (found.nouns for found in self.extractor.extract(new)), strict=True))
        self._remember(new, known)
        counts = BatchCounts(captions=len(texts), missing=len(texts) - repeats.total())
        for text, times in repeats.items():
            nouns = known[text]
            counts.total_nouns += times * len(nouns)
            counts.sum_squares += times * len(nouns) ** 2
            if keep_nouns:
                for noun in nouns:
                    counts.nouns[noun] += times
        return counts

    def _remember(self, new: list[str], known: dict[str, tuple[str, ...]]) -> None:
        """Add the newly tagged texts; forget the oldest beyond ``cache_size``."""
        for text in new[-self.cache_size :]:
            self.cache[text] = known[text]
        for _ in range(len(self.cache) - self.cache_size):
            self.cache.popitem(last=False)


def tag_batches(
    batches: Iterable[list[str | None]],
    options: DensityOptions,
    *,
    keep_nouns: bool,
    max_batches: int | None = None,
) -> BatchCounts:
    """Count the nouns of every batch: in this process with one worker or a single batch (and no cluster), else
    on Ray actors, one per core (at most ``max_batches``), with at most ``IN_FLIGHT_PER_WORKER`` batches queued
    on each."""
    rest = iter(batches)
    head = list(itertools.islice(rest, 2))
    stream = itertools.chain(head, rest)
    one = options.workers == 1 or len(head) < 2
    if one and not (options.ray_address or os.environ.get("RAY_ADDRESS")):
        worker = DensityWorker(options.nouns)
        total = BatchCounts()
        for texts in stream:
            total.merge(worker.count(texts, keep_nouns))
        return total
    require_spacy_model(options.nouns.spacy_model, options.ray_address)
    return _tag_on_ray(stream, options, max_batches, keep_nouns)


def _tag_on_ray(
    batches: Iterable[list[str | None]], options: DensityOptions, max_batches: int | None, keep_nouns: bool
) -> BatchCounts:
    import ray

    from pipeline.core.ray_cluster import init_ray, start_actors
    from pipeline.core.workers import lost_worker, lost_worker_errors, typed_worker_errors

    init_ray(options.ray_address, None if options.ray_address else options.workers)
    pool = Actors(DensityWorker, (options.nouns,), "count", options.workers, one_per_core=True)
    actors, _ = start_actors(pool, count_cap=max_batches or options.workers or 1 << 16)
    free = [actor for actor in actors for _ in range(IN_FLIGHT_PER_WORKER)]
    pending: dict[Any, Any] = {}
    total = BatchCounts()

    def take_one() -> None:
        (ready,), _ = ray.wait(list(pending), num_returns=1)
        free.append(pending.pop(ready))
        try:
            with typed_worker_errors("density"):
                total.merge(ray.get(ready))
        except lost_worker_errors() as exc:
            if getattr(exc, "actor_init_failed", False):
                raise lost_worker("density", None, exc) from exc
            raise EnvironmentFailure(
                f"a density worker died more often than it may restart (killed for memory, crashed, or its node "
                f"was lost: {type(exc).__name__}); rerun with a smaller --batch-rows or fewer --workers"
            ) from exc

    try:
        for texts in batches:
            if not free:
                take_one()
            actor = free.pop()
            pending[actor.call.remote("count", texts, keep_nouns)] = actor
        while pending:
            take_one()
    finally:
        for actor in actors:
            ray.kill(actor)
    return total


def for_size(options: DensityOptions, rows: int) -> DensityOptions:
    """``options`` with one worker (this process) when ``rows`` are few enough that starting Ray would cost more
    than it saves (``IN_PROCESS_ROWS``), unless workers or a cluster were asked for."""
    if (
        options.workers is None
        and not (options.ray_address or os.environ.get("RAY_ADDRESS"))
        and rows <= IN_PROCESS_ROWS
    ):
        return options.model_copy(update={"workers": 1})
    return options


def score_file(path: Path, options: DensityOptions) -> Table1Row:
    """Tag every caption of the column, batch by batch, and return its Table-1 row."""
    table = open_table(path, options.column)
    options = for_size(options, table.count_rows())
    counts = tag_batches(table.batches(options.batch_rows), options, keep_nouns=True)
    return table1_from_counts(
        options.column, counts.captions, counts.nouns, min_count=options.min_count, missing=counts.missing
    )


@dataclass(frozen=True)
class SampleEstimate:
    """Nouns per caption estimated on a random sample of rows, with a 95% normal-approximation interval."""

    field: str
    n_rows: int
    n_sample: int
    seed: int
    total_nouns: int
    sum_squares: int
    missing: int  # missing or blank captions in the sample (they count as zero nouns)

    NOT_REPORTED = (
        "distinct and valid distinct nouns are not estimated from a sample: both grow with the number of "
        "captions counted (and validity is a count over the whole corpus), so run without --sample for them"
    )

    @property
    def nouns_per_caption(self) -> float:
        return self.total_nouns / self.n_sample if self.n_sample else 0.0

    @property
    def ci95(self) -> tuple[float, float] | None:
        """mean ± 1.96·s/√n with the sample's standard deviation s; none below two captions."""
        n = self.n_sample
        if n < 2:
            return None
        variance = max(0, n * self.sum_squares - self.total_nouns**2) / (n * (n - 1))
        half = Z95 * math.sqrt(variance / n)
        return self.nouns_per_caption - half, self.nouns_per_caption + half

    def as_json(self) -> dict[str, object]:
        low, high = self.ci95 or (None, None)
        return {
            "field": self.field,
            "n_rows": self.n_rows,
            "n_sample": self.n_sample,
            "seed": self.seed,
            "nouns_per_caption": self.nouns_per_caption,
            "ci95_low": low,
            "ci95_high": high,
            "missing": self.missing,
            "not_reported": self.NOT_REPORTED,
        }

    def lines(self) -> list[tuple[str, str]]:
        """The estimate as (name, value) lines for a table."""
        ci = self.ci95
        return [
            ("rows", f"{self.n_rows:,}"),
            ("sample", f"{self.n_sample:,} (seed {self.seed})"),
            ("nouns per caption", f"{self.nouns_per_caption:.2f}"),
            ("95% CI (mean ± 1.96·s/√n)", f"{ci[0]:.2f} to {ci[1]:.2f}" if ci else "needs two captions"),
            ("missing captions in the sample", f"{self.missing:,}"),
        ]


def sample_file(path: Path, options: DensityOptions) -> SampleEstimate:
    """Nouns per caption on ``options.sample`` rows (all when unset) chosen by ``sample_positions``."""
    table = open_table(path, options.column)
    n_rows = table.count_rows()
    positions = sample_positions(n_rows, options.sample or n_rows, options.seed)
    batches = sampled_batches(table.batches(options.batch_rows), positions, options.batch_rows)
    max_batches = max(1, -(-len(positions) // options.batch_rows))
    counts = tag_batches(batches, for_size(options, len(positions)), keep_nouns=False, max_batches=max_batches)
    return SampleEstimate(
        field=options.column,
        n_rows=n_rows,
        n_sample=counts.captions,
        seed=options.seed,
        total_nouns=counts.total_nouns,
        sum_squares=counts.sum_squares,
        missing=counts.missing,
    )
