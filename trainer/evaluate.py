"""`densecurate eval`: generate images for prompts with an exported pipeline and report their CLIP score."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from schemas.errors import ConfigError, MissingInputError
from schemas.validation import read_input_text


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


def require_clip_model(model: str) -> None:
    """Refuse an open_clip model name that open_clip does not know, or a ``local-dir:`` folder that is missing."""
    import open_clip

    if model.startswith("local-dir:"):
        folder = Path(model.removeprefix("local-dir:"))
        if not folder.is_dir():
            raise MissingInputError(f"CLIP model folder {folder} does not exist (--clip-model local-dir:DIR)")
    elif not model.startswith("hf-hub:") and model not in open_clip.list_models():
        raise ConfigError(
            f"unknown open_clip model {model!r}: use a name of open_clip.list_models(), hf-hub:REPO or local-dir:DIR"
        )


class ClipScorer:
    """An open_clip model (any name and weights tag or path; ``local-dir:DIR`` for a folder)."""

    def __init__(self, model: str, pretrained: str | None, device: torch.device) -> None:
        import open_clip

        schema = model.startswith(("local-dir:", "hf-hub:"))
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model, pretrained=None if schema else pretrained, device=device
        )
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model)
        self.device = device

    @torch.inference_mode()
    def score(self, images: list, prompts: list[str]) -> list[float]:
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        image_emb = torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)
        text_emb = torch.nn.functional.normalize(
            self.model.encode_text(self.tokenizer(prompts).to(self.device)).float(), dim=-1
        )
        return (100 * (image_emb * text_emb).sum(dim=-1).clamp(min=0)).tolist()


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
        images_out.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            image.save(images_out / f"{i:04d}.png")
    try:
        scorer = ClipScorer(clip_model, clip_pretrained, device)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"cannot load the CLIP model {clip_model} (weights {clip_pretrained}): {_first_line(exc)}; pass "
            "--clip-model local-dir:DIR for a local open_clip folder"
        ) from exc
    scores = scorer.score(images, prompts)
    return [PromptScore(p, s) for p, s in zip(prompts, scores, strict=True)]
