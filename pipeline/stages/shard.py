"""The shard stage: sources -> ``ROOT/shards/NNNNN.{tar,parquet}`` + ``NNNNN_stats.json``.

The driver plans one job per input unit (a tar, a folder's own files, rows of a Parquet row group;
see ``pipeline.sources.units``) from the input files alone; each job lists its unit and writes
its shards ``N * PARTS_PER_INPUT + part``, N being the unit's number in ``ROOT/shards/_inputs.json``
(numbers are never reused, so adding an input never renames another's shards). Part 0 is written
last and records the unit's parts: it marks the unit finished. Keys repeated across units are
marked after every unit is done (``pipeline.store.duplicate_keys``).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from pipeline.core.runner import console, run_stage
from pipeline.core.stage import ShardJob, Stage, StageRun, StageSummary, Stats, Tasks, fingerprint, shards_table
from pipeline.sources import FormatChoice, InputUnit, folder_buckets, list_unit, plan_sources
from pipeline.sources.imaging import process_image
from pipeline.sources.reading import SampleReader
from pipeline.sources.records import InputRecord, MemberRef, SkipRecord, clean_text
from pipeline.store.duplicate_keys import Sample, mark_duplicate_keys
from pipeline.store.shard_writer import ShardWriter, finished_stats, read_stats
from pipeline.store.verify import shard_damage
from schemas.atomic import write_atomic
from schemas.errors import OutputConflictError, UserError
from schemas.layout import PARTS_PER_INPUT, DatasetLayout, ShardFiles, shard_files_in, shard_indices_in, shard_stem
from schemas.shard_config import ImageSettings, ShardConfig
from schemas.tables import STATUS_OK


def _file_state(path: Path | None) -> tuple[int, int] | None:
    """Size and mtime of a record's file; None when it has none or it cannot be examined."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _member_state(member: MemberRef | None) -> tuple[int, int] | None:
    return None if member is None else (member.offset, member.size)


def record_contents(rec: InputRecord) -> list[Any]:
    """What a record's bytes are read from, so a file edited in place (same name) changes it: the size
    and mtime of its files, the place and size of its tar members, the values its table row gave."""
    files = [_file_state(path) for path in (rec.path, rec.txt_path, rec.json_path)]
    members = [_member_state(member) for member in (rec.image_member, rec.txt_member, rec.json_member)]
    return [*files, *members, rec.alt_text, rec.meta]


def names_digest(records: Sequence[InputRecord]) -> str:
    """Each record's key, location and listing-time skip: what a shard's fingerprint covered before
    ``inputs_digest`` covered the records' contents too."""
    return "".join(json.dumps([rec.key, rec.location, rec.preset_skip]) for rec in records)


def inputs_digest(records: Sequence[InputRecord]) -> str:
    """What the shard is made from: each record's key, location, listing-time skip and contents."""
    return "".join(
        json.dumps([rec.key, rec.location, rec.preset_skip, record_contents(rec)], default=str) for rec in records
    )


def unit_totals(parts: Sequence[Stats], written: Sequence[int] = ()) -> Stats:
    """A unit's stats: its number of shards and the sums of theirs; ``written``: the parts this run wrote
    (counted in ``written`` and, by their records, ``processed``)."""
    skipped: Counter[str] = Counter()
    for part in parts:
        skipped.update(part["skipped_by_reason"])
    return {
        "parts": len(parts),
        "count": sum(p["count"] for p in parts),
        "successes": sum(p["successes"] for p in parts),
        "skipped_by_reason": dict(sorted(skipped.items())),
        "written": len(written),
        "processed": sum(parts[i]["count"] for i in written),
    }


