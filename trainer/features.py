"""Precomputed training features, as PixArt-α's public code makes them: VAE posterior and T5 states.

Per sample: the VAE posterior mean and std (2 x 4 = 8 channels at 1/8 resolution) and the T5 last hidden
states of the caption's valid tokens (at most 120), both fp16, in one safetensors blob; a sample with several
captions (``KEY.captions.json``) has the states of each further caption as ``t5_1``, ``t5_2``, ... Training
draws a fresh latent ``(mean + std * noise) * scaling_factor`` at load time.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

FEATURE_EXT = "feat.safetensors"
NULL_CAPTION_FILE = "null_caption.safetensors"  # the empty caption's T5 states, for caption dropout


def load_component(load: Callable[..., Any], source: str, subfolder: str, **kwargs: Any) -> Any:
    """``load`` from ``source/subfolder`` when it exists (a pipeline folder or repo), else from ``source``."""
    local = Path(source)
    if local.is_dir():
        where = {"subfolder": subfolder} if (local / subfolder).is_dir() else {}
        return load(source, **where, **kwargs)
    try:
        return load(source, subfolder=subfolder, **kwargs)
    except OSError:
        return load(source, **kwargs)


def from_pretrained_component(cls: Any, source: str, subfolder: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` of ``source/subfolder`` when it exists, else of ``source``."""
    return load_component(cls.from_pretrained, source, subfolder, **kwargs)


def image_tensor(jpeg: bytes, resolution: int) -> torch.Tensor:
    """A JPEG to a ``3 x R x R`` tensor in [-1, 1]: short side resized to R, centre crop."""
    with Image.open(io.BytesIO(jpeg)) as im:
        im = im.convert("RGB")
        scale = resolution / min(im.size)
        im = im.resize(
            (max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale))),
            Image.Resampling.BICUBIC,
        )
        left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1.0


@dataclass
class Features:
    """One sample's features: ``vae`` (8 x h x w: mean then std), ``t5`` (tokens x dim) and, for a sample with
    several captions, ``extra_t5``: the states of the second, third, ... caption."""

    vae: torch.Tensor
    t5: torch.Tensor
    extra_t5: list[torch.Tensor] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        extra = {f"t5_{i}": t.contiguous() for i, t in enumerate(self.extra_t5, start=1)}
        return save_tensors({"vae": self.vae.contiguous(), "t5": self.t5.contiguous(), **extra})

    @classmethod
    def from_bytes(cls, data: bytes) -> Features:
        tensors = load_tensors(data)
        extra = [tensors[f"t5_{i}"] for i in range(1, len(tensors)) if f"t5_{i}" in tensors]
        return cls(vae=tensors["vae"], t5=tensors["t5"], extra_t5=extra)

    def caption_states(self, index: int) -> torch.Tensor:
        """The T5 states of caption ``index`` (0: ``t5``)."""
        return self.t5 if index == 0 else self.extra_t5[index - 1]

    def nonfinite(self) -> list[str]:
        """The names of the tensors that hold NaN or infinite values (none for sound features)."""
        named = {"vae": self.vae, "t5": self.t5, **{f"t5_{i}": t for i, t in enumerate(self.extra_t5, start=1)}}
        return [name for name, tensor in named.items() if not bool(torch.isfinite(tensor).all())]


def encoder_dtype(device: torch.device) -> torch.dtype:
    """The VAE's and T5's dtype: bf16 on a GPU that has it (T5 overflows in fp16), fp16 on an older GPU,
    fp32 on the CPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class FeatureEncoder:
    """The frozen VAE and T5 encoder (with its tokenizer), loaded as from a hub id or a folder."""

    def __init__(
        self, vae: str, text_encoder: str, *, resolution: int = 256, max_tokens: int = 120, device: str = "auto"
    ) -> None:
        from diffusers import AutoencoderKL
        from transformers import AutoTokenizer, T5EncoderModel

        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        self.dtype = encoder_dtype(self.device)
        self.resolution, self.max_tokens = resolution, max_tokens
        self.vae = from_pretrained_component(AutoencoderKL, vae, "vae", torch_dtype=self.dtype).to(self.device).eval()
        self.text_encoder = (
            from_pretrained_component(T5EncoderModel, text_encoder, "text_encoder", dtype=self.dtype)
            .to(self.device)
            .eval()
        )
        self.tokenizer = from_pretrained_component(AutoTokenizer, text_encoder, "tokenizer")

    @torch.inference_mode()
    def encode_images(self, jpegs: list[bytes]) -> torch.Tensor:
        """``B x 8 x R/8 x R/8``: the posterior mean and std, fp16."""
        pixels = torch.stack([image_tensor(j, self.resolution) for j in jpegs]).to(self.device, self.dtype)
        posterior = self.vae.encode(pixels).latent_dist
        return torch.cat([posterior.mean, posterior.std], dim=1).to(torch.float16).cpu()

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> list[torch.Tensor]:
        """Per text, the T5 states of its valid tokens (at most ``max_tokens``), fp16."""
        tokens = self.tokenizer(
            texts, max_length=self.max_tokens, padding="max_length", truncation=True, return_tensors="pt"
        ).to(self.device)
        states = self.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        lengths = tokens.attention_mask.sum(dim=1).tolist()
        return [s[:n].to(torch.float16).cpu() for s, n in zip(states, lengths, strict=True)]

    @torch.no_grad()  # not inference_mode: the outputs feed a graph that autograd tracks
    def encode_for_training(
        self, images: torch.Tensor, captions: list[str], noise: torch.Tensor, scaling_factor: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Online encoding of a batch: ``(latents, T5 states, mask)`` in fp32, the latents drawn with ``noise``."""
        posterior = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
        latents = (posterior.mean.float() + posterior.std.float() * noise.to(self.device)) * scaling_factor
        tokens = self.tokenizer(
            captions, max_length=self.max_tokens, padding="max_length", truncation=True, return_tensors="pt"
        ).to(self.device)
        states = self.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        return latents, states.float(), tokens.attention_mask

    def encode(self, jpegs: list[bytes], texts: list[str]) -> list[Features]:
        vae = self.encode_images(jpegs)
        return [Features(vae=v, t5=t) for v, t in zip(vae, self.encode_texts(texts), strict=True)]
