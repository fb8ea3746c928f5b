"""Load any model transformers serves as image-text-to-text (LLaVA, Qwen2-VL, Idefics3, ...), by hub id or
directory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from captioner.errors import ModelNotAvailableError, UnsupportedModelError
from schemas.caption_config import ModelSettings

# The families the tests caption with; any other image-text-to-text model takes the same code path.
CAPTIONER_FAMILIES = "LLaVA, Qwen2-VL, SmolVLM / Idefics3"
OPEN_CLIP_CONFIG = "open_clip_config.json"
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


def _json_field(path: Path, name: str) -> str | None:
    """A top-level string field of a JSON file (None when the file or field is missing or unreadable)."""
    try:
        value = json.loads(path.read_text()).get(name)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def describe_model(model: str, model_type: str | None = None) -> str:
    """What ``model`` is, for a sentence: a diffusers pipeline or model, an open_clip model, a transformers
    model of ``model_type``, or a folder without a model config."""
    folder = Path(model)
    if (pipeline := _json_field(folder / "model_index.json", "_class_name")) is not None:
        return f"a diffusers pipeline ({pipeline})"
    if (folder / OPEN_CLIP_CONFIG).is_file():
        return "an open_clip (CLIP) model"
    if (diffusers_class := _json_field(folder / "config.json", "_class_name")) is not None:
        return f"a diffusers model ({diffusers_class})"
    if model_type is not None:
        return f"a {model_type} model"
    return "a folder without a transformers config.json" if folder.is_dir() else "a model without a model_type"


def not_a_captioner(model: str, model_type: str | None = None) -> UnsupportedModelError:
    """The sentence for a model that is no vision-language captioner, naming what it is and the families run."""
    return UnsupportedModelError(
        f"--model {model} is {describe_model(model, model_type)}, not a captioner model densecurate runs: pass a "
        f"vision-language model that transformers loads as image-text-to-text ({CAPTIONER_FAMILIES}), by hub id "
        "or folder"
    )


def _is_captioner(config: Any, trust_remote_code: bool) -> bool:
    """Whether transformers loads ``config``'s model as image-text-to-text (with remote code: when it says so)."""
    if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return True
    return trust_remote_code and "AutoModelForImageTextToText" in (getattr(config, "auto_map", None) or {})


def check_model_available(settings: ModelSettings) -> int | None:
    """Fail fast, before any worker starts, when the model's config cannot be found or is no captioner's;
    returns the model's context length in tokens (its language model's ``max_position_embeddings``; None when
    it has none)."""
    try:
        config = AutoConfig.from_pretrained(
            settings.model, revision=settings.revision, trust_remote_code=settings.trust_remote_code
        )
    except OSError as exc:
        raise _not_available(settings.model, exc) from exc
    except ValueError as exc:  # a config.json without model_type, or one of a model type transformers lacks
        if "trust_remote_code" in str(exc):
            raise UnsupportedModelError(
                f"--model {settings.model} runs its own code: pass --trust-remote-code if you trust it"
            ) from exc
        raise not_a_captioner(settings.model) from exc
    if not _is_captioner(config, settings.trust_remote_code):
        raise not_a_captioner(settings.model, config.model_type)
    text_config = getattr(config, "text_config", None) or config
    return getattr(text_config, "max_position_embeddings", None)


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