@dataclass(frozen=True, kw_only=True)
class UnitJob(ShardJob):
    """One input unit: its shards ``index + part``; ``fingerprint`` is the unit's (settings, identity, stamp).

    ``settings`` is the settings half of each shard's own fingerprint (the other half: its records).
    ``legacy_fingerprint`` is a folder's by its own size and mtime, which part 0 records when it was
    written before folders were stamped by their files: such shards stay current while that stamp holds.
    """

    unit: InputUnit
    shard_size: int
    settings: str
    image: ImageSettings
    replace: bool = False
    repair: bool = False
    span: int = PARTS_PER_INPUT
    legacy_fingerprint: str | None = None

    def part_files(self, part: int) -> ShardFiles:
        return shard_files_in(self.out_dir, self.index + part)

    def unit_record(self) -> dict[str, Any] | None:
        """What part 0 (complete) says of the unit, or None."""
        first = read_stats(self.part_files(0))
        return first.get("unit") if first is not None else None

    def finished(self) -> Stats | None:
        first = read_stats(self.part_files(0))
        unit = first.get("unit") if first is not None else None
        if first is None or not unit or unit.get("fingerprint") != self.fingerprint:
            return None
        parts = [first]
        for part, part_fingerprint in enumerate(unit["part_fingerprints"][1:], start=1):
            stats = finished_stats(self.part_files(part), part_fingerprint)
            if stats is None:
                return None
            parts.append(stats)
        return unit_totals(parts)

    def made_from_other_inputs(self) -> bool:
        unit = self.unit_record()
        return unit is not None and not self.inputs_unchanged(unit)

    def inputs_unchanged(self, unit: dict[str, Any] | None) -> bool:
        """Whether part 0's record of the unit (``unit``) says it was made from the unit as it is now."""
        return unit is not None and unit.get("fingerprint") in {self.fingerprint, self.legacy_fingerprint} - {None}

    def damage(self) -> str | None:
        unit = self.unit_record() or {"parts": 1}
        for part in range(unit["parts"]):
            problem = shard_damage(self.part_files(part), deep=True)
            if problem:
                return f"shard {shard_stem(self.index + part)}: {problem}"
        return None

    def shard_indices(self, stats: Stats | None) -> list[int]:
        return [self.index + part for part in range(stats["parts"] if stats else 1)]

    def existing_indices(self) -> list[int]:
        return self.shard_indices(self.unit_record())


def _sample_json(rec: InputRecord, img, meta: dict[str, Any]) -> str:
    return json.dumps(
        {
            "key": rec.key,
            "source": rec.source,
            "original_id": clean_text(rec.original_id),
            "original_width": img.original_width,
            "original_height": img.original_height,
            "width": img.width,
            "height": img.height,
            "sha256": img.sha256,
            "source_meta": meta,
        },
        sort_keys=True,
        default=str,
    )


def _where(rec: InputRecord) -> dict[str, str]:
    return {"source": rec.source, "original_id": clean_text(rec.original_id), "location": clean_text(rec.location)}


def record_outcome(rec: InputRecord, reader: SampleReader, image: ImageSettings) -> Sample | SkipRecord:
    """What a shard holds for one record: its tar members and Parquet row, or why it is skipped."""
    try:
        sample = reader.load(rec)
        img = process_image(sample.image, image)
    except SkipRecord as skip:
        return skip
    except Exception as exc:  # a record must never stop the job; keep the reason
        return SkipRecord("unexpected_error", f"{type(exc).__name__}: {exc}")
    members: dict[str, bytes | str] = {"jpg": img.data, "json": _sample_json(rec, img, sample.meta)}
    if sample.alt_text:
        members["txt"] = sample.alt_text
    row = {
        **_where(rec),
        "alt_text": sample.alt_text,
        "original_width": img.original_width,
        "original_height": img.original_height,
        "width": img.width,
        "height": img.height,
        "jpeg_bytes": len(img.data),
        "sha256": img.sha256,
        "meta_json": json.dumps(sample.meta, sort_keys=True, default=str),
    }
    return members, row


def write_records(records: Sequence[InputRecord], files: ShardFiles, extra: Stats, image: ImageSettings) -> Stats:
    """Process every record of one shard and commit its three files; returns the shard's stats."""
    with ShardWriter(files, extra) as writer, SampleReader() as reader:
        for rec in records:
            outcome = record_outcome(rec, reader, image)
            if isinstance(outcome, SkipRecord):
                writer.add_skipped(rec.key, outcome.code, outcome.detail, _where(rec))
            else:
                writer.add_sample(rec.key, *outcome)
    return writer.stats


