"""`densecurate eval`: generate images for prompts with an exported pipeline and report their CLIP score."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from schemas.atomic import make_folder
from schemas.errors import ConfigError, MissingInputError
from schemas.validation import read_input_text
from trainer.clip_model import ClipModel, require_clip_model


@dataclass(frozen=True)
class PromptScore:
    prompt: str
    clip_score: float  # 100 * max(cos(image, text), 0), as in Hessel et al. (2021)


def read_prompts(path: Path) -> list[str]:
    """One prompt per non-empty line."""
    prompts = [line.strip() for line in read_input_text(path, "prompts file").splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"{path} holds no prompts (one per line)")
    return prompts


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def require_pipeline_folder(pipeline_dir: Path) -> None:
    """Refuse a pipeline folder that does not exist or holds no exported pipeline (``model_index.json``)."""
    folder = Path(pipeline_dir)
    if not folder.is_dir():
        raise MissingInputError(
            f"pipeline folder {folder} does not exist: export one with `densecurate export RUN --out {folder}`"
        )
    if not (folder / "model_index.json").is_file():
        raise MissingInputError(
            f"{folder} holds no exported pipeline (no model_index.json): export one with "
            f"`densecurate export RUN --out {folder}`"
        )


def evaluate(
    pipeline_dir: Path,
    prompts: list[str],
    *,
    clip_model: str,
    clip_pretrained: str | None,
    resolution: int,
    steps: int,
    seed: int,
    images_out: Path | None = None,
) -> list[PromptScore]:
    """CLIP score of one generated image per prompt (seeded), optionally saving the images."""
    from diffusers import PixArtAlphaPipeline

    require_pipeline_folder(pipeline_dir)
    require_clip_model(clip_model)
    if images_out is not None:
        make_folder(images_out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        pipe = PixArtAlphaPipeline.from_pretrained(pipeline_dir).to(device)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the pipeline in {pipeline_dir}: {_first_line(exc)}") from exc
    images = pipe(
        prompts,
        num_inference_steps=steps,
        height=resolution,
        width=resolution,
        generator=torch.Generator(device="cpu").manual_seed(seed),
        use_resolution_binning=False,
    ).images
    if images_out is not None:
        for i, image in enumerate(images):
            image.save(images_out / f"{i:04d}.png")
    clip = ClipModel(clip_model, clip_pretrained, device)
    cosines = (clip.encode_images(images) * clip.encode_texts(prompts)).sum(dim=-1)
    return [PromptScore(p, float(100 * max(c, 0.0))) for p, c in zip(prompts, cosines.tolist(), strict=True)]
