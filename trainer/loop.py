"""The PixArt-α alignment-stage training loop (one process; Ray Train runs one per worker with DDP)."""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from schemas.errors import ConfigError, MissingInputError
from schemas.train_config import TrainConfig
from trainer.checkpoint import listed_names, load_newest_checkpoint, nonfinite_weights, save_checkpoint, warn_line
from trainer.data import CaptionSampling, CuratedDataset, FeatureDataset, StepBatches, seeded_generator
from trainer.diffusion import HybridLoss, linear_scheduler
from trainer.errors import TrainingDivergedError
from trainer.feature_settings import require_matching_features
from trainer.features import FeatureEncoder, from_pretrained_component
from trainer.pretrained import require_fitting_model
from trainer.run_guard import prepare_run_dir, save_config
from trainer.weights import load_weights


def build_transformer(config: TrainConfig) -> Any:
    """The diffusers ``PixArtTransformer2DModel``: from a checkpoint, or new from the configured sizes."""
    from diffusers import PixArtTransformer2DModel

    m = config.model
    if m.pretrained:
        return load_weights(
            lambda: from_pretrained_component(PixArtTransformer2DModel, m.pretrained, "transformer"),
            f"model.pretrained {m.pretrained}",
            "download or convert it again",
        )
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
    try:
        config = AutoencoderKL.load_config(pipeline, subfolder=subfolder)
    except OSError as exc:
        raise MissingInputError(
            f"model.pipeline {pipeline!r} has no VAE to load: it is not a local PixArt pipeline folder and could not "
            f"be loaded from the Hugging Face cache or hub ({type(exc).__name__}); pass a folder or a hub id"
        ) from None
    return float(config.get("scaling_factor", 0.18215))


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
    losses: list[float] = field(default_factory=list)  # of the steps that updated the weights
    model: Any = None  # the trained transformer (unwrapped) in this process
    skipped_steps: list[int] = field(default_factory=list)  # steps this process skipped: non-finite loss/gradients
    nonfinite_steps: int = 0  # such steps of the whole run (carried over a resume by the checkpoints)