def _stale_parts(job: UnitJob, first_unused: int) -> list[ShardFiles]:
    """The unit's shards from ``first_unused`` on that an earlier, larger listing of it left."""
    stale = []
    for part in range(first_unused, job.span):
        files = job.part_files(part)
        if not any(path.exists() for path in files.all()):
            break
        stale.append(files)
    return stale


def _chunks(job: UnitJob, records: list[InputRecord]) -> list[list[InputRecord]]:
    """The unit's records cut into its shards (at least one, maybe empty)."""
    size = job.shard_size
    chunks = [records[start : start + size] for start in range(0, len(records), size)] or [[]]
    if len(chunks) > job.span:
        raise UserError(
            f"{job.unit.path} holds {len(records)} records, more than {job.span} shards of --shard-size {size}: "
            "raise --shard-size or split the input"
        )
    return chunks


def _remove_stale_parts(job: UnitJob, parts: int) -> None:
    """Remove the shards an earlier, larger listing of the unit left past its ``parts`` (only with --replace)."""
    stale = _stale_parts(job, parts)
    if stale and not job.replace and any(read_stats(files) is not None for files in stale):
        raise OutputConflictError(
            f"{job.unit.path} now makes {parts} shards, fewer than an earlier run wrote from it; "
            "pass --replace to remove the others"
        )
    for files in stale:
        for path in files.all():
            path.unlink(missing_ok=True)


def _finished_part(job: UnitJob, files: ShardFiles, fingerprints: tuple[str, str | None]) -> Stats | None:
    """The part's stats when it is finished with its fingerprint, or with its names-only one (``None``: not
    accepted) when it was made before contents were fingerprinted; refuses one made from other records."""
    current, names_only = fingerprints
    done = finished_stats(files, current) or (finished_stats(files, names_only) if names_only else None)
    if done is not None and job.repair and shard_damage(files, deep=True):
        return None
    if done is None and not job.replace and read_stats(files) is not None:
        raise OutputConflictError(
            f"shard {files.tar} was made from other records of {job.unit.path} than it now lists; "
            "check the input, or pass --replace to replace it"
        )
    return done


def _part_fingerprints(settings: str, chunk: Sequence[InputRecord], *, names_only: bool) -> tuple[str, str | None]:
    """A part's fingerprint, and (``names_only``) the one it had before record contents were fingerprinted."""
    legacy = fingerprint(settings, names_digest(chunk)) if names_only else None
    return fingerprint(settings, inputs_digest(chunk)), legacy


def write_unit(job: UnitJob) -> Stats:
    """List the job's unit, write each of its shards not already finished (part 0 last), return the unit's stats.

    A finished shard made from other records is replaced only with ``--replace``. While the unit is
    unchanged, a shard made before record contents were fingerprinted counts as finished.
    """
    chunks = _chunks(job, list_unit(job.unit))
    unchanged = job.inputs_unchanged(job.unit_record())
    fingerprints = [_part_fingerprints(job.settings, chunk, names_only=unchanged) for chunk in chunks]
    _remove_stale_parts(job, len(chunks))
    carried = [current for current, _ in fingerprints]  # what each part's stats say it was made from
    stats: list[Stats] = [{}] * len(chunks)
    written: list[int] = []
    for part in [*range(1, len(chunks)), 0]:
        files = job.part_files(part)
        done = _finished_part(job, files, fingerprints[part])
        if done is not None:
            carried[part] = done["inputs_fingerprint"]
        extra: Stats = {
            "shard": shard_stem(job.index + part),
            "inputs_fingerprint": carried[part],
            "settings": job.image.model_dump(),
        }
        if part == 0:
            extra["unit"] = {
                "input": job.unit.uid,
                "fingerprint": job.fingerprint,
                "parts": len(chunks),
                "part_fingerprints": carried,
            }
        if done is None:
            stats[part] = write_records(chunks[part], files, extra, job.image)
            written.append(part)
        elif part == 0 and done.get("unit") != extra["unit"]:  # its records are unchanged: record the unit anew
            stats[part] = {**done, "unit": extra["unit"]}
            write_atomic(files.stats, json.dumps(stats[part], indent=2, sort_keys=True), clean_stale=False)
        else:
            stats[part] = done
    return unit_totals(stats, written)


