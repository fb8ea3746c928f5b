"""The caption stage: ``ROOT/shards/NNNNN.tar`` -> ``ROOT/captions/NAME/NNNNN.parquet``.

One Ray actor per GPU (or one CPU actor) holds the model and takes whole shards. Each output is
written under a temporary name and renamed; a rerun skips finished shards; a worker that dies
mid-shard is restarted by Ray and its shard redone, so every key appears exactly once.

With ``sample`` only a reproducible sample of each shard's keys is captioned (``pipeline.key_sample``);
with ``keys_query`` only the keys a read-only query over the catalog chooses (``pipeline.store.key_selection``),
recorded with the fingerprints of the tables it read. Every file records the fingerprint its rows were made
with (``rows_fingerprint``: model, generation and shard, not the keys chosen), so a later run of the same
settings, of any keys, keeps those rows and captions only the keys it lacks.

Every row records its provenance: model id and revision, a local folder's weights digest, the prompt
template's hash, the generation settings, the engine and its version, the device and the GPU-seconds.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError
from rich.table import Table

from captioner.prompts import Prompt
from captioner.provenance import engine_version, prompt_sha256, weights_sha256
from pipeline.core.progress import report_items
from pipeline.core.runner import run_stage
from pipeline.core.stage import Actors, Stage, StageRun, StageSummary, Stats, TableJob, fingerprint, shards_table
from pipeline.core.workers import ModelWorker
from pipeline.key_sample import describe_sample, sample_keys
from pipeline.store.guards import require_complete
from pipeline.store.key_selection import KeySelection, changed_views, select_keys
from pipeline.store.parquet_meta import finished_output, read_meta, write_table_atomic
from pipeline.store.shard_reading import read_shard_stats
from pipeline.store.verify import checked_samples
from schemas.caption_config import CaptionConfig
from schemas.errors import ConfigError, MissingInputError, OutputConflictError
from schemas.layout import DatasetLayout
from schemas.tables import CAPTIONS_SCHEMA, STATUS_OK


@dataclass(frozen=True, kw_only=True)
class CaptionJob(TableJob):
    """One shard to caption: its tar (and Parquet, for a sample's keys); the captions go to
    ``captions/NAME/NNNNN.parquet``. ``rows_fingerprint`` is the full run's fingerprint: rows of a file
    that carries it are reused."""

    tar: Path
    samples_table: Path
    rows_fingerprint: str
    sample: float | None = None
    sample_seed: int = 0
    shard_rows: int = 0
    chosen_keys: tuple[str, ...] | None = None  # the keys query's keys of this shard; None without a query
    selection: dict[str, Any] | None = None  # what the file records of the keys query
    provenance: dict[str, str | None] = field(default_factory=dict)  # model_sha256 and prompt_sha256 of every row

    def finished(self) -> Stats | None:
        """Some keys of a shard are also captioned when a full run of the same settings captioned the whole
        shard."""
        done = super().finished()
        if done is None and (self.sample is not None or self.chosen_keys is not None):
            done = finished_output(self.out, self.rows_fingerprint, self.shard_rows)
        return done

    def wanted_keys(self) -> set[str] | None:
        """The keys this job captions: the query's, a sample (of the query's keys, with both), or None for every
        key of the shard."""
        if self.sample is None:
            return None if self.chosen_keys is None else set(self.chosen_keys)
        if self.chosen_keys is not None:
            return sample_keys(self.chosen_keys, self.sample, self.sample_seed)
        rows = pq.read_table(self.samples_table, columns=["key", "status"]).to_pylist()
        return sample_keys([r["key"] for r in rows if r["status"] == STATUS_OK], self.sample, self.sample_seed)

    def reusable_rows(self) -> list[dict[str, Any]]:
        """The rows of an earlier output made with the same model, generation settings and shard (none when
        that output does not read in full: it is redone)."""
        meta = read_meta(self.out)
        if meta is None or rows_fingerprint_of(meta) != self.rows_fingerprint:
            return []
        try:
            table = pq.read_table(self.out)
        except (OSError, pa.ArrowException):
            return []
        return [{name: row.get(name) for name in CAPTIONS_SCHEMA.names} for row in table.to_pylist()]


def _row(result, config: CaptionConfig, engine, device: str, gpus: float, provenance: dict[str, Any]) -> dict[str, Any]:
    gen = config.generation
    checks = result.checks
    return {
        **provenance,
        "key": result.key,
        "captioner": config.name,
        "status": result.status,
        "error": result.error,
        "caption": checks.text if checks else None,
        "raw_caption": result.raw_caption,
        "num_tokens": result.num_tokens,
        "finish_reason": result.finish_reason,
        "truncated": checks.truncated if checks else None,
        "cut_text": checks.cut_text if checks else None,
        "repetition": checks.repetition if checks else None,
        "repetitive": checks.repetitive if checks else None,
        "empty": checks.empty if checks else None,
        "seconds": result.seconds,
        "model": engine.model_id,
        "revision": engine.revision,
        "prompt_id": result.prompt_id,
        "prompt": result.prompt,
        "temperature": gen.temperature,
        "top_p": gen.top_p,
        "seed": gen.seed,
        "max_new_tokens": gen.max_new_tokens,
        "engine": config.engine,
        "device": device,
        "gpus": gpus,
        "gpu_seconds": result.seconds * gpus,
        "source": None,
    }


def caption_stats(rows: list[dict[str, Any]], seconds: float, reused: int = 0) -> dict[str, Any]:
    """Counts a curator looks at first, for the summary and the file metadata (``reused``: rows kept
    from an earlier run)."""
    ok = [r for r in rows if r["status"] == "ok"]
    errors = Counter((r["error"] or "").split(":")[0] for r in rows if r["status"] != "ok")
    return {
        "count": len(rows),
        "ok": len(ok),
        "errors_by_reason": dict(sorted(errors.items())),
        "truncated": sum(bool(r["truncated"]) for r in ok),
        "repetitive": sum(bool(r["repetitive"]) for r in ok),
        "empty": sum(bool(r["empty"]) for r in ok),
        "tokens": sum(r["num_tokens"] for r in ok),
        "seconds": seconds,
        "reused": reused,
    }


class CaptionWorker(ModelWorker):
    """Holds one model replica; captions whole shards (a Ray actor in the stage, a plain object in tests)."""

    def __init__(self, config: CaptionConfig, cpu_threads: int | None = None) -> None:
        import torch

        from captioner.engine import make_engine
        from captioner.loading import resolve_device

        super().__init__(cpu_threads)
        self.config = config
        self.engine = make_engine(config)
        device = resolve_device(config.model.device)
        on_gpu = device.type == "cuda"
        # Recorded in every row: a caption's GPU-seconds are its seconds times the GPUs held (none on the CPU).
        self.device = torch.cuda.get_device_name(device) if on_gpu else "cpu"
        self.gpus = config.gpus_per_worker if on_gpu else 0.0
        self.engine_version = engine_version(config.engine)

    def caption_shard(self, job: CaptionJob) -> dict[str, Any]:
        """Caption the job's keys that no earlier run of the same settings captioned, keep the rows
        that one did, and commit the Parquet file; returns its stats."""
        from captioner.generation import CaptionRequest

        provenance = {**job.provenance, "engine_version": self.engine_version}
        started = time.perf_counter()
        reused = job.reusable_rows()
        done = {r["key"] for r in reused}
        wanted = job.wanted_keys()

        def to_caption(key: str) -> bool:
            return key not in done and (wanted is None or key in wanted)

        requests = (
            CaptionRequest(key, members.get("jpg", b""), members.get("txt", b"").decode() or None)
            for key, members in checked_samples(job.tar, to_caption)
        )
        rows = list(reused)
        for result in self.engine.caption(requests):
            rows.append(_row(result, self.config, self.engine, self.device, self.gpus, provenance))
            report_items()
        rows.sort(key=lambda r: r["key"])
        stats = caption_stats(rows, time.perf_counter() - started, reused=len(reused))
        meta = {
            "fingerprint": job.fingerprint,
            "rows_fingerprint": job.rows_fingerprint,
            "sample": None if job.sample is None else {"size": job.sample, "seed": job.sample_seed},
            "selection": job.selection,
            "stats": stats,
            "settings": json.loads(self.config.model_dump_json()),
        }
        write_table_atomic(job.out, rows, CAPTIONS_SCHEMA, meta, per_shard=True)
        return stats


def vllm_python(config: CaptionConfig) -> str:
    """The interpreter of the vLLM environment: ``--vllm-python``, ``DENSECURATE_VLLM_PYTHON``, or the
    project's ``.venv-vllm`` (what ``make setup-vllm`` builds)."""
    default = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
    return config.vllm.python or os.environ.get("DENSECURATE_VLLM_PYTHON") or str(default)


