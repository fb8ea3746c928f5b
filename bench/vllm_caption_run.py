"""The vLLM half of bench/caption_bench.py, run by it in the vLLM environment (``make setup-vllm``).

    .venv-vllm/bin/python bench/vllm_caption_run.py '{"model": DIR, "images": [...], "workloads": {...}, ...}'

Writes JSON to the spec's ``out`` path: per workload, seconds, captions, generated tokens and the GPU memory vLLM took.
Each workload gives every request its own length (``max_tokens`` = ``min_tokens``), as captions of
natural lengths have; the engine is the caption stage's (``captioner.vllm_engine.VllmCaptioner``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from captioner.generation import CaptionRequest, chat_prompt, open_image
from captioner.vllm_engine import VllmCaptioner
from schemas.caption_config import GenerationSettings, ModelSettings, VllmSettings


def gpu_gib_used() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**30


def run_workload(captioner: VllmCaptioner, inputs: list[dict], lengths: list[int]) -> dict:
    from vllm import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, detokenize=False) for n in lengths]
    started = time.perf_counter()
    outputs = captioner.llm.generate(inputs, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"seconds": seconds, "captions": len(outputs), "tokens": tokens, "gpu_gib": gpu_gib_used()}


def main() -> None:
    spec = json.loads(sys.argv[1])
    model = ModelSettings(model=spec["model"], dtype=spec["dtype"])
    engine = VllmSettings(
        max_num_seqs=spec["max_num_seqs"], max_model_len=spec["max_model_len"], load_format=spec["load_format"]
    )
    captioner = VllmCaptioner(model, GenerationSettings(), engine)
    requests = [CaptionRequest(Path(p).stem, Path(p).read_bytes(), "a photo") for p in spec["images"]]
    prompt = chat_prompt(captioner.processor, captioner.prompt.render(None)[1])
    inputs = [{"prompt": prompt, "multi_modal_data": {"image": open_image(r)}} for r in requests]
    run_workload(captioner, inputs[:8], [8] * min(8, len(inputs)))  # warm-up
    results = {name: run_workload(captioner, inputs, lengths) for name, lengths in spec["workloads"].items()}
    Path(spec["out"]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
