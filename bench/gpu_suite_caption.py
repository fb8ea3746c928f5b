"""The caption part of bench/gpu_suite.py: LLaVA-1.5-7B in transformers (static batches; its best batch size
is the baseline) against vLLM (continuous batching), then SmolVLM-256M (Idefics3) and Qwen2-VL-7B in vLLM.

Two workloads, EOS ignored so that runs compare: every caption ``new_tokens`` long ("fixed"), and each caption
as long as a real dense caption ("natural", bench/caption_bench.py's lengths). The full-size architectures are
bench/caption_bench.py's, built with random weights on the GPU and saved as safetensors to a temporary folder
that vLLM loads in its own environment (bench/gpu_suite_vllm.py), one process per model; the dry run runs its
tiny models in one vLLM process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from gpu_suite_parts import (
    Budget,
    PartResult,
    Preset,
    Row,
    count,
    free_memory,
    one_line,
    peak_gib,
    reset_peak,
    sync,
)

from captioner.generation import Captioner, CaptionRequest
from schemas.caption_config import GenerationSettings

LABELS = {"llava-1.5-7b": "LLaVA-1.5-7B", "smolvlm-256m": "SmolVLM-256M (Idefics3)", "qwen2-vl-7b": "Qwen2-VL-7B"}
# The caption budget's shares: transformers' batch sizes, then each model in vLLM.
SHARES = {"transformers": 0.45, "llava-1.5-7b": 0.25, "smolvlm-256m": 0.12, "qwen2-vl-7b": 0.18}
GPU_MEMORY_UTILIZATION = 0.85  # vLLM's share of the GPU: this process keeps its CUDA context meanwhile
WALL_RESERVE_S = 10.0  # kept for writing the report
MIN_VLLM_S = 30.0  # a vLLM run that would start with less wall time left is skipped
RUNNER = Path(__file__).resolve().parent / "gpu_suite_vllm.py"
PHOTOS = 8


def build_folder(arch: str, preset: Preset, folder: Path) -> Path:
    """The architecture's config and processor (the dry run's tiny model: with its saved weights)."""
    from caption_bench import ARCHS

    from captioner.tiny import make_tiny_llava
    from captioner.tiny_idefics3 import make_tiny_idefics3
    from captioner.tiny_qwen2_vl import make_tiny_qwen2_vl

    tiny = {"llava-1.5-7b": make_tiny_llava, "smolvlm-256m": make_tiny_idefics3, "qwen2-vl-7b": make_tiny_qwen2_vl}
    return tiny[arch](folder) if preset.dry else ARCHS[arch](folder)


def save_weights(model: Any, arch: str, folder: Path) -> None:
    """Save random weights as safetensors where vLLM loads them (LLaVA's vision tower in the hub's layout)."""
    from captioner.tiny import use_hub_key_layout

    model.save_pretrained(folder)
    if arch == "llava-1.5-7b":
        use_hub_key_layout(folder)


def weights_folder(arch: str, preset: Preset, work: Path, device: torch.device) -> Path:
    """A folder with the architecture's saved random weights (made once, on the device)."""
    from caption_bench import random_weight_model

    folder = work / arch
    if not any(folder.glob("*.safetensors")):
        build_folder(arch, preset, folder)
    if not any(folder.glob("*.safetensors")):
        loaded = random_weight_model(folder, device, torch.bfloat16)
        save_weights(loaded.model, arch, folder)
        del loaded
        free_memory()
    return folder


def model_label(arch: str, preset: Preset, dtype: str) -> str:
    return f"{'tiny ' if preset.dry else ''}{LABELS[arch]} ({dtype})"


def transformers_row(
    loaded: Any, batch: int, lengths: list[int], requests: list[CaptionRequest], budget: Budget, row: Row
) -> Row:
    """Static batches of ``batch``, each as long as its longest caption; stops between batches when the budget
    is spent. Out of memory (the captioner halves its batch) ends the row."""
    device = loaded.device
    warm = Captioner(loaded, GenerationSettings(batch_size=batch, max_new_tokens=8, ignore_eos=True))
    list(warm.caption(requests[:batch]))
    if warm.batch_size < batch:
        row.status = f"out of memory at batch {batch}"
        return row
    reset_peak(device)
    row.tokens = 0
    for start in range(0, len(lengths), batch):
        if budget.spent:
            row.status = f"budget spent after {count(row.items, 'captions')}"
            break
        chunk = lengths[start : start + batch]
        settings = GenerationSettings(batch_size=batch, max_new_tokens=max(chunk), ignore_eos=True)
        captioner = Captioner(loaded, settings)
        sync(device)
        started = time.perf_counter()
        list(captioner.caption(requests[start : start + len(chunk)]))
        sync(device)
        if captioner.batch_size < batch:
            row.status = f"out of memory at batch {batch}"
            return row
        row.seconds += time.perf_counter() - started
        row.items += len(chunk)
        row.tokens += sum(chunk)
    row.gpu_gib = peak_gib(device)
    return row