def _autocast(config: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    bf16 = config.mixed_precision == "bf16" or (config.mixed_precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _switched_on(setting: str, device: torch.device) -> bool:
    """Whether an ``auto``/``on``/``off`` setting is on for ``device`` (``auto``: on CUDA)."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def training_device(config: TrainConfig) -> torch.device:
    """CUDA when ``use_gpu`` says so (by default: when CUDA is available), else the CPU."""
    gpu = torch.cuda.is_available() if config.use_gpu is None else config.use_gpu
    return torch.device("cuda" if gpu else "cpu")


def build_optimizer(config: TrainConfig, model: Any, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``model``'s parameters; the fused kernel when ``optim.fused`` is on for ``device``."""
    o = config.optim
    fused = _switched_on(o.fused, device) or None  # None, not False: torch's default (foreach on CUDA)
    return torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay, eps=o.eps, fused=fused)


def forward_module(
    config: TrainConfig, model: Any, device: torch.device, wrap: Callable[[Any], Any] | None = None
) -> Any:
    """The module the training forward runs: ``model``, wrapped by ``wrap`` (DDP), then ``torch.compile``-d when
    ``compile`` is on for ``device``. It shares ``model``'s parameters, so checkpoints, EMA and export keep
    saving ``model`` itself (no ``_orig_mod.`` keys)."""
    module = wrap(model) if wrap else model
    return torch.compile(module) if _switched_on(config.compile, device) else module


@contextlib.contextmanager
def matmul_precision(config: TrainConfig, device: torch.device) -> Iterator[None]:
    """On CUDA, TF32 (``tf32``) or full fp32 for fp32 matmuls and cuDNN convolutions, restored on exit; else
    nothing changes."""
    if device.type != "cuda":
        yield
        return
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    matmul.fp32_precision = conv.fp32_precision = "tf32" if config.tf32 else "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


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

    First ``require_matching_features`` refuses feature shards made with other settings than the config,
    ``require_fitting_model`` a transformer that does not fit the pipeline, and ``prepare_run_dir`` refuses
    to mix runs in run_dir (``overwrite``: delete the old run; ``allow_config_change``: resume with a
    changed config, recorded). ``check_run_dir=False`` when the caller already did these (the driver of a
    Ray Train run, once for all workers). A resume continues from the newest checkpoint that loads
    completely (newer ones that do not are skipped, with a printed line).

    A step whose loss or gradients are NaN or infinite updates nothing (weights, optimizer, EMA); up to
    ``config.nan_tolerance`` such steps of the run are skipped and counted, the next one stops training
    with a ``TrainingDivergedError`` naming the step and the samples of its batch. No checkpoint is
    written with non-finite weights.

    The GPU paths are settings: ``compile`` (``forward_module``), ``optim.fused`` (``build_optimizer``),
    ``tf32`` (``matmul_precision``) and ``model.gradient_checkpointing``. Attention always runs PyTorch's
    ``scaled_dot_product_attention`` (flash or memory-efficient kernels on CUDA): diffusers gives every
    attention of ``PixArtTransformer2DModel`` its ``AttnProcessor2_0`` and nothing here sets another.
    """
    if check_run_dir:
        require_matching_features(config)
        require_fitting_model(config)
        prepare_run_dir(config, resume=resume, overwrite=overwrite, allow_config_change=allow_config_change)
    device = training_device(config) if device is None else device
    run_dir = Path(config.run_dir)
    torch.manual_seed(config.seed)
    training = _build_training(config, device)
    start, nonfinite_steps = _resume(training, run_dir, rank) if resume else (0, 0)
    if rank == 0:
        save_config(run_dir, config)
    result = TrainResult(step=start, run_dir=run_dir, model=training.model, nonfinite_steps=nonfinite_steps)
    if start >= config.steps:
        return result
    batches = _open_batches(config, device, start, rank, world)
    loop = _Loop(config, training, forward_module(config, training.model, device, wrap), result, rank, world, device)
    with matmul_precision(config, device):
        loop.run(batches)
    return result


@dataclass
class _Training:
    """What a process trains: the transformer, its EMA, the optimizer and the LR schedule."""

    model: Any
    ema: AveragedModel
    optimizer: torch.optim.AdamW
    lr_schedule: Any


def _build_training(config: TrainConfig, device: torch.device) -> _Training:
    """The transformer on ``device`` (with gradient checkpointing when configured), its EMA, AdamW and the
    constant schedule after a linear warm-up."""
    from diffusers.optimization import get_constant_schedule_with_warmup

    model = build_transformer(config).to(device)
    if config.model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.optim.ema_decay), use_buffers=False)
    optimizer = build_optimizer(config, model, device)
    lr_schedule = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=config.optim.warmup_steps)
    return _Training(model, ema, optimizer, lr_schedule)


def _resume(training: _Training, run_dir: Path, rank: int) -> tuple[int, int]:
    """Load the newest checkpoint that loads completely into ``training`` (and the RNG); its step and count of
    non-finite steps, ``(0, 0)`` when there is none. The optimizer stays fused or not as now configured."""
    checkpoint = load_newest_checkpoint(run_dir, warn=None if rank else warn_line)
    if checkpoint is None:
        return 0, 0
    state = checkpoint.state
    training.model.load_state_dict(checkpoint.transformer.state_dict())
    training.ema.module.load_state_dict(checkpoint.transformer_ema.state_dict())
    training.ema.n_averaged.copy_(state["ema_n_averaged"])
    optimizer = state["optimizer"]
    groups = [
        {**saved, "fused": now["fused"]}
        for saved, now in zip(optimizer["param_groups"], training.optimizer.param_groups, strict=True)
    ]
    training.optimizer.load_state_dict({**optimizer, "param_groups": groups})
    training.lr_schedule.load_state_dict(state["lr_schedule"])
    torch.set_rng_state(state["rng"])
    return checkpoint.step, int(state.get("nonfinite_steps", 0))


@dataclass
class _Batches:
    """This worker's batches from the start step on, and the tensors the transformer takes from each."""

    loader: DataLoader
    device: torch.device
    scaling: float  # the VAE's latent scaling factor
    online: FeatureEncoder | None  # curated shards: the VAE and T5 encode each batch here

    def tensors(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents, T5 states, T5 mask) of ``batch`` on the device."""
        if self.online is not None:
            return self.online.encode_for_training(batch["image"], batch["caption"], batch["noise"], self.scaling)
        return batch["latent"].to(self.device), batch["t5"].to(self.device), batch["mask"].to(self.device)


def _open_batches(config: TrainConfig, device: torch.device, start: int, rank: int, world: int) -> _Batches:
    """The loader of feature shards, or of curated shards with the pipeline's encoders run online."""
    scaling = vae_scaling_factor(config.pipeline)
    data = config.data
    sampling = CaptionSampling(data.caption_sampling, data.caption_weight, data.caption_temperature)
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
            sampling=sampling,
        )
    else:
        dataset = FeatureDataset(
            Path(config.data.features),
            seed=config.seed,
            max_tokens=config.data.max_tokens,
            scaling_factor=scaling,
            caption_dropout=config.caption_dropout,
            sampling=sampling,
        )
    steps = StepBatches(start=start, stop=config.steps, batch_size=config.data.batch_size, rank=rank, world=world)
    return _Batches(
        DataLoader(dataset, batch_sampler=steps, num_workers=config.data.num_workers), device, scaling, online
    )


