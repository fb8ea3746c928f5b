"""All GPU figures in one command: caption, ground, features and train throughput on one GPU.

    make bench-gpu                                    # installs the CUDA vLLM environment, then runs this
    python bench/gpu_suite.py --out bench-gpu-out     # one H100/H200, at most 9 minutes
    python bench/gpu_suite.py --dry-run --out DIR     # every part on tiny models on the CPU, under 2 minutes

Every model is a full-size architecture with random weights built from its config (nothing is downloaded),
built, and its weights saved, before its part's clock starts; each part measures until its work is done or its
budget (seconds, --budget PART=S) is spent, and says which. Parts:

- caption: LLaVA-1.5-7B, transformers' best batch size against vLLM, at 200 tokens (EOS ignored) and at
  natural dense-caption lengths: captions/s, tokens/s, GPU memory; SmolVLM-256M (Idefics3) and Qwen2-VL-7B
  in vLLM (bench/gpu_suite_caption.py).
- ground: CLIP ViT-L/14 image embeddings/s and noun prompts/s.
- features: VAE encodes/s at 256 px and T5-XXL encoder states/s, bf16.
- train: PixArt-XL/2 at 256 px under bf16 autocast, the largest batch that fits, on precomputed features
  and with the encoders online: samples/s and MFU (bench/gpu_suite_parts.py).

Writes DIR/gpu_suite.md (one table) and DIR/gpu_suite.json, and prints the table. A part that fails is a row
with its error; the others still run. Caption runs last: its vLLM processes get the wall time that is left.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from gpu_suite_parts import (
    DRY,
    GPU,
    Budget,
    PartResult,
    Preset,
    Row,
    count,
    features_part,
    free_memory,
    ground_part,
    one_line,
    train_part,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
PARTS = ("caption", "ground", "features", "train")  # the report's order
RUN_ORDER = ("ground", "features", "train", "caption")
MIN_PART_S = 5.0  # a part that would start with less wall time left is skipped
COLUMNS = (
    "part",
    "model",
    "measurement",
    "setting",
    "items",
    "seconds",
    "rate",
    "tokens/s",
    "peak GPU GiB",
    "MFU",
    "vs baseline",
    "target",
    "status",
)
NO_GPU = (
    "bench/gpu_suite.py needs a CUDA GPU and torch sees none: run it on a GPU machine (make bench-gpu), or pass "
    "--dry-run to run every part on tiny models on the CPU."
)


def part_status(rows: list[Row]) -> str:
    """A part's status from its rows: done, or (naming the row) the first failure, else the first row not done."""
    failed = [row for row in rows if row.status.startswith("failed")]
    for row in failed or rows:
        if row.status != "done":
            return f"{row.status} ({row.model}, {row.measurement})"
    return "done"


def part_line(part: PartResult) -> str:
    """A part's status, and its time in all and measuring, against its budget."""
    if not part.seconds:
        return part.status
    measured = sum(r.seconds for r in part.rows)
    return f"{part.status}; {part.seconds:.0f} s in all, {measured:.0f} s measured of a {part.budget_s:.0f} s budget"


def run_part(name: str, measure: Callable[[Budget, PartResult], None], budget_s: float, wall: Budget) -> PartResult:
    """One part, with the budget it has and the wall time left; its failure is its status."""
    result = PartResult(name, budget_s)
    if wall.left() < MIN_PART_S:
        result.status = "skipped: the suite's wall time was spent"
        return result
    started = time.perf_counter()
    try:
        measure(Budget(min(budget_s, wall.left())), result)
        result.status = part_status(result.rows)
    except Exception as exc:
        traceback.print_exc()  # the report keeps one line; the console gets where it happened
        result.status = f"failed: {one_line(exc)}"
    finally:
        free_memory()
    result.seconds = time.perf_counter() - started
    return result


def cells(row: Row) -> list[str]:
    rate, tokens = row.rate, row.tokens
    return [
        row.part,
        row.model,
        row.measurement,
        row.setting or "-",
        count(row.items, row.unit) if row.items else "-",
        f"{row.seconds:.2f}" if row.seconds else "-",
        f"{rate:,.1f} {row.unit}/s" if rate else "-",
        f"{tokens / row.seconds:,.0f}" if tokens and row.seconds else "-",
        f"{row.gpu_gib:.1f}" if row.gpu_gib is not None else "-",
        f"{100 * row.mfu:.1f}%" if row.mfu is not None else "-",
        row.vs or "-",
        row.target or "-",
        row.status,
    ]


def table_rows(results: dict[str, PartResult]) -> list[list[str]]:
    """Every row of every part, and a row with its status for a part without rows or one that failed."""
    rows = []
    for name in PARTS:
        part = results[name]
        rows += [cells(r) for r in part.rows]
        if not part.rows or part.status.startswith("failed"):
            rows.append([name, *["-"] * (len(COLUMNS) - 2), part.status])
    return rows