def transformers_rows(
    preset: Preset,
    device: torch.device,
    budget: Budget,
    result: PartResult,
    work: Path,
    workloads: dict[str, list[int]],
    photos: list[Path],
) -> dict[str, float]:
    """LLaVA in transformers: the fixed workload at each batch size upwards until one runs out of memory, then
    the natural workload at the best of them; returns the best captions/s per workload."""
    from caption_bench import random_weight_model

    arch = "llava-1.5-7b"
    folder = build_folder(arch, preset, work / arch)
    loaded = random_weight_model(folder, device, torch.float32 if preset.dry else torch.bfloat16)
    if not preset.dry:
        save_weights(loaded.model, arch, folder)
    label = model_label(arch, preset, "fp32" if preset.dry else "bf16")
    images = [p.read_bytes() for p in photos]
    best: dict[str, float] = {}

    def measure(workload: str, batch: int, captions: int, rows_left: int) -> Row:
        row = Row("caption", label, f"transformers, {workload}", f"batch {batch}", "captions")
        result.rows.append(row)
        if budget.spent:
            row.status = "skipped: budget spent"
            return row
        lengths = workloads[workload][:captions]
        requests = [CaptionRequest(f"{i:06d}", images[i % len(images)], "a photo") for i in range(len(lengths))]
        transformers_row(loaded, batch, lengths, requests, budget.share(rows_left), row)
        if row.rate and row.rate > best.get(workload, 0.0):
            best[workload] = row.rate
        return row

    fixed, natural = workloads
    budget.start()
    best_batch = None
    for i, batch in enumerate(preset.hf_batches):
        row = measure(fixed, batch, batch * preset.hf_batches_per_row, len(preset.hf_batches) + 1 - i)
        if row.status.startswith("out of memory"):
            break
        if row.rate and row.rate == best[fixed]:
            best_batch = batch
    if best_batch is not None:
        measure(natural, best_batch, best_batch * max(2, preset.hf_batches_per_row), 1)
    return best


def last_error(log: str) -> str:
    """The line of a log that says what went wrong: its last ``SomethingError: ...`` line, else its last line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"\w+(Error|Exception): ", line)]
    found = errors[-1] if errors else (lines[-1] if lines else "no output")
    return found[-300:]


def run_vllm(python: Path, spec: dict[str, Any], work: Path, timeout_s: float, dry: bool) -> dict[str, Any]:
    """Run bench/gpu_suite_vllm.py on ``spec`` in the vLLM environment; returns its results per model, and for
    a run that ended early or failed, ``_stopped`` (why)."""
    work.mkdir(parents=True, exist_ok=True)
    spec_path, log_path = work / "spec.json", work / "vllm.log"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    if dry:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the tiny models share one process: no engine process each
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [str(python), str(RUNNER), str(spec_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # its engine processes form one group, stopped together
        )
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = None
    out = Path(spec["out"])
    results = json.loads(out.read_text()) if out.is_file() else {}
    if code is None:
        results["_stopped"] = f"budget spent: stopped after {timeout_s:.0f} s (start-up included)"
    elif code != 0:
        results["_stopped"] = f"failed: the vLLM run exited with status {code}: {last_error(log_path.read_text())}"
    return results


def vllm_rows(
    preset: Preset,
    device: torch.device,
    budget: Budget,
    result: PartResult,
    work: Path,
    workloads: dict[str, list[int]],
    photos: list[Path],
    best: dict[str, float],
    wall: Budget,
    python: Path,
) -> None:
    """Each model in vLLM (its weights saved first), a row per workload, against transformers' best for LLaVA."""
    archs = preset.caption_archs
    if not python.is_file():
        why = "dry run without vLLM environment" if preset.dry else f"no vLLM environment at {python} (make setup-vllm)"
        for arch in archs:
            result.rows.append(Row("caption", model_label(arch, preset, "bf16"), "vLLM", status=f"skipped: {why}"))
        return
    groups = [list(archs)] if preset.dry else [[arch] for arch in archs]
    for i, group in enumerate(groups):
        budgets = {arch: budget.seconds * SHARES[arch] for arch in group}
        folders: list[Path] = []
        if wall.left() - WALL_RESERVE_S < MIN_VLLM_S:
            outcome = {"_stopped": "skipped: the suite's wall time was spent"}
        else:
            try:
                folders = [weights_folder(arch, preset, work, device) for arch in group]
                models = [
                    {
                        "name": arch,
                        "folder": str(folder),
                        "workloads": {name: lengths[: preset.vllm_captions] for name, lengths in workloads.items()},
                        "budget_s": budgets[arch],
                    }
                    for arch, folder in zip(group, folders, strict=True)
                ]
                spec = {
                    "models": models,
                    "images": [str(p) for p in photos],
                    "dtype": "bfloat16",
                    "max_num_seqs": preset.max_num_seqs,
                    "max_model_len": preset.max_model_len,
                    "gpu_memory_utilization": GPU_MEMORY_UTILIZATION,
                    "out": str(work / f"vllm_results_{i}.json"),
                }
                timeout = min(wall.left() - WALL_RESERVE_S, sum(budgets.values()) + preset.vllm_start_s * len(group))
                outcome = run_vllm(python, spec, work / f"vllm_{i}", timeout, preset.dry)
            except Exception as exc:  # saving the weights failed: the next model still runs
                traceback.print_exc()
                outcome = {"_stopped": f"failed: {one_line(exc)}"}
        for arch in group:
            add_vllm_rows(preset, result, arch, outcome, best, len(workloads))
        if not preset.dry:
            for weights in (w for folder in folders for w in folder.glob("*.safetensors")):
                weights.unlink()


