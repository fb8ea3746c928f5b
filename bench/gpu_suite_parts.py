"""What the parts of bench/gpu_suite.py share (preset, budget, rows) and the parts that run in its process:
ground (CLIP), features (VAE and T5) and train (PixArt-α). The caption part is bench/gpu_suite_caption.py.

Every model is a full-size architecture with random weights built from its config on the device (the dry
run's preset: the tiny models of the tests, on the CPU); nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Dense bf16 peaks (TFLOP/s) by a substring of torch.cuda.get_device_name, the more specific names first.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0), ("H200", 989.0))
TIMESTEP_CHANNELS = 256  # PixArt's sinusoidal timestep features, projected to the model width
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")  # scikit-image's
NOUNS = ("cat", "sofa", "window", "rocket", "cup", "saucer", "astronaut", "flag", "coin", "camera", "tripod", "galaxy")


@dataclass(frozen=True)
class Preset:
    """Sizes and budgets of one suite run: ``GPU`` (full-size models) or ``DRY`` (tiny models on the CPU)."""

    dry: bool
    wall_s: float  # the whole suite; a part that would start later is skipped
    budgets: dict[str, float]  # seconds of measurement per part
    # caption
    caption_archs: tuple[str, ...]  # vLLM's, in the order they run; LLaVA also runs in transformers
    new_tokens: int
    natural_cap: int  # longest natural caption, in tokens
    max_model_len: int
    max_num_seqs: int
    hf_batches: tuple[int, ...]  # transformers' batch sizes, tried upwards until one runs out of memory
    hf_batches_per_row: int
    vllm_captions: int  # per workload and model
    vllm_start_s: float  # what one vLLM start-up may take at most
    # ground
    clip_batches: tuple[int, ...]
    clip_images: int
    clip_prompts: int
    # features and train
    resolution: int
    vae_batch: int
    vae_images: int
    t5_batch: int
    t5_captions: int
    t5_tokens: int
    train_start_batch: int
    train_steps: int


GPU = Preset(
    dry=False,
    wall_s=540.0,
    budgets={"caption": 180.0, "ground": 25.0, "features": 30.0, "train": 75.0},
    caption_archs=("llava-1.5-7b", "smolvlm-256m", "qwen2-vl-7b"),
    new_tokens=200,
    natural_cap=324,  # max_model_len minus the 700 tokens LLaVA's prompt may take
    max_model_len=1024,
    max_num_seqs=256,
    hf_batches=(32, 64, 128, 256),
    hf_batches_per_row=1,
    vllm_captions=512,
    vllm_start_s=240.0,
    clip_batches=(64, 256),
    clip_images=4096,
    clip_prompts=8192,
    resolution=256,
    vae_batch=64,
    vae_images=2048,
    t5_batch=128,
    t5_captions=1024,
    t5_tokens=120,
    train_start_batch=512,
    train_steps=10,
)

DRY = Preset(
    dry=True,
    wall_s=110.0,
    budgets={"caption": 60.0, "ground": 8.0, "features": 8.0, "train": 12.0},
    caption_archs=("llava-1.5-7b", "smolvlm-256m", "qwen2-vl-7b"),
    new_tokens=16,
    natural_cap=64,
    max_model_len=512,
    max_num_seqs=16,
    hf_batches=(2, 4),
    hf_batches_per_row=2,
    vllm_captions=16,
    vllm_start_s=90.0,
    clip_batches=(16, 32),
    clip_images=64,
    clip_prompts=256,
    resolution=64,
    vae_batch=8,
    vae_images=32,
    t5_batch=16,
    t5_captions=64,
    t5_tokens=120,
    train_start_batch=8,
    train_steps=3,
)


class Budget:
    """Seconds one measurement may take, counted from ``start`` (models are built before)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started: float | None = None

    def start(self) -> Budget:
        self.started = time.perf_counter()
        return self

    def used(self) -> float:
        return 0.0 if self.started is None else time.perf_counter() - self.started

    def left(self) -> float:
        return self.seconds - self.used()

    @property
    def spent(self) -> bool:
        return self.left() <= 0

    def share(self, measurements: int) -> Budget:
        """A started budget of an even share of what is left, for one of ``measurements`` still to run."""
        return Budget(max(0.0, self.left()) / max(1, measurements)).start()


@dataclass
class Row:
    """One measured figure of the report."""

    part: str
    model: str
    measurement: str
    setting: str = ""
    unit: str = ""  # what items are: captions, images, prompts, samples
    items: int = 0
    seconds: float = 0.0
    tokens: int | None = None
    gpu_gib: float | None = None
    mfu: float | None = None  # a fraction of the device's peak
    vs: str = ""  # against the row's baseline, measured in the same run
    target: str = ""
    status: str = "done"

    @property
    def rate(self) -> float | None:
        return self.items / self.seconds if self.items and self.seconds > 0 else None


