"""Load any model transformers serves as image-text-to-text (LLaVA, Qwen2-VL, Idefics3, ...), by hub id or
directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from captioner.errors import ModelNotAvailableError, UnsupportedModelError
from schemas.caption_config import ModelSettings

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(device: str) -> torch.device:
    """``auto``: the first CUDA GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA, fp32 on the CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


@dataclass
class LoadedModel:
    """A model in eval mode on its device, its processor, and where it came from."""

    model: Any
    processor: Any
    model_id: str
    revision: str
    device: torch.device
    dtype: torch.dtype
    max_image_pixels: int | None = None  # the setting; None: the family's default (``image_pixel_cap``)


def _not_available(model_id: str, exc: Exception) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"Model {model_id!r} is not available here: it is not a local directory and could not be loaded from "
        f"the Hugging Face cache or hub ({type(exc).__name__}); download it where there is network "
        f"(`hf download {model_id}`) or pass a local directory to --model."
    )


def check_model_available(settings: ModelSettings) -> None:
    """Fail fast, before any worker starts, when the model's config cannot be found."""
    try:
        AutoConfig.from_pretrained(
            settings.model, revision=settings.revision, trust_remote_code=settings.trust_remote_code
        )
    except OSError as exc:
        raise _not_available(settings.model, exc) from exc


def load_model(settings: ModelSettings) -> LoadedModel:
    """Load model and processor exactly as for a hub id; a local directory takes the same path."""
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    common = {"revision": settings.revision, "trust_remote_code": settings.trust_remote_code}
    try:
        processor = AutoProcessor.from_pretrained(settings.model, **common)
        model = AutoModelForImageTextToText.from_pretrained(
            settings.model, dtype=dtype, attn_implementation="sdpa", **common
        )
    except OSError as exc:
        raise _not_available(settings.model, exc) from exc
    model.to(device).eval()
    if getattr(processor, "tokenizer", None) is None or getattr(processor, "chat_template", None) is None:
        raise UnsupportedModelError(f"{settings.model!r} has no processor with a tokenizer and a chat template")
    processor.tokenizer.padding_side = "left"  # decoder-only batching: prompts end where generation starts
    revision = getattr(model.config, "_commit_hash", None) or settings.revision
    if revision is None and Path(settings.model).is_dir():
        revision = "local"
    return LoadedModel(
        model, processor, settings.model, revision or "unknown", device, dtype, settings.max_image_pixels
    )