def add_vllm_rows(
    preset: Preset, result: PartResult, arch: str, outcome: dict[str, Any], best: dict[str, float], workloads: int
) -> None:
    """The rows of one model's vLLM results, and a row saying why when it has fewer than ``workloads``."""
    label = model_label(arch, preset, "bf16")
    found = outcome.get(arch, {})
    measured = found.get("workloads", {})
    for workload, r in measured.items():
        setting = f"max_num_seqs {preset.max_num_seqs}, start-up {found['startup_s']:.0f} s"
        row = Row("caption", label, f"vLLM, {workload}", setting, "captions", r["captions"], r["seconds"])
        row.tokens, row.gpu_gib, row.status = r["tokens"], r["gpu_gib"], r["status"]
        result.rows.append(row)
        if arch == "llava-1.5-7b" and row.rate and workload in best:
            ratio = row.rate / best[workload]
            row.vs = f"{ratio:.2f}x transformers best"
            if not preset.dry and workload.startswith("fixed"):
                met = ratio >= 3 and row.rate >= 30
                row.target = f">= 3x and >= 30 captions/s: {'met' if met else 'not met'}"
    if "error" in found:
        result.rows.append(Row("caption", label, "vLLM", status=f"failed: {found['error']}"))
    elif len(measured) < workloads:
        result.rows.append(Row("caption", label, "vLLM", status=outcome.get("_stopped", "failed: no result")))


def caption_part(
    preset: Preset, device: torch.device, budget: Budget, result: PartResult, work: Path, wall: Budget, python: Path
) -> None:
    """Transformers' rows, then vLLM's; a failure in the first still lets vLLM run."""
    from caption_bench import natural_lengths, write_images

    photos = write_images(work / "images", PHOTOS)
    captions = max(preset.vllm_captions, max(preset.hf_batches) * max(2, preset.hf_batches_per_row))
    natural, source = natural_lengths(captions, preset.natural_cap)
    workloads = {f"fixed {preset.new_tokens}": [preset.new_tokens] * captions, "natural": natural}
    mean = sum(natural) / len(natural)
    result.notes.append(f"natural lengths from {source}, at most {preset.natural_cap} tokens: mean {mean:.0f}")
    best: dict[str, float] = {}
    try:
        best = transformers_rows(
            preset, device, Budget(budget.seconds * SHARES["transformers"]), result, work, workloads, photos
        )
    except Exception as exc:  # one failed measurement is its row's: vLLM still runs
        traceback.print_exc()
        dtype = "fp32" if preset.dry else "bf16"
        status = f"failed: {one_line(exc)}"
        result.rows.append(Row("caption", model_label("llava-1.5-7b", preset, dtype), "transformers", status=status))
    free_memory()  # the transformers model is gone with its frame: its memory goes to vLLM
    vllm_rows(preset, device, budget, result, work, workloads, photos, best, wall, python)
