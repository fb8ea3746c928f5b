"""Batched caption generation: left-padded batches, loader thread overlap, out-of-memory back-off."""

from __future__ import annotations

import hashlib
import io
import math
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from captioner.checks import CheckedCaption, check_caption
from captioner.loading import LoadedModel
from captioner.prompts import Prompt
from schemas.caption_config import GenerationSettings


@dataclass
class CaptionRequest:
    """One image to caption: its key, encoded bytes and alt text."""

    key: str
    image_bytes: bytes
    alt_text: str | None = None


@dataclass
class CaptionResult:
    """What came out for one key; ``status`` is ok or error (with ``error`` saying why)."""

    key: str
    status: str
    error: str | None = None
    raw_caption: str | None = None
    checks: CheckedCaption | None = None
    num_tokens: int = 0
    finish_reason: str | None = None
    seconds: float = 0.0
    prompt_id: str | None = None
    prompt: str | None = None


@dataclass
class PreparedBatch:
    """A batch decoded and run through the processor (on the loader thread), plus the failures."""

    requests: list[CaptionRequest]
    prompts: list[tuple[str, str]] = field(default_factory=list)
    inputs: Any = None
    failed: list[CaptionResult] = field(default_factory=list)


def _messages(prompt: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


def chat_prompt(processor: Any, prompt: str) -> str:
    """The model's chat template applied to one image and ``prompt``, ready for generation."""
    return processor.apply_chat_template(_messages(prompt), add_generation_prompt=True)


# Pixel caps of the families with dynamic resolution: 576 image tokens of 28x28 pixels, as many as LLaVA-1.5's.
FAMILY_MAX_IMAGE_PIXELS = {"qwen2_vl": 576 * 28 * 28, "qwen2_5_vl": 576 * 28 * 28}


def image_pixel_cap(max_image_pixels: int | None, model_type: str) -> int | None:
    """The cap images are downscaled to: the setting, else the model family's default (None: no cap)."""
    return FAMILY_MAX_IMAGE_PIXELS.get(model_type) if max_image_pixels is None else max_image_pixels


def open_image(req: CaptionRequest, max_pixels: int | None = None) -> Image.Image | CaptionResult:
    """The request's image in RGB, downscaled (aspect kept) to at most ``max_pixels`` pixels, or an error result
    when it cannot be decoded."""
    try:
        with Image.open(io.BytesIO(req.image_bytes)) as im:
            image = im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        return CaptionResult(req.key, "error", error=f"image_error: {type(exc).__name__}")
    width, height = image.size
    if max_pixels is None or width * height <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (width * height))
    return image.resize((max(1, int(width * scale)), max(1, int(height * scale))), Image.Resampling.BICUBIC)


def eos_token_ids(generation_eos: int | list[int] | None, tokenizer: Any) -> set[int]:
    """Every EOS id of the model's generation config (Qwen has two), else the tokenizer's."""
    eos = tokenizer.eos_token_id if generation_eos is None else generation_eos
    return set(eos) if isinstance(eos, list) else {eos}


def result_from_tokens(
    key: str,
    prompt: tuple[str, str],
    tokens: list[int],
    *,
    eos_ids: set[int],
    tokenizer: Any,
    settings: GenerationSettings,
    seconds: float,
) -> CaptionResult:
    """The result for one generated sequence: cut at the first EOS, decoded, checked."""
    end = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
    finish = "length" if end is None else "eos"
    kept = tokens if end is None else tokens[:end]
    text = tokenizer.decode(kept, skip_special_tokens=True)
    checks = check_caption(text, finish, ngram=settings.repetition_ngram, threshold=settings.repetition_threshold)
    prompt_id, prompt_text = prompt
    return CaptionResult(
        key=key,
        status="ok",
        raw_caption=text,
        checks=checks,
        num_tokens=len(kept),
        finish_reason=finish,
        seconds=seconds,
        prompt_id=prompt_id,
        prompt=prompt_text,
    )


def batch_seed(seed: int, first_key: str) -> int:
    """A sampling seed that depends only on the settings and the batch's first key (resumes reproduce)."""
    return (seed * 1_000_003 + int(hashlib.sha1(first_key.encode()).hexdigest()[:12], 16)) % (2**63)