def markdown(results: dict[str, PartResult], title: str, notes: list[str]) -> str:
    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    table = [line(list(COLUMNS)), line(["---"] * len(COLUMNS)), *(line(r) for r in table_rows(results))]
    return "\n".join([f"# {title}", "", *table, "", *(f"- {n}" for n in notes), ""])


def print_table(results: dict[str, PartResult], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(*COLUMNS, title=title)
    for row in table_rows(results):
        table.add_row(*row)
    Console(width=240).print(table)


def parse_budgets(values: list[str], preset: Preset) -> dict[str, float]:
    budgets = dict(preset.budgets)
    for value in values:
        name, _, seconds = value.partition("=")
        if name not in budgets or not seconds.replace(".", "", 1).isdigit():
            sys.exit(f"--budget {value}: use PART=SECONDS with PART one of {', '.join(PARTS)}")
        budgets[name] = float(seconds)
    return budgets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for gpu_suite.md and gpu_suite.json")
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU: checks every part")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS", help="a part's budget")
    parser.add_argument("--wall-s", type=float, help="the whole suite's seconds (default 540; dry run 110)")
    parser.add_argument("--vllm-python", type=Path, default=REPO / ".venv-vllm" / "bin" / "python")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        sys.exit(2)
    chosen = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := sorted(set(chosen) - set(PARTS)):
        sys.exit(f"--parts: unknown part {', '.join(unknown)}; the parts are {', '.join(PARTS)}")

    preset = DRY if args.dry_run else GPU
    budgets = parse_budgets(args.budget, preset)
    wall = Budget(args.wall_s or preset.wall_s).start()
    device = torch.device("cpu" if args.dry_run else "cuda")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    started_at = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as tmp:
        results = run_parts(preset, budgets, chosen, device, wall, Path(tmp), args.vllm_python)
    write_report(results, args, where, started_at, wall)
    if failed := [name for name, part in results.items() if part.status.startswith("failed")]:
        sys.exit(f"failed: {', '.join(failed)} (the status column of {args.out / 'gpu_suite.md'} says why)")


def run_parts(
    preset: Preset,
    budgets: dict[str, float],
    chosen: list[str],
    device: torch.device,
    wall: Budget,
    work: Path,
    vllm_python: Path,
) -> dict[str, PartResult]:
    """The chosen parts in RUN_ORDER, the others skipped."""
    from gpu_suite_caption import caption_part

    measures: dict[str, Callable[[Budget, PartResult], None]] = {
        "ground": lambda b, r: ground_part(preset, device, b, r, work),
        "features": lambda b, r: features_part(preset, device, b, r, work),
        "train": lambda b, r: train_part(preset, device, b, r, work),
        "caption": lambda b, r: caption_part(preset, device, b, r, work, wall, vllm_python),
    }
    results: dict[str, PartResult] = {}
    for name in RUN_ORDER:
        if name in chosen:
            print(f"{name}: running (budget {budgets[name]:.0f} s, {wall.left():.0f} s of wall time left)", flush=True)
            results[name] = run_part(name, measures[name], budgets[name], wall)
        else:
            results[name] = PartResult(name, budgets[name], status="skipped: not in --parts")
        print(f"{name}: {results[name].status}", flush=True)
    return results


def part_json(part: PartResult) -> dict[str, Any]:
    rows = [{**asdict(r), "rate": r.rate} for r in part.rows]
    return {
        "status": part.status,
        "budget_s": part.budget_s,
        "seconds": part.seconds,
        "notes": part.notes,
        "rows": rows,
    }


def write_report(
    results: dict[str, PartResult], args: argparse.Namespace, where: str, started_at: datetime, wall: Budget
) -> None:
    """gpu_suite.md and gpu_suite.json in --out, and the table on the console."""
    kind = "dry run, tiny models" if args.dry_run else "random-weight full-size models"
    title = f"All GPU figures: {where}, {kind}, {started_at:%Y-%m-%d %H:%M} UTC, {wall.used():.0f} s"
    notes = [f"{name}: {part_line(results[name])}" for name in PARTS]
    notes += [f"{name}: {note}" for name in PARTS for note in results[name].notes]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_suite.md").write_text(markdown(results, title, notes))
    report = {
        "suite": {
            "device": where,
            "dry_run": args.dry_run,
            "started": started_at.isoformat(timespec="seconds"),
            "wall_s": wall.used(),
            "wall_budget_s": wall.seconds,
            "command": " ".join(sys.argv),
            "torch": torch.__version__,
        },
        "parts": {name: part_json(results[name]) for name in PARTS},
    }
    (args.out / "gpu_suite.json").write_text(json.dumps(report, indent=2))
    print_table(results, title)
    print(f"wrote {args.out / 'gpu_suite.md'} and {args.out / 'gpu_suite.json'}")


if __name__ == "__main__":
    main()
