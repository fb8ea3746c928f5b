"""Images from a transformer through ``PixArtAlphaPipeline``: sample grids during training."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from schemas.atomic import make_folder
from schemas.train_config import TrainConfig


def load_pipeline(pipeline: str, transformer: Any, device: torch.device) -> Any:
    """The configured pipeline (VAE, T5, tokenizer, scheduler) around ``transformer``."""
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(pipeline, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)  # one bar per sample grid in the training log helps nobody
    return pipe.to(device)


def image_grid(images: list[Image.Image], columns: int = 4) -> Image.Image:
    """Images side by side, ``columns`` per row."""
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (w * min(columns, len(images)), h * rows), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % columns) * w, (i // columns) * h))
    return grid


@torch.inference_mode()
def save_sample_grid(config: TrainConfig, transformer: Any, out: Path) -> Path:
    """Generate the fixed prompts with a copy of ``transformer`` and save them as one PNG grid."""
    make_folder(out.parent)
    device = next(transformer.parameters()).device
    pipe = load_pipeline(config.pipeline, copy.deepcopy(transformer).eval(), device)
    images = pipe(
        list(config.sample_prompts),
        num_inference_steps=config.sample_steps,
        height=config.resolution,
        width=config.resolution,
        generator=torch.Generator(device="cpu").manual_seed(config.seed),
        use_resolution_binning=False,
        clean_caption=False,  # the prompts are plain text: no Beautiful Soup warning on every call
        max_sequence_length=config.data.max_tokens,
    ).images
    image_grid(images).save(out)
    return out
