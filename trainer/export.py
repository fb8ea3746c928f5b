"""`densecurate export`: a run's transformer (or its EMA) in a folder ``PixArtAlphaPipeline`` loads."""

from __future__ import annotations

from pathlib import Path

from schemas.errors import MissingInputError
from schemas.train_config import TrainConfig
from schemas.validation import load_yaml, validated
from trainer.checkpoint import TRANSFORMER, TRANSFORMER_EMA, load_newest_checkpoint
from trainer.run_guard import CONFIG_FILE


def export_pipeline(run_dir: Path, out: Path, *, ema: bool = False) -> Path:
    """Write the newest checkpoint whose transformer (or EMA) loads, with finite weights, together with the
    run's VAE, T5, tokenizer and a DPM-Solver scheduler to ``out``. Newer checkpoints that do not load are
    skipped with a printed line; ``UnusableCheckpointError`` when none loads."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    part = TRANSFORMER_EMA if ema else TRANSFORMER
    checkpoint = load_newest_checkpoint(
        run_dir,
        (part,),
        action="exporting",
        remedy="train again (densecurate train with --overwrite) to write one that does",
    )
    if checkpoint is None:
        raise MissingInputError(f"no checkpoint in {run_dir / 'checkpoints'}: train first")
    config = validated(
        TrainConfig,
        load_yaml((run_dir / CONFIG_FILE).read_text(), str(run_dir / CONFIG_FILE)),
        str(run_dir / CONFIG_FILE),
    )
    transformer = checkpoint.transformer_ema if ema else checkpoint.transformer
    pipe = PixArtAlphaPipeline.from_pretrained(config.pipeline, transformer=transformer)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(out)
    return out
