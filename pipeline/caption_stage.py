"""The caption stage: ``ROOT/shards/NNNNN.tar`` -> ``ROOT/captions/NAME/NNNNN.parquet``.

One Ray actor per GPU (or one CPU actor) holds the model and takes whole shards. Each output is
written under a temporary name and renamed; a rerun skips finished shards; a worker that dies
mid-shard is restarted by Ray and its shard redone, so every key appears exactly once.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from pipeline.guards import require_complete
from pipeline.parquet_meta import write_table_atomic
from pipeline.runner import run_stage
from pipeline.shard_reading import iter_shard_samples, read_shard_stats
from pipeline.stage import Actors, Stage, StageRun, StageSummary, TableJob, fingerprint, shards_table
from schemas.caption_config import CaptionConfig
from schemas.errors import MissingInputError
from schemas.layout import DatasetLayout
from schemas.tables import CAPTIONS_SCHEMA


@dataclass(frozen=True, kw_only=True)
class CaptionJob(TableJob):
    """One shard to caption: its tar; the captions go to ``captions/NAME/NNNNN.parquet``."""

    tar: Path


def _row(result, config: CaptionConfig, engine) -> dict[str, Any]:
    gen = config.generation
    checks = result.checks
    return {
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
    }


def caption_stats(rows: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Counts a curator looks at first, for the summary and the file metadata."""
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
    }


class CaptionWorker:
    """Holds one model replica; captions whole shards (a Ray actor in the stage, a plain object in tests)."""

    def __init__(self, config: CaptionConfig, cpu_threads: int | None = None) -> None:
        import torch

        from captioner.engine import make_engine

        if cpu_threads:
            torch.set_num_threads(cpu_threads)
        self.config = config
        self.engine = make_engine(config)

    def caption_shard(self, job: CaptionJob) -> dict[str, Any]:
        """Caption every sample of the job's shard and commit the Parquet file; returns its stats."""
        from captioner.generation import CaptionRequest

        started = time.perf_counter()
        requests = (
            CaptionRequest(key, members.get("jpg", b""), members.get("txt", b"").decode() or None)
            for key, members in iter_shard_samples(job.tar)
        )
        rows = [_row(result, self.config, self.engine) for result in self.engine.caption(requests)]
        rows.sort(key=lambda r: r["key"])
        stats = caption_stats(rows, time.perf_counter() - started)
        meta = {"fingerprint": job.fingerprint, "stats": stats, "settings": json.loads(self.config.model_dump_json())}
        write_table_atomic(job.out, rows, CAPTIONS_SCHEMA, meta)
        return stats


def vllm_python(config: CaptionConfig) -> str:
    """The interpreter of the vLLM environment: ``--vllm-python``, ``DENSECURATE_VLLM_PYTHON``, or the
    project's ``.venv-vllm`` (what ``make setup-vllm`` builds)."""
    default = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
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
    totals: Counter[str] = field(default_factory=Counter)
    errors_by_reason: Counter[str] = field(default_factory=Counter)

    @property
    def captions_this_run(self) -> int:
        return self.run.items_processed

    def render(self) -> Table:
        """Keys, captioned, errors by reason, flags, shards, speed."""
        t = self.totals
        rows = [("keys", str(t["count"])), ("captioned", str(t["ok"]))]
        rows += [(f"  error: {reason}", str(n)) for reason, n in sorted(self.errors_by_reason.items())]
        rows += [(f"  flagged {flag}", str(t[flag])) for flag in ("truncated", "repetitive", "empty")]
        rows.append(self.shards_row())
        if self.seconds and self.captions_this_run:
            rate = self.captions_this_run / self.seconds
            rows.append(("speed", f"{rate:.2f} captions/s on {self.run.workers} {self.run.device} worker(s)"))
        return shards_table(f"caption stage -> {self.out_dir}", rows)


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

    def plan(self) -> list[CaptionJob]:
        """A job per finished shard; the fingerprint covers the model, the generation settings and the shard."""
        layout, config = self.catalog, self.config
        settings = config.fingerprint_settings()
        jobs = []
        for index in require_complete(layout.shards_dir).finished:
            stats = read_shard_stats(layout, index)
            jobs.append(
                CaptionJob(
                    index=index,
                    out_dir=layout.captions_dir(config.name),
                    fingerprint=fingerprint(settings, stats["inputs_fingerprint"]),
                    items=stats["successes"],
                    expected_rows=stats["successes"],
                    tar=layout.shard_files(index).tar,
                )
            )
        if not jobs:
            raise MissingInputError(f"no finished shards under {layout.shards_dir}: run `densecurate shard` first")
        return jobs

    def check(self) -> None:
        from captioner.loading import check_model_available

        check_model_available(self.config.model)
        if self.config.engine == "vllm" and not Path(vllm_python(self.config)).is_file():
            raise MissingInputError(
                f"the vLLM environment {vllm_python(self.config)} does not exist: run `make setup-vllm`, or pass "
                "--vllm-python with the interpreter of an environment that has vLLM and densecurate"
            )

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
        summary = CaptionSummary(run, out_dir=self.outputs[0])
        for stats in run.stats:
            summary.totals.update({k: stats[k] for k in ("count", "ok", "truncated", "repetitive", "empty", "tokens")})
            summary.errors_by_reason.update(stats["errors_by_reason"])
        return summary


def run_caption_stage(root: Path, config: CaptionConfig) -> CaptionSummary:
    """Caption every finished shard under ``root`` that has no valid caption file yet."""
    return run_stage(CaptionStage(root, config))
