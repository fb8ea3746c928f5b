"""A tiny open_clip CLIP trained for real, on the CPU, on synthetic shape scenes drawn with Pillow.

No pretrained CLIP weights are available to the tests, so this trains one (about half a minute on one core)
on captioned scenes of coloured circles, squares, triangles and stars, and saves it in open_clip's
``local-dir:`` format. Tests load it back the way a user's model is loaded and check CLIP-based grounding
honestly, on held-out scenes: per-noun grounding, caption ranking and near-duplicate image embeddings.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = ("red", "green", "blue", "yellow")
RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation, open_clip's default
STD = (0.26862954, 0.26130258, 0.27577711)
# A ModifiedResNet image tower (a ViT this small does not learn shapes in the time budget; a CNN does) that
# open_clip's preprocess feeds 40x40 pixels (the scenes are drawn at 64).
MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 40, "layers": [1, 1, 1, 1], "width": 12},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
PROMPTS = ("a photo of a {}.", "a {}.", "a picture of a {}.")  # the ensemble for per-noun grounding
# A noun is grounded when its score is this many stds above the images without it (held out: true positives
# >= 99%, true negatives ~98%).
Z_THRESHOLD = 2.5
# Image-embedding cosine above which two images are near-duplicates. Held out: JPEG (quality 60) and 4 px crop
# copies score 0.75-1.0 (about 99% of them >= 0.85), scenes without a shape kind in common 0.78 at most. Scenes that
# differ in some shapes or only in colours can score above it: the embedding is about content, as CLIP's is.
DUP_THRESHOLD = 0.8

Scene = list[tuple[str, str]]
_SUPERSAMPLE = 4  # shapes are drawn this much larger and downsampled, for anti-aliased edges
_RADIUS = (0.2, 0.28)  # circumradius range of the shapes, in image sizes (before crowded scenes shrink it)


def random_shapes(rng: random.Random) -> Scene:
    """1-3 (colour, shape) pairs of distinct shape kinds."""
    return [(rng.choice(COLOURS), kind) for kind in rng.sample(SHAPES, rng.randint(1, 3))]


def _polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of an upright square, triangle or star of circumradius ``r`` centred on (cx, cy)."""
    if kind == "star":
        radii, start = [r if i % 2 == 0 else 0.45 * r for i in range(10)], 0.0
    else:
        radii, start = [r] * (4 if kind == "square" else 3), (math.pi / 4 if kind == "square" else 0.0)
    step = 2 * math.pi / len(radii)
    return [(cx + q * math.sin(start + i * step), cy - q * math.cos(start + i * step)) for i, q in enumerate(radii)]


def _place(rng: random.Random, n: int, size: int) -> list[tuple[float, float, float]]:
    """``n`` (cx, cy, r) discs that overlap little (rejection sampling, shrinking if crowded), 5 px or more from
    the border so that a 4 px crop keeps every shape whole."""
    scale = 1.0
    while True:
        discs: list[tuple[float, float, float]] = []
        for _ in range(50 * n):
            r = rng.uniform(*_RADIUS) * size * scale
            cx, cy = rng.uniform(r + 5, size - r - 5), rng.uniform(r + 5, size - r - 5)
            if all(math.hypot(cx - x, cy - y) >= 0.9 * (r + q) for x, y, q in discs):
                discs.append((cx, cy, r))
                if len(discs) == n:
                    return discs
        scale *= 0.9