class _Loop:
    """The steps of one process: forward and backward, the update (or a skipped step), logging, checkpoints."""

    def __init__(
        self,
        config: TrainConfig,
        training: _Training,
        forward: Any,
        result: TrainResult,
        rank: int,
        world: int,
        device: torch.device,
    ) -> None:
        self.config, self.training, self.forward, self.result = config, training, forward, result
        self.rank, self.world, self.device = rank, world, device
        d = config.diffusion
        self.scheduler = linear_scheduler(d.num_train_timesteps, d.beta_start, d.beta_end)
        self.loss_fn = HybridLoss(self.scheduler, d.loss)
        self.writer = _summary_writer(result.run_dir) if rank == 0 else None
        self.last_log = time.perf_counter()

    def run(self, batches: _Batches) -> None:
        """Train from ``result.step`` to ``config.steps``, recording each step in ``result``."""
        start = self.result.step
        self.training.model.train()
        for step, batch in enumerate(batches.loader, start=start):
            latents, t5, mask = batches.tensors(batch)
            if step == start:
                self._require_caption_channels(t5)
            terms, loss_value, norm_value = self._forward_backward(step, latents, t5, mask)
            done = step + 1
            if _all_finite(loss_value, norm_value, self.world, self.device):
                self._update(loss_value)
            else:
                self._skip(done, loss_value, norm_value, terms, batch)
            with warnings.catch_warnings():  # the schedule follows the step count, skipped steps included
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
                self.training.lr_schedule.step()
            self.result.step = done
            self._log(done, loss_value, norm_value, terms)
            self._save(done)
        if self.writer is not None:
            self.writer.close()

    def _require_caption_channels(self, t5: torch.Tensor) -> None:
        channels = self.training.model.config.caption_channels
        if t5.shape[-1] != channels:
            raise ConfigError(_caption_channels_message(self.config, channels, t5.shape[-1]))

    def _forward_backward(
        self, step: int, latents: torch.Tensor, t5: torch.Tensor, mask: torch.Tensor
    ) -> tuple[Any, float, float]:
        """The loss terms of one batch, its backward and clipped gradients; (terms, loss, gradient norm)."""
        gen = seeded_generator(self.config.seed, step, self.rank, 3)
        with _autocast(self.config, self.device):
            terms = diffusion_terms(self.forward, latents, t5, mask, self.scheduler, self.loss_fn, gen)
        loss = terms.loss.mean()
        self.training.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # always (even for a NaN loss): DDP ranks all-reduce the gradients here
        grad_norm = torch.nn.utils.clip_grad_norm_(self.training.model.parameters(), self.config.optim.grad_clip)
        loss_value, norm_value = torch.stack([loss.detach().float(), grad_norm.float()]).tolist()  # one sync
        return terms, loss_value, norm_value

    def _update(self, loss_value: float) -> None:
        self.training.optimizer.step()
        self.training.ema.update_parameters(self.training.model)
        self.result.losses.append(loss_value)

    def _skip(self, done: int, loss_value: float, norm_value: float, terms: Any, batch: dict[str, Any]) -> None:
        """Count a step with a non-finite loss or gradients (no update), or stop when that is one too many."""
        result, tolerance = self.result, self.config.nan_tolerance
        self.training.optimizer.zero_grad(set_to_none=True)
        result.skipped_steps.append(done)
        result.nonfinite_steps += 1
        what = _nonfinite_what(loss_value, norm_value, terms.loss.detach(), batch, self.world)
        weights_broken = bool(nonfinite_weights(self.training.model))  # then skipping cannot help: stop now
        if weights_broken or result.nonfinite_steps > tolerance:
            raise TrainingDivergedError(
                _diverged_message(done, what, result.nonfinite_steps, tolerance, weights_broken)
            )
        if self.rank == 0:
            warn_line(
                f"warning: step {done} skipped (no update) because {what}; "
                f"{result.nonfinite_steps} of --nan-tolerance {tolerance} such steps used"
            )

    def _log(self, done: int, loss_value: float, norm_value: float, terms: Any) -> None:
        """TensorBoard scalars and a printed line every ``log_every`` steps and at the end (rank 0)."""
        config = self.config
        if self.writer is None or not (done % config.log_every == 0 or done == config.steps):
            return
        now = time.perf_counter()
        images = config.log_every * config.data.batch_size * self.world
        scalars = {
            "loss": loss_value,
            "loss/mse": terms.mse.mean().item(),
            "loss/vb": terms.vb.mean().item(),
            "grad_norm": norm_value,
            "lr": self.training.lr_schedule.get_last_lr()[0],
            "images_per_s": images / max(now - self.last_log, 1e-9),
            "nonfinite_steps": self.result.nonfinite_steps,
        }
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, done)
        print(f"step {done}/{config.steps} loss {scalars['loss']:.4f} (mse {scalars['loss/mse']:.4f})", flush=True)
        self.last_log = now

    def _save(self, done: int) -> None:
        """A checkpoint every ``checkpoint_every`` steps and at the end, a sample grid every ``sample_every``."""
        config, training = self.config, self.training
        if done % config.checkpoint_every == 0 or done == config.steps:
            # Every rank checks (the weights agree across DDP ranks), so that all of them stop together.
            _check_weights_finite(done, training.model, training.ema.module)
            if self.rank == 0:
                save_checkpoint(
                    self.result.run_dir,
                    done,
                    training.model,
                    training.ema,
                    training.optimizer,
                    training.lr_schedule,
                    nonfinite_steps=self.result.nonfinite_steps,
                )
        if self.rank == 0 and config.sample_every and done % config.sample_every == 0:
            from trainer.sampling import save_sample_grid

            save_sample_grid(config, training.ema.module, self.result.run_dir / "samples" / f"step-{done:08d}.png")