@dataclass
class ShardSummary(StageSummary):
    """Totals over every shard of the run (reused ones included)."""

    root: Path
    inputs: int = 0
    written: int = 0
    skipped_by_reason: Counter[str] = field(default_factory=Counter)
    formats: list[FormatChoice] = field(default_factory=list)  # the folders --format auto judged

    @property
    def shards(self) -> int:
        return sum(r.stats["parts"] for r in self.run.results)

    @property
    def shards_reused(self) -> int:
        return sum(r.stats["parts"] - r.stats["written"] for r in self.run.results)

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_reason.values())

    @property
    def images_processed(self) -> int:
        return sum(r.stats["processed"] for r in self.run.results)

    @property
    def images_per_second(self) -> float:
        return self.images_processed / self.seconds if self.seconds > 0 else 0.0

    def render(self) -> Table:
        """Written, skipped by reason, shards, speed."""
        skipped = [(f"  skipped: {reason}", str(n)) for reason, n in sorted(self.skipped_by_reason.items())]
        speed = f"{self.images_processed} images in {self.seconds:.1f} s = {self.images_per_second:.1f} images/s"
        rows = [
            *((f"format of {choice.path}", choice.describe()) for choice in self.formats),
            ("inputs", str(self.inputs)),
            ("written", str(self.written)),
            ("skipped", str(self.skipped)),
            *skipped,
            self.shards_row(),
            ("input units", str(len(self.run.results))),
            ("speed", speed),
        ]
        return shards_table(f"shard stage -> {self.root}/shards", rows)


def _read_numbers(path: Path) -> list[str]:
    """The inputs ``_inputs.json`` numbers (position = number); empty when there is none yet."""
    try:
        return list(json.loads(path.read_text())["inputs"])
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OutputConflictError(
            f"{path} (which numbers the inputs of the shards) is unreadable ({exc}); "
            "restore it, or shard into a new root"
        ) from None