def draw_scene(
    rng: random.Random, shapes: Scene | None = None, size: int = 64, noisy: bool | None = None
) -> tuple[Image.Image, Scene]:
    """An RGB image of (colour, shape) pairs at random places and sizes on a plain or noisy grey background.

    ``shapes`` (random_shapes) and ``noisy`` are drawn at random when not given. Returns the image and the
    shapes drawn.
    """
    shapes = random_shapes(rng) if shapes is None else list(shapes)
    if noisy is None:
        noisy = rng.random() < 0.5
    base = np.array([rng.randint(30, 190)] * 3) + np.array([rng.randint(-15, 15) for _ in range(3)])
    pixels = np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    if noisy:
        pixels = pixels + np.random.default_rng(rng.getrandbits(32)).normal(0.0, 20.0, (size, size, 3))
    background = Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).convert("RGBA")
    layer = Image.new("RGBA", (size * _SUPERSAMPLE, size * _SUPERSAMPLE), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for (colour, kind), (cx, cy, r) in zip(shapes, _place(rng, len(shapes), size), strict=True):
        fill = (*(min(255, max(0, c + rng.randint(-20, 20))) for c in RGB[colour]), 255)
        cx, cy, r = cx * _SUPERSAMPLE, cy * _SUPERSAMPLE, r * _SUPERSAMPLE
        if kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_polygon(kind, cx, cy, r), fill=fill)
    layer = layer.resize((size, size), Image.Resampling.BOX)
    return Image.alpha_composite(background, layer).convert("RGB"), shapes


