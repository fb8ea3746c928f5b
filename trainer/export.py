"""`densecurate export`: a run's transformer (or its EMA) in a folder ``PixArtAlphaPipeline`` loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from schemas.atomic import make_folder
from schemas.errors import MissingInputError
from schemas.layout import TRAIN_CONFIG_FILE
from schemas.train_config import TrainConfig
from schemas.validation import load_yaml, validated
from trainer.checkpoint import TRANSFORMER, TRANSFORMER_EMA, load_newest_checkpoint

# The transformer sample sizes (latent sides) PixArtAlphaPipeline has aspect-ratio bins for: 256, 512 and 1024 px.
# A default call (use_resolution_binning=True) of a pipeline with any other sample size raises "Invalid sample size".
BINNED_SAMPLE_SIZES = frozenset({32, 64, 128})


@dataclass(frozen=True)
class ExportedPipeline:
    """Where the pipeline went, and the size it generates at."""

    out: Path
    sample_size: int  # the transformer's latent side
    vae_scale_factor: int

    @property
    def resolution(self) -> int:
        return self.sample_size * self.vae_scale_factor

    def call_hint(self) -> str | None:
        """How to call the pipeline when a default call would fail (None: a default call works)."""
        if self.sample_size in BINNED_SAMPLE_SIZES:
            return None
        px = self.resolution
        return (
            f"PixArtAlphaPipeline has resolution bins only for 256, 512 and 1024 px models, so call this {px} px "
            f"one with use_resolution_binning=False: pipe(prompt, use_resolution_binning=False) generates {px} x {px}"
        )


def export_pipeline(run_dir: Path, out: Path, *, ema: bool = True) -> ExportedPipeline:
    """Write the newest checkpoint whose transformer (or EMA) loads, with finite weights, together with the
    run's VAE, T5, tokenizer and a DPM-Solver scheduler to ``out``. Newer checkpoints that do not load are
    skipped with a printed line; ``UnusableCheckpointError`` when none loads. The result says how to call the
    pipeline when its size has no resolution bins."""
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
    saved = run_dir / TRAIN_CONFIG_FILE
    config = validated(TrainConfig, load_yaml(saved.read_text(), str(saved)), str(saved))
    transformer = checkpoint.transformer_ema if ema else checkpoint.transformer
    make_folder(out)
    pipe = PixArtAlphaPipeline.from_pretrained(config.pipeline, transformer=transformer)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(out)
    return ExportedPipeline(out, pipe.transformer.config.sample_size, pipe.vae_scale_factor)
