"""The PixArt-α alignment-stage training loop (one process; Ray Train runs one per worker with DDP)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from schemas.errors import ConfigError
from schemas.train_config import TrainConfig
from trainer.checkpoint import latest_checkpoint, load_training_state, save_checkpoint
from trainer.data import CuratedDataset, FeatureDataset, StepBatches, seeded_generator
from trainer.diffusion import HybridLoss, linear_scheduler
from trainer.features import FeatureEncoder, from_pretrained_component
from trainer.run_guard import CONFIG_FILE as CONFIG_FILE  # the run's saved config (re-exported)
from trainer.run_guard import prepare_run_dir, save_config


def build_transformer(config: TrainConfig) -> Any:
    """The diffusers ``PixArtTransformer2DModel``: from a checkpoint, or new from the configured sizes."""
    from diffusers import PixArtTransformer2DModel

    m = config.model
    if m.pretrained:
        return from_pretrained_component(PixArtTransformer2DModel, m.pretrained, "transformer")
    return PixArtTransformer2DModel(
        num_attention_heads=m.num_attention_heads,
        attention_head_dim=m.attention_head_dim,
        in_channels=4,
        out_channels=8,  # epsilon and the learned variance
        num_layers=m.num_layers,
        cross_attention_dim=m.num_attention_heads * m.attention_head_dim,
        caption_channels=m.caption_channels,
        sample_size=config.resolution // 8,
        patch_size=m.patch_size,
        use_additional_conditions=False,
    )


def vae_scaling_factor(pipeline: str) -> float:
    from diffusers import AutoencoderKL

    local = Path(pipeline)
    subfolder = "vae" if not local.is_dir() or (local / "vae").is_dir() else None
    return float(AutoencoderKL.load_config(pipeline, subfolder=subfolder).get("scaling_factor", 0.18215))


def diffusion_terms(
    model: Any,
    latents: torch.Tensor,
    t5: torch.Tensor,
    mask: torch.Tensor,
    scheduler: Any,
    loss_fn: HybridLoss,
    generator: torch.Generator,
) -> Any:
    """Noise the latents at random timesteps (drawn from ``generator``), predict, and return the loss terms."""
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    timesteps = timesteps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    output = model(
        noisy,
        encoder_hidden_states=t5,
        encoder_attention_mask=mask,
        timestep=timesteps,
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    ).sample
    return loss_fn(output, latents, noisy, noise, timesteps)


@dataclass
class TrainResult:
    """Where the run ended and the losses this process saw."""

    step: int
    run_dir: Path
    losses: list[float] = field(default_factory=list)
    model: Any = None  # the trained transformer (unwrapped) in this process


def _autocast(config: TrainConfig, device: torch.device):
    bf16 = config.mixed_precision == "bf16" or (config.mixed_precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    allow_config_change: bool = False,
    check_run_dir: bool = True,
    rank: int = 0,
    world: int = 1,
    device: torch.device | None = None,
    wrap: Callable[[Any], Any] | None = None,
) -> TrainResult:
    """Train from step 0, or from the latest checkpoint with ``resume``; returns the final step and losses.

    First ``prepare_run_dir`` refuses to mix runs in run_dir (``overwrite``: delete the old run;
    ``allow_config_change``: resume with a changed config, recorded). ``check_run_dir=False`` when the
    caller already did that (the driver of a Ray Train run, once for all workers).
    """
    from diffusers.optimization import get_constant_schedule_with_warmup

    if check_run_dir:
        prepare_run_dir(config, resume=resume, overwrite=overwrite, allow_config_change=allow_config_change)

    if device is None:
        gpu = torch.cuda.is_available() if config.use_gpu is None else config.use_gpu
        device = torch.device("cuda" if gpu else "cpu")
    run_dir = Path(config.run_dir)
    torch.manual_seed(config.seed)
    model = build_transformer(config).to(device)
    if config.model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.optim.ema_decay), use_buffers=False)
    o = config.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay, eps=o.eps)
    lr_schedule = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=o.warmup_steps)
    start = 0
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        from diffusers import PixArtTransformer2DModel

        start, state = load_training_state(checkpoint)
        model.load_state_dict(PixArtTransformer2DModel.from_pretrained(checkpoint / "transformer").state_dict())
        ema.module.load_state_dict(
            PixArtTransformer2DModel.from_pretrained(checkpoint / "transformer_ema").state_dict()
        )
        ema.n_averaged.copy_(state["ema_n_averaged"])
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        torch.set_rng_state(state["rng"])
    if rank == 0:
        save_config(run_dir, config)
    result = TrainResult(step=start, run_dir=run_dir, model=model)
    if start >= config.steps:
        return result

    scaling = vae_scaling_factor(config.pipeline)
    online = None
    if config.data.source == "curated":
        online = FeatureEncoder(
            config.pipeline,
            config.pipeline,
            resolution=config.resolution,
            max_tokens=config.data.max_tokens,
            device=str(device),
        )
        dataset = CuratedDataset(
            Path(config.data.curated),
            seed=config.seed,
            resolution=config.resolution,
            caption_dropout=config.caption_dropout,
        )
    else:
        dataset = FeatureDataset(
            Path(config.data.features),
            seed=config.seed,
            max_tokens=config.data.max_tokens,
            scaling_factor=scaling,
            caption_dropout=config.caption_dropout,
        )
    batches = StepBatches(start=start, stop=config.steps, batch_size=config.data.batch_size, rank=rank, world=world)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=config.data.num_workers)
    scheduler = linear_scheduler(
        config.diffusion.num_train_timesteps, config.diffusion.beta_start, config.diffusion.beta_end
    )
    loss_fn = HybridLoss(scheduler, config.diffusion.loss)
    train_model = wrap(model) if wrap else model
    writer = _summary_writer(run_dir) if rank == 0 else None
    last_log = time.perf_counter()
    model.train()
    for step, batch in enumerate(loader, start=start):
        if online is not None:
            latents, t5, mask = online.encode_for_training(batch["image"], batch["caption"], batch["noise"], scaling)
        else:
            latents = batch["latent"].to(device)
            t5, mask = batch["t5"].to(device), batch["mask"].to(device)
        if step == start and t5.shape[-1] != config.model.caption_channels and not config.model.pretrained:
            raise ConfigError(
                f"model.caption_channels is {config.model.caption_channels} but the features' T5 states have "
                f"{t5.shape[-1]} channels"
            )
        gen = seeded_generator(config.seed, step, rank, 3)
        with _autocast(config, device):
            terms = diffusion_terms(train_model, latents, t5, mask, scheduler, loss_fn, gen)
        loss = terms.loss.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        lr_schedule.step()
        ema.update_parameters(model)
        done = step + 1
        result.step = done
        result.losses.append(loss.item())
        if writer is not None and (done % config.log_every == 0 or done == config.steps):
            now = time.perf_counter()
            images = config.log_every * config.data.batch_size * world
            scalars = {
                "loss": loss.item(),
                "loss/mse": terms.mse.mean().item(),
                "loss/vb": terms.vb.mean().item(),
                "grad_norm": grad_norm.item(),
                "lr": lr_schedule.get_last_lr()[0],
                "images_per_s": images / max(now - last_log, 1e-9),
            }
            for name, value in scalars.items():
                writer.add_scalar(name, value, done)
            print(f"step {done}/{config.steps} loss {scalars['loss']:.4f} (mse {scalars['loss/mse']:.4f})", flush=True)
            last_log = now
        if rank == 0 and (done % config.checkpoint_every == 0 or done == config.steps):
            save_checkpoint(run_dir, done, model, ema, optimizer, lr_schedule)
        if rank == 0 and config.sample_every and done % config.sample_every == 0:
            from trainer.sampling import save_sample_grid

            save_sample_grid(config, ema.module, run_dir / "samples" / f"step-{done:08d}.png")
    if writer is not None:
        writer.close()
    return result


def _summary_writer(run_dir: Path) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))