def vllm_runtime_env(config: CaptionConfig) -> dict[str, Any]:
    """Ray's runtime environment of the vLLM caption actors: vLLM's interpreter, its CPU KV-cache size."""
    return {
        "py_executable": vllm_python(config),
        "env_vars": {"VLLM_CPU_KVCACHE_SPACE": str(config.vllm.cpu_kv_cache_gib)},
    }


@dataclass
class CaptionSummary(StageSummary):
    """Totals over every shard of the run (reused ones included)."""

    out_dir: Path
    sample: str | None = None  # what a sample run captioned, e.g. "50 keys per shard (seed 0)"
    selection: KeySelection | None = None  # the keys query's choice
    changed_views: list[str] = field(default_factory=list)  # views the query reads that changed since the last run
    totals: Counter[str] = field(default_factory=Counter)
    errors_by_reason: Counter[str] = field(default_factory=Counter)

    @property
    def captions_this_run(self) -> int:
        """Keys captioned by this run (not the rows an earlier run made)."""
        return sum(r.stats["count"] - r.stats.get("reused", 0) for r in self.run.results if not r.reused)

    def render(self) -> Table:
        """Keys, captioned, errors by reason, flags, shards, speed."""
        t = self.totals
        rows = [("sample", self.sample)] if self.sample else []
        rows += self._selection_rows()
        rows += [("keys", str(t["count"])), ("captioned", str(t["ok"]))]
        if t["reused"]:
            rows.append(("  kept from an earlier run", str(t["reused"])))
        rows += [(f"  error: {reason}", str(n)) for reason, n in sorted(self.errors_by_reason.items())]
        rows += [(f"  flagged {flag}", str(t[flag])) for flag in ("truncated", "repetitive", "empty")]
        rows.append(self.shards_row())
        if self.seconds and self.captions_this_run:
            rate = self.captions_this_run / self.seconds
            rows.append(("speed", f"{rate:.2f} captions/s on {self.run.workers} {self.run.device} worker(s)"))
        return shards_table(f"caption stage -> {self.out_dir}", rows)

    def _selection_rows(self) -> list[tuple[str, str]]:
        if self.selection is None:
            return []
        chosen = f"{self.selection.chosen:,}"
        if self.selection.outside:
            chosen += f" ({self.selection.outside:,} of them no written sample of this root: left out)"
        rows = [("keys query", self.selection.query), ("  keys it chose", chosen)]
        if self.changed_views:
            rows.append(
                (
                    "  note",
                    f"{', '.join(self.changed_views)} changed since the last run of this query: it chose again; "
                    "captions of keys it no longer chooses are kept",
                )
            )
        return rows