def _all_finite(loss: float, grad_norm: float, world: int, device: torch.device) -> bool:
    """Whether this step's loss and gradient norm are finite, on every DDP rank (so that all skip or stop alike)."""
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        flag = torch.tensor([0.0 if finite else 1.0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        finite = flag.item() == 0.0
    return finite


def _samples(batch: dict[str, Any], which: list[int] | None = None, limit: int = 4) -> str:
    """``KEY (SHARD), ...`` for the batch's samples (``which``: their indices), at most ``limit`` named."""
    keys, shards = batch.get("key"), batch.get("shard")
    if not keys:
        return "unknown samples"
    which = list(range(len(keys))) if which is None else which
    named = [f"{keys[i]} ({shards[i]})" if shards else str(keys[i]) for i in which[:limit]]
    more = f" and {len(which) - limit} more" if len(which) > limit else ""
    return ", ".join(named) + more


def _nonfinite_what(loss: float, grad_norm: float, per_sample: torch.Tensor, batch: dict[str, Any], world: int) -> str:
    """What was not finite at this step, naming the samples of the batch (those whose loss was, when known).

    With DDP the gradients are averaged over the workers, so a worker whose own loss is finite says so (the
    launcher then prefers the error of the worker whose batch had it)."""
    if not math.isfinite(loss):
        bad = [i for i, ok in enumerate(torch.isfinite(per_sample.float()).tolist()) if not ok]
        return f"the loss is {loss} on samples {_samples(batch, bad or None)}"
    if not math.isfinite(grad_norm) and world == 1:
        return f"the gradient norm is {grad_norm} on the batch of samples {_samples(batch)}"
    if not math.isfinite(grad_norm):
        return (
            f"the gradient norm averaged over the workers is {grad_norm}, from this worker's batch of samples "
            f"{_samples(batch)} or another worker's"
        )
    return f"another worker's loss or gradients are not finite (this worker's batch has samples {_samples(batch)})"


def _diverged_message(step: int, what: str, count: int, tolerance: int, weights_broken: bool) -> str:
    if weights_broken:
        return (
            f"training stopped at step {step} because {what} and the weights themselves are NaN or infinite since "
            "an earlier update (no checkpoint was written with them); lower optim.lr or optim.grad_clip and resume "
            "from an earlier checkpoint"
        )
    return (
        f"training stopped at step {step} because {what}, non-finite step {count} of the run with --nan-tolerance "
        f"{tolerance} (no checkpoint was written for it); check those samples' features or lower optim.lr, or "
        "resume with a higher --nan-tolerance to skip such steps"
    )


def _caption_channels_message(config: TrainConfig, channels: int, features: int) -> str:
    """The transformer's caption channels differ from the T5 states of the features (one sentence)."""
    if config.model.pretrained:
        return (
            f"model.pretrained {config.model.pretrained} takes captions of {channels} channels but the features' T5 "
            f"states have {features}: make the features with the pipeline's text encoder or choose a transformer "
            f"made for {features} channels"
        )
    return (
        f"model.caption_channels is {channels} but the features' T5 states have {features} channels: set "
        f"model.caption_channels to {features}"
    )


def _check_weights_finite(step: int, model: Any, ema_model: Any) -> None:
    bad = nonfinite_weights(model) + [f"EMA {n}" for n in nonfinite_weights(ema_model)]
    if bad:
        raise TrainingDivergedError(
            f"training stopped at step {step} because its update made the weights NaN or infinite (in "
            f"{listed_names(bad)}) and no checkpoint was written for it; lower optim.lr or optim.grad_clip and "
            "resume from an earlier checkpoint"
        )


def _summary_writer(run_dir: Path) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))