def _listing(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption_for(shapes: Scene, rng: random.Random, noisy: bool | None = None, colours: bool = True) -> str:
    """An English caption naming every shape (with its colour unless not ``colours``) in random order, in one
    of a few templates; it mentions the background sometimes when ``noisy`` is known.
    """
    phrases = [f"a {colour} {kind}" if colours else f"a {kind}" for colour, kind in rng.sample(shapes, len(shapes))]
    templates = ["{all}.", "A photo of {all}.", "A picture of {all}.", "There is {all}."]
    if noisy is not None:
        templates.append("{all} on a " + ("noisy" if noisy else "plain") + " background.")
    if len(phrases) > 1:
        templates.append("A photo of " + phrases[0] + ". There is also " + _listing(phrases[1:]) + ".")
    text = rng.choice(templates).format(all=_listing(phrases))
    return text[0].upper() + text[1:]


def image_transform() -> Callable[[Image.Image], torch.Tensor]:
    """open_clip's inference preprocess for MODEL_CFG (resize, centre crop, normalise), as ``local-dir:`` loads it."""
    import open_clip

    return open_clip.image_transform(MODEL_CFG["vision_cfg"]["image_size"], is_train=False, mean=MEAN, std=STD)


def encode_text_trimmed(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text`` on tokens cut after the last end-of-text token: the same result (the attention
    mask is causal and the end-of-text token is pooled), for a fraction of the work."""
    length = int(tokens.argmax(dim=-1).max()) + 1
    tokens = tokens[:, :length]
    x = model.token_embedding(tokens) + model.positional_embedding[:length]
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    return x[torch.arange(len(tokens)), tokens.argmax(dim=-1)] @ model.text_projection


def _random_crops(images: torch.Tensor, most: int = 4) -> torch.Tensor:
    """Each image (N, C, H, W) with 0-``most`` pixels cut off each side at random, resized back (bilinear)."""
    n, _, h, w = images.shape
    cut = torch.randint(0, most + 1, (n, 4)).float()  # left, top, right, bottom
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = (w - cut[:, 0] - cut[:, 2]) / w, (h - cut[:, 1] - cut[:, 3]) / h
    theta[:, 0, 2], theta[:, 1, 2] = (cut[:, 0] - cut[:, 2]) / w, (cut[:, 1] - cut[:, 3]) / h
    grid = F.affine_grid(theta, [n, 3, h, w], align_corners=False)
    return F.grid_sample(images, grid, padding_mode="border", align_corners=False)


def _masks(shapes: Scene) -> tuple[int, int]:
    """Bit masks of the (colour, shape) pairs and of the shape kinds in ``shapes``."""
    pairs = sum(1 << (COLOURS.index(colour) * len(SHAPES) + SHAPES.index(kind)) for colour, kind in shapes)
    return pairs, sum(1 << SHAPES.index(kind) for _, kind in shapes)


@dataclass(frozen=True)
class _Caption:
    """A training caption of ``named`` shapes. With colours it states the scene's exact (colour, shape) set;
    without, shape kinds that the scene shows, possibly among others. ``facts`` is the mask of either."""

    named: tuple[tuple[str, str], ...]
    coloured: bool
    text: str
    facts: int

    @classmethod
    def of(cls, named: Scene, coloured: bool, rng: random.Random) -> _Caption:
        text = caption_for(named, rng, colours=coloured)
        return cls(tuple(named), coloured, text, _masks(named)[0 if coloured else 1])


def _fits(scene_masks: torch.Tensor, captions: Sequence[_Caption]) -> torch.Tensor:
    """Whether each scene (rows; its _masks) fits each caption (columns), as 0/1."""
    facts = torch.tensor([c.facts for c in captions])
    coloured = torch.tensor([c.coloured for c in captions])
    pairs, kinds = scene_masks[:, :1], scene_masks[:, 1:]
    return torch.where(coloured, pairs == facts, (kinds & facts) == facts).float()


def _training_caption(scene: Scene, rng: random.Random, coloured: float) -> _Caption:
    """caption_for the scene with probability ``coloured``, else a colourless caption of some of its shapes."""
    if rng.random() < coloured:
        return _Caption.of(scene, True, rng)
    return _Caption.of(rng.sample(scene, rng.randint(1, len(scene))), False, rng)


def _soft_clip_loss(a: torch.Tensor, b: torch.Tensor, match: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy between unit embeddings ``a`` and ``b``, where every pair that ``match``
    marks is a positive (the targets spread evenly over them); each row and column has one."""
    logits = scale * a @ b.T
    rows = F.cross_entropy(logits, match / match.sum(1, keepdim=True))
    columns = F.cross_entropy(logits.T, (match / match.sum(0, keepdim=True)).T)
    return (rows + columns) / 2


def train_shapes_clip(
    out: Path,
    *,
    seed: int = 0,
    steps: int = 320,
    text_warmup: int = 60,
    batch_size: int = 64,
    pool: int = 1536,
    threads: int = 1,
) -> Path:
    """Train a tiny open_clip CLIP on synthetic captioned scenes; save it to ``out`` (``local-dir:OUT``).

    1. ``text_warmup`` steps train the text tower alone to match paraphrases (two captions of the same facts),
       so that it tells shape nouns apart: from a random text tower the image tower gets no signal about
       shapes, and the two settle on colours only.
    2. ``steps`` steps of CLIP's contrastive loss, image against caption, where every caption that fits an
       image counts as its positive. The text tower stays locked for the first half (else it collapses onto
       the still uninformative image embeddings) and then tunes at a twentieth of the image tower's rate.
       The first half's captions are mostly colourless (shapes are hard to see, colours easy), the second
       half's are coloured half of the time. Batches come from a pool of scenes (half of them JPEG-compressed)
       put through the model's own preprocess once, with random crops and fresh captions each step.

    The logit scale stays at 10: a learned one drifts up and leaves the embeddings of different scenes close.
    One thread by default: deterministic given ``seed``, and quick even when other processes share the
    cores. Returns ``out``.
    """
    import open_clip
    from safetensors.torch import save_file

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rng = random.Random(seed)
        torch.manual_seed(seed)
        model = open_clip.CLIP(**MODEL_CFG).to(memory_format=torch.channels_last)
        model.logit_scale.requires_grad_(False).fill_(math.log(10))
        tokenizer = open_clip.get_tokenizer("ViT-B-32")  # the bundled SimpleTokenizer, as local-dir: loads it
        model.train()
        token_cache: dict[str, torch.Tensor] = {}

        def encode_captions(captions: Sequence[_Caption]) -> torch.Tensor:
            for c in captions:
                if c.text not in token_cache:
                    token_cache[c.text] = tokenizer([c.text])[0]
            tokens = torch.stack([token_cache[c.text] for c in captions])
            return F.normalize(encode_text_trimmed(model, tokens), dim=-1)

        text_params = [p for name, p in model.named_parameters() if p.requires_grad and not name.startswith("visual.")]
        optimizer = torch.optim.AdamW(text_params, lr=3e-3, weight_decay=0.05, fused=True)
        for _ in range(text_warmup):
            first = [_training_caption(random_shapes(rng), rng, 0.15) for _ in range(batch_size)]
            second = [_Caption.of(list(c.named), c.coloured, rng) for c in first]
            keys = torch.tensor([c.facts + (c.coloured << 16) for c in first])
            match = (keys[:, None] == keys[None, :]).float()
            loss = _soft_clip_loss(encode_captions(first), encode_captions(second), match, model.logit_scale.exp())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        preprocess = image_transform()
        scenes, masks, pixels = [], [], []
        for _ in range(pool):
            image, shapes = draw_scene(rng)
            scenes.append(shapes)
            masks.append(_masks(shapes))
            pixels.append(preprocess(jpeg(image, rng.randint(40, 90)) if rng.random() < 0.5 else image))
        pixels_t, masks_t = torch.stack(pixels), torch.tensor(masks)
        image_params = [p for name, p in model.named_parameters() if name.startswith("visual.")]
        optimizer = torch.optim.AdamW(
            [{"params": image_params, "lr": 6e-3}, {"params": text_params, "lr": 3e-4}], weight_decay=0.05, fused=True
        )
        warmup = max(1, steps // 10)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
        )
        for step in range(steps):
            second_half = step >= steps // 2
            for p in text_params:
                p.requires_grad_(second_half)
            batch = rng.sample(range(pool), batch_size)
            captions = [_training_caption(scenes[i], rng, 0.5 if second_half else 0.1) for i in batch]
            crops = _random_crops(pixels_t[batch]).contiguous(memory_format=torch.channels_last)
            images = F.normalize(model.encode_image(crops), dim=-1)
            loss = _soft_clip_loss(
                images, encode_captions(captions), _fits(masks_t[batch], captions), model.logit_scale.exp()
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    finally:
        torch.set_num_threads(previous_threads)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    config = {"model_cfg": MODEL_CFG, "preprocess_cfg": {"mean": list(MEAN), "std": list(STD)}}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    return out


_TRAINED: dict[int, Path] = {}


def trained_shapes_clip(root: Path, seed: int = 0) -> Path:
    """The model of ``seed``, trained under ``root`` on the first call in this process and reused after."""
    if seed not in _TRAINED:
        _TRAINED[seed] = train_shapes_clip(root / f"shapes-clip-{seed}", seed=seed)
    return _TRAINED[seed]


@dataclass
class ShapesClip:
    """An open_clip model loaded through ``open_clip.create_model_and_transforms``, with its preprocess and
    tokenizer."""

    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]

    @classmethod
    def load(cls, name: str) -> ShapesClip:
        """Load any open_clip model name, e.g. ``local-dir:DIR``."""
        import open_clip

        model, _, preprocess = open_clip.create_model_and_transforms(name)
        return cls(model.eval(), preprocess, open_clip.get_tokenizer(name))

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Unit image embeddings, one row per image."""
        return self.model.encode_image(torch.stack([self.preprocess(im) for im in images]), normalize=True)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit text embeddings, one row per text."""
        return self.model.encode_text(self.tokenizer(list(texts)), normalize=True)

    def embed_nouns(self, nouns: Sequence[str] = SHAPES) -> torch.Tensor:
        """One unit embedding per noun: the renormalised mean of its PROMPTS' embeddings."""
        prompts = self.embed_texts([p.format(noun) for noun in nouns for p in PROMPTS])
        return F.normalize(prompts.view(len(nouns), len(PROMPTS), -1).mean(dim=1), dim=-1)

    def noun_scores(self, images: Sequence[Image.Image], nouns: Sequence[str] = SHAPES) -> torch.Tensor:
        """Cosine of each image (rows) to each noun's prompt ensemble (columns)."""
        return self.embed_images(images) @ self.embed_nouns(nouns).T


def held_out_scenes(seed: int, n: int) -> list[tuple[Image.Image, Scene]]:
    """``n`` random scenes from a stream that training never draws from (its own seed space)."""
    rng = random.Random(f"held-out-{seed}")
    return [draw_scene(rng) for _ in range(n)]


def shapes_present(scenes: Sequence[Scene]) -> torch.Tensor:
    """Whether each scene (rows) shows each of SHAPES (columns)."""
    return torch.tensor([[kind in {k for _, k in scene} for kind in SHAPES] for scene in scenes])


def calibrate(clip: ShapesClip, scenes: Sequence[tuple[Image.Image, Scene]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per noun of SHAPES, the mean and std of the noun scores of the images that do not show it."""
    scores = clip.noun_scores([image for image, _ in scenes])
    absent = ~shapes_present([scene for _, scene in scenes])
    mean = torch.stack([scores[absent[:, j], j].mean() for j in range(len(SHAPES))])
    std = torch.stack([scores[absent[:, j], j].std() for j in range(len(SHAPES))])
    return mean, std


def grounding_rates(
    clip: ShapesClip,
    calibration: Sequence[tuple[Image.Image, Scene]],
    scenes: Sequence[tuple[Image.Image, Scene]],
    z_threshold: float = Z_THRESHOLD,
) -> tuple[float, float]:
    """(true-positive rate on drawn shapes, true-negative rate on absent ones) of z-scored noun grounding.

    Calibrated on ``calibration``, judged on ``scenes``: a noun is grounded when its z-score >= ``z_threshold``.
    """
    mean, std = calibrate(clip, calibration)
    grounded = (clip.noun_scores([image for image, _ in scenes]) - mean) / std >= z_threshold
    present = shapes_present([scene for _, scene in scenes])
    return grounded[present].float().mean().item(), (~grounded[~present]).float().mean().item()


def swap_one(shapes: Scene, rng: random.Random) -> Scene:
    """``shapes`` with one of them replaced by a shape kind that is not drawn, in a random colour."""
    absent = [kind for kind in SHAPES if kind not in {k for _, k in shapes}]
    wrong = list(shapes)
    wrong[rng.randrange(len(wrong))] = (rng.choice(COLOURS), rng.choice(absent))
    return wrong


def caption_ranking_accuracy(clip: ShapesClip, scenes: Sequence[tuple[Image.Image, Scene]], seed: int = 0) -> float:
    """How often an image's true caption (caption_for) scores above a wrong one: half the time a caption of
    another scene with other shapes, else of the true shapes with one swapped for an absent kind (swap_one)."""
    rng = random.Random(seed)
    true, wrong = [], []
    for _, shapes in scenes:
        if rng.random() < 0.5:
            other = next(s for _, s in rng.sample(scenes, len(scenes)) if set(s) != set(shapes))
        else:
            other = swap_one(shapes, rng)
        true.append(caption_for(shapes, rng))
        wrong.append(caption_for(other, rng))
    images = clip.embed_images([image for image, _ in scenes])
    right = (images * clip.embed_texts(true)).sum(-1) > (images * clip.embed_texts(wrong)).sum(-1)
    return right.float().mean().item()


def jpeg(image: Image.Image, quality: int = 60) -> Image.Image:
    """``image`` saved as JPEG at ``quality`` and decoded again."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def crop(image: Image.Image, pixels: int = 4) -> Image.Image:
    """``image`` with ``pixels`` cut off each side, resized back to its size."""
    w, h = image.size
    return image.resize((w, h), Image.Resampling.BICUBIC, box=(pixels, pixels, w - pixels, h - pixels))


def duplicate_cosines(clip: ShapesClip, scenes: Sequence[tuple[Image.Image, Scene]]) -> dict[str, torch.Tensor]:
    """Image-embedding cosines of each image to its JPEG copy ("jpeg") and its cropped copy ("crop"), and of
    every pair of scenes whose (colour, shape) sets differ ("distinct")."""
    images = [image for image, _ in scenes]
    original = clip.embed_images(images)
    pairs = original @ original.T
    sets = [set(shapes) for _, shapes in scenes]
    distinct = [pairs[i, j] for i in range(len(sets)) for j in range(i + 1, len(sets)) if sets[i] != sets[j]]
    return {
        "jpeg": (original * clip.embed_images([jpeg(im) for im in images])).sum(-1),
        "crop": (original * clip.embed_images([crop(im) for im in images])).sum(-1),
        "distinct": torch.stack(distinct),
    }