class CaptionStage(Stage[CaptionJob, CaptionSummary]):
    """Caption every finished shard of a root with one model, on model-holding actors."""

    label = "caption"
    item_label = "captions"

    def __init__(self, root: Path, config: CaptionConfig) -> None:
        self.config = config
        self.catalog = DatasetLayout(root.resolve())
        self.ray_address = config.ray_address
        self.inputs = (self.catalog.shards_dir,)
        self.outputs = (self.catalog.captions_dir(config.name),)
        self.repair = config.repair
        self.selection: KeySelection | None = None
        self.changed_views: list[str] = []
        self.provenance: dict[str, str | None] = {}

    def plan(self) -> list[CaptionJob]:
        """A job per finished shard; the fingerprint covers the model, the generation settings and the shard."""
        layout, config = self.catalog, self.config
        settings = config.fingerprint_settings()
        jobs = []
        replaced: list[dict[str, Any]] = []  # earlier full runs' stats that this plan would caption over
        indices = list(require_complete(layout.shards_dir).finished)
        if config.keys_query is not None:
            self.selection = select_keys(layout, config.keys_query, indices, self.outputs[0])
        for index in indices:
            stats = read_shard_stats(layout, index)
            rows_fingerprint = fingerprint(settings, stats["inputs_fingerprint"])
            files = layout.shard_files(index)
            out = layout.caption_file(config.name, index)
            earlier = read_meta(out)
            chosen = None if self.selection is None else self.selection.keys_of(index)
            if config.chooses_keys:
                _refuse_to_sample_over_a_full_run(earlier, rows_fingerprint, out)
            elif _made_otherwise(earlier, rows_fingerprint, stats["inputs_fingerprint"]):
                replaced.append(earlier["stats"])
            if self.selection is not None and not self.changed_views and earlier is not None:
                self.changed_views = changed_views(earlier.get("selection"), self.selection)
            keys_settings = "" if self.selection is None else self.selection.shard_settings(index)
            jobs.append(
                CaptionJob(
                    index=index,
                    out_dir=layout.captions_dir(config.name),
                    fingerprint=fingerprint(
                        settings + config.sample_settings() + keys_settings, stats["inputs_fingerprint"]
                    ),
                    items=_keys_to_caption(
                        config.sample, stats["successes"] if chosen is None else len(chosen), earlier, rows_fingerprint
                    ),
                    expected_rows=None if config.chooses_keys else stats["successes"],
                    tar=files.tar,
                    samples_table=files.parquet,
                    rows_fingerprint=rows_fingerprint,
                    sample=config.sample,
                    sample_seed=config.sample_seed,
                    shard_rows=stats["successes"],
                    chosen_keys=chosen,
                    selection=None if self.selection is None else self.selection.record(index),
                    provenance=self.provenance,
                )
            )
        if not jobs:
            raise MissingInputError(f"no finished shards under {layout.shards_dir}: run `densecurate shard` first")
        if replaced and not config.replace:
            _refuse_to_replace_captions(replaced, config.name, self.outputs[0])
        return jobs

    def check(self) -> None:
        """Before any actor starts: the model is a captioner that is available here, ``--max-new-tokens`` fits
        its context, and the vLLM engine's interpreter runs what its actors import."""
        from captioner.loading import check_model_available

        context = check_model_available(self.config.model)
        max_new_tokens = self.config.generation.max_new_tokens
        if context is not None and max_new_tokens >= context:
            raise ConfigError(
                f"--max-new-tokens {max_new_tokens} does not fit {self.config.model.model}'s context of {context:,} "
                "tokens, which also holds the prompt and the image: ask for fewer new tokens"
            )
        if self.config.engine == "vllm":
            from captioner.vllm_env import check_vllm_python

            check_vllm_python(vllm_python(self.config))
        self.provenance = {
            "model_sha256": weights_sha256(self.config.model.model),
            "prompt_sha256": prompt_sha256(Prompt.parse(self.config.generation.prompt).template),
        }

    def work(self) -> Actors:
        c = self.config
        return Actors(
            CaptionWorker,
            (c,),
            "caption_shard",
            c.workers,
            gpus_per_worker=c.gpus_per_worker,
            device=c.model.device,
            runtime_env=vllm_runtime_env(c) if c.engine == "vllm" else None,
        )

    def summarize(self, run: StageRun[CaptionJob]) -> CaptionSummary:
        c = self.config
        sample = None if c.sample is None else describe_sample(c.sample, c.sample_seed)
        summary = CaptionSummary(
            run, out_dir=self.outputs[0], sample=sample, selection=self.selection, changed_views=self.changed_views
        )
        for stats in run.stats:
            summary.totals.update({k: stats[k] for k in ("count", "ok", "truncated", "repetitive", "empty", "tokens")})
            summary.totals["reused"] += stats.get("reused", 0)
            summary.errors_by_reason.update(stats["errors_by_reason"])
        return summary


