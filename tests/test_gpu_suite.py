"""bench/gpu_suite.py, the one command for every GPU figure: its dry run on the CPU writes both reports with
every part, its FLOP count per training sample matches torch's FlopCounterMode, and without a GPU it refuses
in one sentence (the script and `make bench-gpu`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
SCRIPT = BENCH / "gpu_suite.py"
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
PARTS = ("caption", "ground", "features", "train")


@pytest.fixture(scope="module")
def bench_modules():
    """The suite's modules, imported as the script imports them (bench/ on the path)."""
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_suite
        import gpu_suite_parts
        import train_bench

        yield gpu_suite, gpu_suite_parts, train_bench
    finally:
        sys.path.remove(str(BENCH))


def _run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
        timeout=timeout,
        check=False,
    )


@pytest.mark.slow
def test_dry_run_writes_one_table_and_one_json_with_every_part_in_under_two_minutes(tmp_path):
    vllm = VLLM_PYTHON.is_file()
    if not vllm and os.environ.get("DENSECURATE_REQUIRE_VLLM") == "1":
        pytest.fail(f"the vLLM environment {VLLM_PYTHON} is missing: run `make setup-vllm`")
    out = tmp_path / "report"
    done = _run(["--dry-run", "--out", str(out)], {}, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_suite.json", "gpu_suite.md"]

    report = json.loads((out / "gpu_suite.json").read_text())
    assert report["suite"]["dry_run"] is True
    assert report["suite"]["wall_s"] < 120
    assert tuple(report["parts"]) == PARTS
    measured = "done", "budget spent after "  # a loaded machine may spend a small budget: still a figure
    for name, part in report["parts"].items():
        assert part["status"].startswith(measured) or (name == "caption" and not vllm), part
        ran = [r for r in part["rows"] if not (r["measurement"] == "vLLM" and not vllm)]
        assert ran and all(r["status"].startswith(measured) for r in ran), part
        assert ran[0]["items"] > 0 and ran[0]["rate"] > 0, part
    rows = report["parts"]["caption"]["rows"]
    transformers = [r for r in rows if r["measurement"].startswith("transformers")]
    assert [r["measurement"] for r in transformers] == ["transformers, fixed 16"] * 2 + ["transformers, natural"]
    served = [r for r in rows if r["measurement"].startswith("vLLM")]
    assert {r["model"].split(" (")[0] for r in served} == {"tiny LLaVA-1.5-7B", "tiny SmolVLM-256M", "tiny Qwen2-VL-7B"}
    if vllm:
        assert [r["measurement"] for r in served] == ["vLLM, fixed 16", "vLLM, natural"] * 3, served
        llava = served[0]
        assert llava["items"] > 0 and llava["tokens"] == 16 * llava["items"], llava
        assert llava["vs"].endswith("x transformers best"), llava
    else:
        assert all(r["status"] == "skipped: dry run without vLLM environment" for r in served), served

    table = [line for line in (out / "gpu_suite.md").read_text().splitlines() if line.startswith("|")]
    lines = (out / "gpu_suite.md").read_text().splitlines()
    first = lines.index(table[0])
    assert lines[first : first + len(table)] == table, "one table, its lines together"
    assert table[0].startswith("| part | model | measurement |") and set(table[1].replace("|", "").split()) == {"---"}
    assert {line.split("|")[1].strip() for line in table[2:]} == set(PARTS)
    assert len(table) - 2 == sum(len(p["rows"]) for p in report["parts"].values())


def test_flop_count_per_sample_matches_flop_counter_mode(bench_modules):
    """On presets smaller than XL/2, one training step (diffusion_terms, hybrid loss, backward) as
    FlopCounterMode counts it with the math attention kernel (whose matmuls it sees on the CPU)."""
    from trainer.diffusion import HybridLoss, linear_scheduler
    from trainer.loop import build_transformer, diffusion_terms

    _, parts, train_bench = bench_modules
    tiny = train_bench.train_config("tiny", 32, 64, 4)
    sizes = {"num_layers": 3, "num_attention_heads": 4, "attention_head_dim": 16, "caption_channels": 48}
    wider = tiny.model_copy(update={"resolution": 128, "model": tiny.model.model_copy(update=sizes)})
    for config, tokens in ((tiny, 120), (wider, 24)):
        torch.manual_seed(0)
        model = build_transformer(config)
        scheduler = linear_scheduler()
        batch, res, width = 2, config.resolution, config.model.caption_channels
        latents = torch.randn(batch, 4, res // 8, res // 8)
        states = torch.randn(batch, tokens, width)
        mask = torch.ones(batch, tokens, dtype=torch.long)
        counter = FlopCounterMode(display=False)
        with sdpa_kernel(SDPBackend.MATH), counter:
            terms = diffusion_terms(
                model, latents, states, mask, scheduler, HybridLoss(scheduler), torch.Generator().manual_seed(0)
            )
            terms.loss.mean().backward()
        counted = counter.get_total_flops() / batch
        assert parts.pixart_train_flops_per_sample(config.model, res, tokens) == pytest.approx(counted, rel=0.03)


def test_largest_batch_searches_downwards_on_out_of_memory(bench_modules, monkeypatch):
    _, parts, _ = bench_modules
    monkeypatch.setattr(parts, "free_memory", lambda: None)  # nothing to free here; it takes a garbage collection
    tried = []

    def fits(batch: int) -> None:
        tried.append(batch)
        if batch > 100:
            raise torch.OutOfMemoryError(f"{batch} does not fit")

    assert parts.largest_batch(512, fits) == (88, [512, 384, 288, 216, 160, 120])
    assert tried == [512, 384, 288, 216, 160, 120, 88]
    with pytest.raises(torch.OutOfMemoryError):
        parts.largest_batch(4, lambda b: fits(b * 1000))


def test_mfu_peaks_by_device_name(bench_modules):
    _, parts, _ = bench_modules
    assert parts.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert parts.peak_bf16_tflops("NVIDIA H200") == 989.0
    assert parts.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert parts.peak_bf16_tflops("Tesla T4") is None


def test_a_failing_part_is_its_row_and_the_others_still_report(bench_modules):
    suite, parts, _ = bench_modules
    wall = parts.Budget(60).start()

    def broken(budget, result):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")

    def fine(budget, result):
        budget.start()
        result.rows.append(parts.Row("ground", "m", "image embeddings", "batch 2", "images", 8, 0.5))

    results = {
        "caption": suite.run_part("caption", broken, 10, wall),
        "ground": suite.run_part("ground", fine, 10, wall),
        "features": parts.PartResult("features", 10, status="skipped: not in --parts"),
        "train": suite.run_part("train", fine, 10, parts.Budget(1)),
    }
    assert results["caption"].status == "failed: RuntimeError: CUDA error: an illegal memory access was encountered"
    assert results["ground"].status == "done"
    assert results["train"].status == "skipped: the suite's wall time was spent"
    table = [line for line in suite.markdown(results, "t", []).splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0].removeprefix("| ") for line in table[2:]] == list(PARTS)
    assert table[2].endswith("| failed: RuntimeError: CUDA error: an illegal memory access was encountered |")
    assert "| 16.0 images/s |" in table[3]


def test_refuses_without_a_gpu_in_one_sentence(tmp_path):
    done = _run(["--out", str(tmp_path / "report")], {"CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""
    said = done.stderr.strip()
    assert "\n" not in said and said.endswith(".") and said.count(". ") == 0, said
    assert "needs a CUDA GPU" in said and "--dry-run" in said
    assert not (tmp_path / "report").exists()


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine: make bench-gpu would install")
@pytest.mark.skipif(shutil.which("make") is None, reason="no make here")
def test_make_bench_gpu_refuses_without_a_gpu_before_installing_anything(tmp_path):
    done = subprocess.run(
        ["make", "-s", "bench-gpu", f"OUT={tmp_path / 'report'}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    said = done.stderr.strip()
    assert "\n" not in said and "make bench-gpu needs an NVIDIA GPU" in said, said
    assert not (tmp_path / "report").exists()
