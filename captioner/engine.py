"""The caption engines behind one interface: ``transformers`` (static batches) and ``vllm`` (continuous batching)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

from captioner.generation import CaptionRequest, CaptionResult
from schemas.caption_config import CaptionConfig


class CaptionEngine(Protocol):
    """Captions requests with one model replica; ``model_id`` and ``revision`` go into every row."""

    model_id: str
    revision: str

    def caption(self, requests: Iterable[CaptionRequest]) -> Iterator[CaptionResult]:
        """One result per request (ok, or error with the reason)."""
        ...


def make_engine(config: CaptionConfig) -> CaptionEngine:
    """Load the configured engine with its model (vLLM only in the vLLM environment)."""
    if config.engine == "vllm":
        from captioner.vllm_engine import VllmCaptioner

        return VllmCaptioner(config.model, config.generation, config.vllm)
    from captioner.generation import Captioner
    from captioner.loading import load_model

    return Captioner(load_model(config.model), config.generation)