def rows_fingerprint_of(meta: dict[str, Any]) -> str | None:
    """The fingerprint a caption file's rows were made with (files of full runs before samples existed
    carry it as their fingerprint)."""
    return meta.get("rows_fingerprint", meta.get("fingerprint"))


def _keys_to_caption(sample: float | None, keys: int, earlier: dict[str, Any] | None, rows_fingerprint: str) -> int:
    """About how many of a shard's ``keys`` a job captions (for the progress bar): the sample's or every key,
    less the rows an earlier run of the same settings left (``earlier``: its file's metadata)."""
    wanted = keys if sample is None else min(keys, int(sample)) if sample >= 1 else round(sample * keys)
    made = earlier["stats"]["count"] if earlier and rows_fingerprint_of(earlier) == rows_fingerprint else 0
    return max(0, wanted - made)


def _refuse_to_sample_over_a_full_run(earlier: dict[str, Any] | None, rows_fingerprint: str, out: Path) -> None:
    """Some keys captioned with other settings than a full run's captions would replace them."""
    full = earlier is not None and earlier.get("sample") is None and earlier.get("selection") is None
    if full and rows_fingerprint_of(earlier) != rows_fingerprint:
        raise OutputConflictError(
            f"{out} holds the captions of every key of its shard, made with other settings; a sample or a keys "
            "query would replace them with its few keys: caption those keys under another --name"
        )


def _made_otherwise(earlier: dict[str, Any] | None, rows_fingerprint: str, shard_fingerprint: str) -> bool:
    """Whether ``earlier`` (a caption file's metadata) is a full run of the same shard made with other model or
    generation settings: a caption run over it replaces GPU work that is still current for its shard."""
    if earlier is None or earlier.get("sample") is not None or rows_fingerprint_of(earlier) == rows_fingerprint:
        return False
    try:
        settings = CaptionConfig.model_validate(earlier["settings"]).fingerprint_settings()
    except (KeyError, TypeError, ValidationError):
        return True  # settings that cannot be read back: the shard cannot be told unchanged, so ask
    return fingerprint(settings, shard_fingerprint) == rows_fingerprint_of(earlier)


def _refuse_to_replace_captions(replaced: list[dict[str, Any]], name: str, folder: Path) -> None:
    captions = sum(s["ok"] for s in replaced)
    seconds = sum(s["seconds"] for s in replaced)
    raise OutputConflictError(
        f"this run would replace {captions:,} captions of {len(replaced)} shards in {folder} that an earlier run of "
        f"{name!r} made with other model or generation settings ({seconds:,.1f} worker-seconds of captioning): "
        "caption under another --name, or pass --replace to replace them"
    )


def run_caption_stage(root: Path, config: CaptionConfig) -> CaptionSummary:
    """Caption every finished shard under ``root`` that has no valid caption file yet."""
    return run_stage(CaptionStage(root, config))