class Captioner:
    """Captions images with one loaded model; ``batch_size`` shrinks on CUDA out-of-memory."""

    def __init__(self, loaded: LoadedModel, settings: GenerationSettings) -> None:
        self.loaded = loaded
        self.model_id, self.revision = loaded.model_id, loaded.revision
        self.settings = settings
        self.prompt = Prompt.parse(settings.prompt)
        self.batch_size = settings.batch_size
        tokenizer = loaded.processor.tokenizer
        self.eos_ids = eos_token_ids(loaded.model.generation_config.eos_token_id, tokenizer)
        self.max_pixels = image_pixel_cap(loaded.max_image_pixels, loaded.model.config.model_type)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)

    def prepare(self, requests: list[CaptionRequest]) -> PreparedBatch:
        """Decode images and build model inputs; undecodable images become error results."""
        batch = PreparedBatch(requests=[])
        images = []
        for req in requests:
            image = open_image(req, self.max_pixels)
            if isinstance(image, CaptionResult):
                batch.failed.append(image)
                continue
            images.append(image)
            batch.requests.append(req)
            batch.prompts.append(self.prompt.render(req.alt_text))
        if batch.requests:
            processor = self.loaded.processor
            texts = [chat_prompt(processor, p) for _, p in batch.prompts]
            batch.inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
        return batch

    def _generate_kwargs(self, first_key: str) -> dict[str, Any]:
        s = self.settings
        kwargs: dict[str, Any] = {
            "max_new_tokens": s.max_new_tokens,
            "do_sample": s.do_sample,
            "pad_token_id": self.pad_id,
        }
        if s.do_sample:
            kwargs.update(temperature=s.temperature, top_p=s.top_p)
            torch.manual_seed(batch_seed(s.seed, first_key))
        if s.ignore_eos:
            kwargs["min_new_tokens"] = s.max_new_tokens
        return kwargs

    @torch.inference_mode()
    def generate(self, batch: PreparedBatch) -> list[CaptionResult]:
        """Run one ``generate`` call for the prepared batch; returns results in request order."""
        if not batch.requests:
            return []
        loaded = self.loaded
        inputs = batch.inputs.to(loaded.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
        started = time.perf_counter()
        output = loaded.model.generate(**inputs, **self._generate_kwargs(batch.requests[0].key))
        seconds = (time.perf_counter() - started) / len(batch.requests)
        new_tokens = output[:, inputs["input_ids"].shape[1] :].tolist()
        tokenizer = loaded.processor.tokenizer
        return [
            result_from_tokens(
                req.key,
                prompt,
                tokens,
                eos_ids=self.eos_ids,
                tokenizer=tokenizer,
                settings=self.settings,
                seconds=seconds,
            )
            for req, prompt, tokens in zip(batch.requests, batch.prompts, new_tokens, strict=True)
        ]

    def caption(self, requests: Iterable[CaptionRequest]) -> Iterator[CaptionResult]:
        """Caption every request, in order of completion by batch; one result per request.

        The next batch is decoded and preprocessed on a loader thread while the current one
        generates. CUDA out-of-memory halves the batch size and retries the batch that failed.
        """
        source = iter(requests)
        backlog: deque[CaptionRequest] = deque()

        def take() -> list[CaptionRequest]:
            batch = []
            while len(batch) < self.batch_size:
                if backlog:
                    batch.append(backlog.popleft())
                else:
                    nxt = next(source, None)
                    if nxt is None:
                        break
                    batch.append(nxt)
            return batch

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="caption-loader") as loader:

            def submit() -> Future[PreparedBatch] | None:
                batch = take()
                return loader.submit(self.prepare, batch) if batch else None

            current = submit()
            while current is not None:
                prepared = current.result()
                upcoming = submit()
                try:
                    results = self.generate(prepared)
                except torch.OutOfMemoryError:
                    if len(prepared.requests) <= 1:
                        raise
                    self.batch_size = max(1, len(prepared.requests) // 2)
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    # Redo this batch and the one already prepared, both at the new size, in order.
                    ahead = upcoming.result() if upcoming is not None else PreparedBatch(requests=[])
                    backlog.extendleft(reversed(prepared.requests + ahead.requests))
                    yield from prepared.failed
                    yield from ahead.failed
                    current = submit()
                    continue
                yield from prepared.failed
                yield from results
                current = upcoming
