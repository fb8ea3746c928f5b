"""`densecurate export`: a run's transformer (or its EMA) in a folder ``PixArtAlphaPipeline`` loads."""

from __future__ import annotations

from pathlib import Path

import yaml

from schemas.errors import MissingInputError
from schemas.train_config import TrainConfig
from trainer.checkpoint import latest_checkpoint
from trainer.run_guard import CONFIG_FILE


def export_pipeline(run_dir: Path, out: Path, *, ema: bool = False) -> Path:
    """Write the latest checkpoint with the run's VAE, T5, tokenizer and a DPM-Solver scheduler to ``out``."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise MissingInputError(f"no checkpoint in {run_dir / 'checkpoints'}: train first")
    config = TrainConfig.model_validate(yaml.safe_load((run_dir / CONFIG_FILE).read_text()))
    transformer = PixArtTransformer2DModel.from_pretrained(checkpoint / ("transformer_ema" if ema else "transformer"))
    pipe = PixArtAlphaPipeline.from_pretrained(config.pipeline, transformer=transformer)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(out)
    return out
