"""The vLLM half of bench/gpu_suite.py's caption part, run by it in the vLLM environment (``make setup-vllm``).

    .venv-vllm/bin/python bench/gpu_suite_vllm.py SPEC.json

SPEC: ``models`` (each: ``name``, ``folder`` with saved weights, ``workloads``: name -> caption lengths,
``budget_s``), ``images`` (photos to caption), ``dtype``, ``max_num_seqs``, ``max_model_len``,
``gpu_memory_utilization`` and ``out``. Each model is started with the caption stage's engine
(``captioner.vllm_engine.VllmCaptioner``), warmed up, then each workload is kept ``2 x max_num_seqs``
requests deep until its captions are done or its share of the model's budget is spent (the requests
still running are then aborted). Every request has its own image (the photos, one pixel changed per
request), so no prefix or processor cache reuses an earlier request's work. ``out`` gets, per model, the
start-up seconds and per workload the seconds, captions, tokens, GPU memory held and a status; it is
rewritten after every workload, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from captioner.generation import chat_prompt
from captioner.vllm_engine import VllmCaptioner
from schemas.caption_config import GenerationSettings, ModelSettings, VllmSettings


def gpu_gib_held() -> float | None:
    """GPU memory in use on the device (every process's: vLLM reserves its share up front)."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**30


def unique_image(base: Image.Image, index: int, max_pixels: int | None) -> Image.Image:
    """``base`` with its first pixel set from ``index`` (one image per request), scaled as the engine would."""
    image = base.copy()
    image.putpixel((0, 0), (index & 255, (index >> 8) & 255, (index >> 16) & 255))
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        scale = (max_pixels / (width * height)) ** 0.5
        image = image.resize((max(1, int(width * scale)), max(1, int(height * scale))), Image.Resampling.BICUBIC)
    return image


def run_workload(
    captioner: VllmCaptioner,
    prompt: str,
    bases: list[Image.Image],
    lengths: list[int],
    budget_s: float,
    depth: int,
    first_image: int,
) -> dict[str, Any]:
    """Caption ``len(lengths)`` requests (request i exactly ``lengths[i]`` tokens, image ``first_image + i``),
    at most ``depth`` queued."""
    from vllm import SamplingParams

    llm, engine = captioner.llm, captioner.llm.llm_engine
    outstanding: dict[str, str] = {}  # the id outputs carry -> the id enqueue returned
    captions = tokens = queued = 0
    started = time.perf_counter()
    while True:
        if queued < len(lengths) and len(outstanding) < depth:
            chunk = range(queued, min(len(lengths), queued + depth // 2))
            inputs = [
                {
                    "prompt": prompt,
                    "multi_modal_data": {
                        "image": unique_image(bases[i % len(bases)], first_image + i, captioner.max_pixels)
                    },
                }
                for i in chunk
            ]
            params = [
                SamplingParams(temperature=0.0, max_tokens=lengths[i], min_tokens=lengths[i], detokenize=False)
                for i in chunk
            ]
            for request_id in llm.enqueue(inputs, params, use_tqdm=False):
                outstanding[request_id.rsplit("-", 1)[0]] = request_id
            queued = chunk.stop
        if not outstanding or time.perf_counter() - started >= budget_s:
            break
        for output in engine.step():
            if output.finished and outstanding.pop(output.request_id, None) is not None:
                captions += 1
                tokens += len(output.outputs[0].token_ids)
    seconds = time.perf_counter() - started
    held = gpu_gib_held()
    if outstanding:
        engine.abort_request(list(outstanding.values()), internal=True)
    status = "done" if captions == len(lengths) else f"budget spent after {captions:,} caption{'s' * (captions != 1)}"
    return {"seconds": seconds, "captions": captions, "tokens": tokens, "gpu_gib": held, "status": status}


def run_model(
    spec: dict[str, Any], model: dict[str, Any], bases: list[Image.Image], save: Callable[[dict[str, Any]], None]
) -> None:
    """Start the engine for one model, warm it up and run its workloads, saving the results after each."""
    started = time.perf_counter()
    captioner = VllmCaptioner(
        ModelSettings(model=model["folder"], dtype=spec["dtype"]),
        GenerationSettings(),
        VllmSettings(
            max_num_seqs=spec["max_num_seqs"],
            max_model_len=spec["max_model_len"],
            gpu_memory_utilization=spec["gpu_memory_utilization"],
        ),
    )
    prompt = chat_prompt(captioner.processor, captioner.prompt.render(None)[1])
    warm_up = [8] * 8
    run_workload(captioner, prompt, bases, warm_up, float("inf"), 2 * len(warm_up), 0)
    result: dict[str, Any] = {"startup_s": time.perf_counter() - started, "workloads": {}}
    save(result)
    measured = time.perf_counter()
    workloads, first_image = model["workloads"], len(warm_up)
    for i, (name, lengths) in enumerate(workloads.items()):
        share = (model["budget_s"] - (time.perf_counter() - measured)) / (len(workloads) - i)
        depth = 2 * spec["max_num_seqs"]
        result["workloads"][name] = run_workload(captioner, prompt, bases, lengths, share, depth, first_image)
        save(result)
        first_image += len(lengths)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    bases = [Image.open(p).convert("RGB") for p in spec["images"]]
    results: dict[str, Any] = {}
    out = Path(spec["out"])
    for model in spec["models"]:

        def save(result: dict[str, Any], name: str = model["name"]) -> None:
            results[name] = result
            out.write_text(json.dumps(results))

        try:
            run_model(spec, model, bases, save)
        except Exception as exc:  # one model's failure is its row's; the next model still runs
            said = str(exc).strip().splitlines()
            error = f"{type(exc).__name__}: {said[0] if said else 'no message'}"[:300]
            save({**results.get(model["name"], {}), "error": error})
        gc.collect()


if __name__ == "__main__":
    main()
