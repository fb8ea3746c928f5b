"""Training throughput: one PixArt-α step on precomputed features against the same step with the encoders online.

    python bench/train_bench.py                       # CPU: the tiny model (a regression number)
    python bench/train_bench.py --arch xl-2           # GPU: PixArt-XL/2 at 256 px, batch 64, bf16, random weights

"precomputed": latents and T5 states come ready (what `densecurate features` gives the trainer);
"online": every step also runs the VAE encoder on the images and the T5 encoder on the captions.
Both run the real step (trainer.loop.diffusion_terms + hybrid loss, AdamW, gradient clipping). On a
GPU the model FLOPs of a step are counted once with torch's FlopCounterMode and MFU is reported
against --peak-tflops (989 = H100 SXM dense bf16). Random weights; weights do not change speed.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from schemas.train_config import TrainConfig
from trainer.diffusion import HybridLoss, linear_scheduler
from trainer.loop import build_transformer, diffusion_terms


def encoders(arch: str, device: torch.device, dtype: torch.dtype, layers: int | None = None):
    """(VAE, T5 encoder, T5 width): the tiny pipeline's, or sd-vae-ft-ema's and T5 v1.1 XXL's architectures."""
    from diffusers import AutoencoderKL
    from transformers import T5Config, T5EncoderModel

    if arch == "tiny":
        from trainer.tiny import make_tiny_pixart

        folder = make_tiny_pixart(Path(tempfile.mkdtemp()) / "pixart")
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        t5 = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder")
    else:
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=256,
        )
        t5 = T5EncoderModel(
            T5Config(
                d_model=4096,
                d_kv=64,
                d_ff=10240,
                num_layers=24,
                num_heads=64,
                vocab_size=32128,
                feed_forward_proj="gated-gelu",
                is_encoder_decoder=False,
            )
        )
    return vae.to(device, dtype).eval(), t5.to(device, dtype).eval(), t5.config.d_model


def train_config(arch: str, width: int, resolution: int, batch: int, layers: int | None = None) -> TrainConfig:
    """The training config of the benchmarked model (XL/2, optionally cut to ``layers``, or the tiny one)."""
    xl = {"preset": "xl-2"} if layers is None else {"num_layers": layers}
    model = (
        {**xl, "caption_channels": width}
        if arch == "xl-2"
        else {
            "num_layers": 2,
            "num_attention_heads": 2,
            "attention_head_dim": 16,
            "caption_channels": width,
        }
    )
    return TrainConfig.model_validate(
        {
            "run_dir": "unused",
            "pipeline": "unused",
            "resolution": resolution,
            "model": model,
            "data": {"features": "unused", "batch_size": batch},
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["tiny", "xl-2"], default="tiny")
    parser.add_argument("--batch", type=int, default=None, help="default: 64 for xl-2, 8 for tiny")
    parser.add_argument("--resolution", type=int, default=None, help="default: 256 for xl-2, 64 for tiny")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode (after 3 warm-up steps)")
    parser.add_argument("--tokens", type=int, default=120, help="T5 tokens per caption")
    parser.add_argument("--layers", type=int, help="with --arch xl-2: cut T5 and the transformer to this depth (smoke)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak, for MFU")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    batch = args.batch or (64 if args.arch == "xl-2" else 8)
    resolution = args.resolution or (256 if args.arch == "xl-2" else 64)
    enc_dtype = torch.bfloat16 if gpu else torch.float32
    vae, t5, width = encoders(args.arch, device, enc_dtype, args.layers)
    config = train_config(args.arch, width, resolution, batch, args.layers)
    model = build_transformer(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.03, eps=1e-10)
    scheduler = linear_scheduler()
    loss_fn = HybridLoss(scheduler)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if gpu else contextlib.nullcontext()
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, resolution // 8, resolution // 8, device=device)
    states = torch.randn(batch, args.tokens, width, device=device)
    mask = torch.ones(batch, args.tokens, dtype=torch.long, device=device)
    images = torch.rand(batch, 3, resolution, resolution, device=device, dtype=enc_dtype) * 2 - 1
    token_ids = torch.randint(3, t5.config.vocab_size, (batch, args.tokens), device=device)

    def step(online: bool) -> None:
        x, h = latents, states
        if online:
            with torch.no_grad():
                x = vae.encode(images).latent_dist.sample().float() * 0.18215
                h = t5(token_ids, attention_mask=mask).last_hidden_state.float()
        with autocast:
            loss = diffusion_terms(model, x, h, mask, scheduler, loss_fn, gen).loss.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        optimizer.step()

    flops = None
    if gpu:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            step(online=False)
        flops = counter.get_total_flops()
    rows = []
    for online in (False, True):
        for _ in range(3):
            step(online)
        if gpu:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(args.steps):
            step(online)
        if gpu:
            torch.cuda.synchronize()
        rows.append(
            ("online encoders" if online else "precomputed features", (time.perf_counter() - started) / args.steps)
        )

    params = sum(p.numel() for p in model.parameters()) / 1e6
    where = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    table = Table(title=f"PixArt {args.arch} ({params:.1f}M params), {resolution} px, batch {batch}, {where}")
    for col in ("mode", "step ms", "images/s", "MFU", "vs online"):
        table.add_column(col)
    online_s = rows[1][1]
    for mode, seconds in rows:
        mfu = f"{100 * flops / seconds / (args.peak_tflops * 1e12):.1f}%" if flops and mode.startswith("pre") else "-"
        table.add_row(mode, f"{1000 * seconds:.1f}", f"{batch / seconds:.1f}", mfu, f"{online_s / seconds:.2f}x")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