@dataclass
class PartResult:
    """A part's rows and how it ended: done, budget spent after N items, skipped: why, or failed: the error."""

    name: str
    budget_s: float
    status: str = "done"
    seconds: float = 0.0  # in all: building models and saving weights included
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def one_line(exc: BaseException) -> str:
    """An error as one line: its type and the first line of its message."""
    said = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {said[0] if said else 'no message'}"[:300]


def items_status(done: int, total: int, unit: str) -> str:
    return "done" if done >= total else f"budget spent after {count(done, unit)}"


def count(n: int, unit: str) -> str:
    """``n`` items of a plural unit: "1 step", "2,048 images"."""
    return f"{n:,} {unit.removesuffix('s') if n == 1 else unit}"


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named as ``torch.cuda.get_device_name`` names it (None: not in the table)."""
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in device_name), None)


def timed_items(
    budget: Budget, device: torch.device, total: int, batch: int, step: Callable[[int, int], Any]
) -> tuple[int, float]:
    """Run ``step(start, n)`` batch after batch until ``total`` items are done or the budget is spent;
    returns the items done and the seconds they took."""
    done, seconds = 0, 0.0
    while done < total and not budget.spent:
        n = min(batch, total - done)
        sync(device)
        started = time.perf_counter()
        step(done, n)
        sync(device)
        seconds += time.perf_counter() - started
        done += n
    return done, seconds


def ground_part(preset: Preset, device: torch.device, budget: Budget, result: PartResult, work: Path) -> None:
    """CLIP image embeddings per second at each batch size, and noun prompts (the grounding ensemble's) per
    second, through ``trainer.clip_model.ClipModel`` as the ground stage calls it (fp16 on a GPU)."""
    from PIL import Image
    from skimage import data as skdata

    from pipeline.grounding.scores import noun_prompts
    from schemas.ground_config import DEFAULT_NOUN_PROMPTS
    from trainer.clip_model import LOCAL_DIR, ClipModel
    from trainer.tiny import make_tiny_clip

    if preset.dry:
        name, label = LOCAL_DIR + str(make_tiny_clip(work / "clip")), "tiny CLIP"
    else:
        name, label = "ViT-L-14", "CLIP ViT-L/14"
    clip = ClipModel(name, None, device)
    label += f" ({dtype_name(clip.dtype)})"
    photos = [Image.fromarray(getattr(skdata, photo)()).convert("RGB") for photo in PHOTOS]
    pixels = torch.stack([clip.preprocess(im) for im in photos])
    pixels = pixels.repeat(max(preset.clip_batches) // len(photos) + 1, 1, 1, 1)
    prompts = noun_prompts(NOUNS, DEFAULT_NOUN_PROMPTS)
    prompts = (prompts * (preset.clip_prompts // len(prompts) + 1))[: preset.clip_prompts]
    budget.start()
    batches = preset.clip_batches
    for i, batch in enumerate(batches):
        clip.encode_pixels(pixels[:batch])  # warm-up at this batch size
        reset_peak(device)
        done, seconds = timed_items(
            budget.share(len(batches) + 1 - i),
            device,
            preset.clip_images,
            batch,
            lambda _, n: clip.encode_pixels(pixels[:n]),
        )
        row = Row("ground", label, "image embeddings", f"batch {batch}", "images", done, seconds)
        row.gpu_gib, row.status = peak_gib(device), items_status(done, preset.clip_images, "images")
        result.rows.append(row)
    text_batch = 256
    clip.encode_texts(prompts[:text_batch], text_batch)
    reset_peak(device)
    done, seconds = timed_items(
        budget.share(1),
        device,
        len(prompts),
        text_batch,
        lambda start, n: clip.encode_texts(prompts[start : start + n], text_batch),
    )
    row = Row("ground", label, "noun prompts, tokenizing included", f"batch {text_batch}", "prompts", done, seconds)
    row.gpu_gib, row.status = peak_gib(device), items_status(done, len(prompts), "prompts")
    result.rows.append(row)
    if not preset.dry:
        best = max((r for r in result.rows if r.unit == "images" and r.rate), key=lambda r: r.rate or 0, default=None)
        if best is not None:
            best.target = f">= 2,000 images/s: {'met' if (best.rate or 0) >= 2000 else 'not met'}"


def build_encoders(preset: Preset, device: torch.device, work: Path) -> tuple[Any, Any, int, torch.dtype]:
    """The VAE and T5 encoder (sd-vae-ft-ema's and T5 v1.1 XXL's architectures, built on the device in bf16; the
    dry run: the tiny PixArt pipeline's, fp32); and the T5 width and the dtype."""
    if preset.dry:
        from diffusers import AutoencoderKL
        from transformers import T5EncoderModel

        from trainer.tiny import make_tiny_pixart

        folder = work / "pixart"
        if not folder.is_dir():
            make_tiny_pixart(folder)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
        t5 = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder").eval()
        return vae, t5, t5.config.d_model, torch.float32
    from train_bench import encoders

    with device:
        vae, t5, width = encoders("xl-2", device, torch.bfloat16)
    free_memory()
    return vae, t5, width, torch.bfloat16


def features_part(preset: Preset, device: torch.device, budget: Budget, result: PartResult, work: Path) -> None:
    """VAE posteriors (mean and std, as ``densecurate features`` stores them) of images at the training
    resolution, and T5 encoder states of captions padded to 120 tokens, per second; inputs already on the device."""
    vae, t5, _, dtype = build_encoders(preset, device, work)
    res = preset.resolution
    pixels = torch.rand(preset.vae_batch, 3, res, res, device=device, dtype=dtype) * 2 - 1
    ids = torch.randint(3, t5.config.vocab_size, (preset.t5_batch, preset.t5_tokens), device=device)
    mask = torch.ones_like(ids)

    def encode_images(_: int, n: int) -> torch.Tensor:
        posterior = vae.encode(pixels[:n]).latent_dist
        return torch.cat([posterior.mean, posterior.std], dim=1)

    def encode_texts(_: int, n: int) -> torch.Tensor:
        return t5(ids[:n], attention_mask=mask[:n]).last_hidden_state

    name = dtype_name(dtype)
    vae_label = "tiny VAE" if preset.dry else "VAE (sd-vae-ft-ema)"
    t5_label = "tiny T5 encoder" if preset.dry else "T5-XXL encoder (v1.1)"
    with torch.inference_mode():
        encode_images(0, preset.vae_batch)  # warm-up at the batch sizes measured
        encode_texts(0, preset.t5_batch)
        budget.start()
        measured = (
            (vae_label, f"encode at {res} px", "images", preset.vae_images, preset.vae_batch, encode_images),
            (
                t5_label,
                f"{preset.t5_tokens}-token states",
                "captions",
                preset.t5_captions,
                preset.t5_batch,
                encode_texts,
            ),
        )
        for i, (model, what, unit, total, batch, step) in enumerate(measured):
            reset_peak(device)
            done, seconds = timed_items(budget.share(len(measured) - i), device, total, batch, step)
            row = Row("features", f"{model} ({name})", what, f"batch {batch}", unit, done, seconds)
            row.gpu_gib, row.status = peak_gib(device), items_status(done, total, unit)
            result.rows.append(row)


def pixart_train_flops_per_sample(model: Any, resolution: int, text_tokens: int) -> float:
    """Matmul FLOPs per sample of one training step of ``PixArtTransformer2DModel`` (``model``: a
    ``schemas.train_config.ModelConfig``): forward and backward, the backward twice the forward except for the
    input gradients nothing needs (latents, T5 states, timestep features); attention not recomputed.

    Counts what ``torch.utils.flop_counter.FlopCounterMode`` counts for the step with the math attention
    kernel: every linear layer and convolution and the two attention products.
    """
    width = model.num_attention_heads * model.attention_head_dim
    tokens = (resolution // 8 // model.patch_size) ** 2
    patch_in = 4 * model.patch_size**2  # 4 latent channels per pixel of a patch
    text = text_tokens

    def linear(rows: int, fan_in: int, fan_out: int) -> int:
        return 2 * rows * fan_in * fan_out

    patch_embed = linear(tokens, patch_in, width)
    caption_in = linear(text, model.caption_channels, width)
    timestep_in = linear(1, TIMESTEP_CHANNELS, width)
    conditioning = linear(text, width, width) + linear(1, width, width) + linear(1, width, 6 * width)
    self_attention = linear(tokens, width, 4 * width) + 2 * 2 * tokens * tokens * width  # q k v out, QK^T, AV
    cross_attention = 2 * linear(tokens, width, width) + 2 * linear(text, width, width) + 2 * 2 * tokens * text * width
    feed_forward = 2 * linear(tokens, width, 4 * width)
    block = self_attention + cross_attention + feed_forward
    out = linear(tokens, width, model.patch_size**2 * 8)  # epsilon and variance: 8 channels
    forward = patch_embed + caption_in + timestep_in + conditioning + model.num_layers * block + out
    return float(3 * forward - (patch_embed + caption_in + timestep_in))


def largest_batch(start: int, fits: Callable[[int], Any]) -> tuple[int, list[int]]:
    """The largest batch, from ``start`` downwards (x3/4, multiples of 8 above 8), for which ``fits(batch)``
    does not run out of CUDA memory; and the sizes that did."""
    batch, too_big = start, []
    while True:
        try:
            fits(batch)
            return batch, too_big
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            too_big.append(batch)
        free_memory()
        smaller = batch * 3 // 4
        batch = max(1, smaller - smaller % 8 if smaller > 8 else smaller)


def train_part(preset: Preset, device: torch.device, budget: Budget, result: PartResult, work: Path) -> None:
    """PixArt-XL/2 training steps (trainer.loop.diffusion_terms, hybrid loss, AdamW, gradient clipping) under
    bf16 autocast at the largest batch that fits, on precomputed features and with the encoders run online.

    The VAE and T5-XXL stay on the device in both modes, so the batch is the one that fits beside them.
    """
    from train_bench import train_config

    from trainer.diffusion import HybridLoss, linear_scheduler
    from trainer.loop import build_transformer, diffusion_terms

    vae, t5, width, enc_dtype = build_encoders(preset, device, work)
    arch, res, tokens = ("tiny" if preset.dry else "xl-2"), preset.resolution, preset.t5_tokens
    config = train_config(arch, width, res, preset.train_start_batch)
    with device:
        model = build_transformer(config)
    fused = True if device.type == "cuda" else None  # the fused AdamW kernel on a GPU
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.03, eps=1e-10, fused=fused)
    scheduler = linear_scheduler()
    loss_fn = HybridLoss(scheduler)
    gen = torch.Generator().manual_seed(0)
    n = preset.train_start_batch
    latents = torch.randn(n, 4, res // 8, res // 8, device=device)
    states = torch.randn(n, tokens, width, device=device)
    mask = torch.ones(n, tokens, dtype=torch.long, device=device)
    images = torch.rand(n, 3, res, res, device=device, dtype=enc_dtype) * 2 - 1
    token_ids = torch.randint(3, t5.config.vocab_size, (n, tokens), device=device)
    bf16 = device.type == "cuda"

    def step(batch: int, online: bool) -> None:
        optimizer.zero_grad(set_to_none=True)
        x, h, m = latents[:batch], states[:batch], mask[:batch]
        if online:
            with torch.no_grad():
                x = vae.encode(images[:batch]).latent_dist.sample().float() * 0.18215
                h = t5(token_ids[:batch], attention_mask=m).last_hidden_state.float()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            loss = diffusion_terms(model, x, h, m, scheduler, loss_fn, gen).loss.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        optimizer.step()

    flops = pixart_train_flops_per_sample(config.model, res, tokens)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = peak_bf16_tflops(name) if device.type == "cuda" else None
    if device.type != "cuda":
        result.notes.append("MFU not computed on the CPU")
    elif peak is None:
        known = ", ".join(key for key, _ in PEAK_BF16_TFLOPS)
        result.notes.append(f"MFU not computed: {name} is none of the GPUs whose bf16 peak the suite knows ({known})")
    params = sum(p.numel() for p in model.parameters()) / 1e6
    label = f"PixArt-{'tiny' if preset.dry else 'XL/2'} ({params:.3g}M params, {'bf16 autocast' if bf16 else 'fp32'})"
    result.notes.append(f"{flops / 1e9:.3g} GFLOP per sample and step (forward and backward, {res} px, for MFU)")
    budget.start()
    rows: dict[bool, Row] = {}
    batch = n
    for i, online in enumerate((False, True)):
        share = budget.share(2 - i)
        mode = "encoders online" if online else "precomputed features"
        row = Row("train", label, f"step, {mode}", unit="samples", status="skipped: budget spent")
        rows[online] = row
        result.rows.append(row)
        if share.spent:
            continue
        batch, too_big = largest_batch(batch, functools.partial(step, online=online))
        reset_peak(device)
        step(batch, online)  # a second warm-up step: the first one made the optimizer's state
        done, seconds = timed_items(share, device, preset.train_steps, 1, lambda *_, b=batch, o=online: step(b, o))
        row.items, row.seconds = done * batch, seconds
        row.setting = f"batch {batch}" + (f" ({', '.join(map(str, too_big))} out of memory)" if too_big else "")
        row.gpu_gib, row.status = peak_gib(device), items_status(done, preset.train_steps, "steps")
        if peak and row.rate and not online:
            row.mfu = flops * row.rate / (peak * 1e12)
            row.target = f">= 40% MFU: {'met' if row.mfu >= 0.40 else 'not met'}"
    fast, slow = rows[False].rate, rows[True].rate
    if fast and slow:
        rows[False].vs = f"{fast / slow:.2f}x online"
