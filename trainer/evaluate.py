"""`densecurate eval`: generate images for prompts with an exported pipeline and report their CLIP score."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from schemas.errors import ConfigError
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

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = PixArtAlphaPipeline.from_pretrained(pipeline_dir).to(device)
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
    scores = ClipScorer(clip_model, clip_pretrained, device).score(images, prompts)
    return [PromptScore(p, s) for p, s in zip(prompts, scores, strict=True)]