class ShardStage(Stage[UnitJob, ShardSummary]):
    """Plan one job per input unit from the input files; each Ray task lists its unit and writes its shards."""

    label = "shards"
    guards_finished = True
    accepts_replace = True

    def __init__(self, srcs: Sequence[Path], root: Path, config: ShardConfig) -> None:
        self.srcs, self.config = srcs, config
        self.catalog = DatasetLayout(root.resolve())
        self.ray_address = config.ray_address
        self.local_cpus = config.workers
        self.inputs = tuple(srcs)
        self.outputs = (self.catalog.shards_dir,)
        self.replace, self.repair = config.replace, config.repair
        self.numbered: list[str] = []
        self.numbers: list[str] = []
        self.formats: list[FormatChoice] = []
        self.jobs: dict[int, UnitJob] = {}
        self.key_changes: Counter[str] = Counter()

    def _settings(self) -> str:
        """The settings half of each shard's fingerprint."""
        image = self.config.image
        # The read limits count only when changed, so shards made before they existed stay valid.
        limits = self.config.sources.model_dump_json(
            include={"max_file_bytes", "max_sidecar_bytes"}, exclude_defaults=True
        )
        return image.model_dump_json() + (limits if limits != "{}" else "")

    def plan(self) -> list[UnitJob]:
        """One job per input unit, numbered by ``_inputs.json`` (new units take the next numbers)."""
        size = self.config.shard_size
        self.numbered = _read_numbers(self.catalog.inputs_file)
        units, choices = plan_sources(list(self.srcs), self.config.sources, size, folder_buckets(self.numbered))
        self._report_formats(choices)
        number = {uid: n for n, uid in enumerate(self.numbered)}
        settings = self._settings()
        unit_settings = f"{settings}|{self.config.sources.model_dump_json()}|shard_size={size}"
        jobs: list[UnitJob] = []
        planned: set[str] = set()
        for unit in units:
            if unit.uid in planned:  # one file named twice (a folder of tars and one of its tars)
                continue
            planned.add(unit.uid)
            n = number.setdefault(unit.uid, len(number))
            legacy = None if unit.dir_stamp is None else fingerprint(unit_settings, f"{unit.uid}|{unit.dir_stamp}")
            jobs.append(
                UnitJob(
                    index=n * PARTS_PER_INPUT,
                    out_dir=self.catalog.shards_dir,
                    fingerprint=fingerprint(unit_settings, f"{unit.uid}|{unit.stamp}"),
                    unit=unit,
                    shard_size=size,
                    settings=settings,
                    image=self.config.image,
                    replace=self.replace,
                    repair=self.repair,
                    legacy_fingerprint=legacy,
                )
            )
        self.numbers = list(number)
        return jobs

    def _report_formats(self, choices: list[FormatChoice]) -> None:
        """Keep the folders ``--format auto`` judged, for the summary; say at once when one holds both kinds."""
        if self.config.sources.format != "auto":
            return
        self.formats = [choice for choice in choices if choice.path.is_dir()]
        for choice in self.formats:
            if choice.images and choice.tars:
                console.print(
                    f"[yellow]note:[/yellow] {choice.path} holds images and tars: read as {choice.describe()}; "
                    "--format chooses otherwise"
                )

    def commit_plan(self) -> None:
        """Write the numbers of new inputs, unless another run numbered inputs since this plan read them."""
        if self.numbers == self.numbered:
            return
        if _read_numbers(self.catalog.inputs_file) != self.numbered:
            raise OutputConflictError(
                f"another shard run numbered new inputs in {self.catalog.inputs_file} while this one planned; "
                "rerun the same command"
            )
        write_atomic(self.catalog.inputs_file, json.dumps({"inputs": self.numbers}, indent=0))

    def work(self) -> Tasks:
        return Tasks(write_unit, workers=self.config.workers)

    def dependents(self, indices: set[int]) -> list[Path]:
        units = {i // PARTS_PER_INPUT for i in indices}
        shards = {i for i in shard_indices_in(self.catalog.shards_dir) if i // PARTS_PER_INPUT in units}
        return self.catalog.tables_of_shards(shards | indices)

    def finish(self, run: StageRun[UnitJob]) -> None:
        """Mark keys that an earlier shard (in shard order) already holds, and restore those no earlier shard
        holds any more."""
        self.jobs = {result.job.index // PARTS_PER_INPUT: result.job for result in run.results}
        self.key_changes = mark_duplicate_keys(self.catalog.shards_dir, self.restore)

    def restore(self, index: int, rows: dict[int, str]) -> dict[int, Sample | SkipRecord]:
        """The outcome of rows of shard ``index`` (row number: key), read and processed again from its input."""
        job = self.jobs[index // PARTS_PER_INPUT]
        first = (index % PARTS_PER_INPUT) * job.shard_size
        records = list_unit(job.unit)[first : first + job.shard_size]
        if any(row >= len(records) or records[row].key != key for row, key in rows.items()):
            raise OutputConflictError(f"{job.unit.path} changed while it was sharded; rerun the same command")
        with SampleReader() as reader:
            return {row: record_outcome(records[row], reader, job.image) for row in rows}

    def summarize(self, run: StageRun[UnitJob]) -> ShardSummary:
        summary = ShardSummary(run, root=self.catalog.root, formats=self.formats)
        for stats in run.stats:
            summary.inputs += stats["count"]
            summary.written += stats["successes"]
            summary.skipped_by_reason.update(stats["skipped_by_reason"])
        summary.written += self.key_changes[STATUS_OK]
        summary.skipped_by_reason.update({k: n for k, n in self.key_changes.items() if k != STATUS_OK})
        summary.skipped_by_reason = +summary.skipped_by_reason  # reasons no row has any more go
        return summary


def run_shard_stage(srcs: Sequence[Path], root: Path, config: ShardConfig) -> ShardSummary:
    """Plan the sources' units, write every unfinished shard under ``root`` on Ray, and summarise."""
    return run_stage(ShardStage(srcs, root, config))
