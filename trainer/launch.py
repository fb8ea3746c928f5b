"""Run training in this process, or on Ray Train workers (TorchTrainer, DDP) when ``workers > 1``."""

from __future__ import annotations

import torch

from schemas.atomic import write_atomic
from schemas.errors import UserError
from schemas.train_config import TrainConfig
from trainer.feature_settings import require_matching_features
from trainer.loop import TrainResult, train
from trainer.pretrained import require_fitting_model
from trainer.run_guard import prepare_run_dir


def launch_training(
    config: TrainConfig, *, resume: bool = False, overwrite: bool = False, allow_config_change: bool = False
) -> TrainResult:
    """One process for ``workers == 1``; else one Ray Train worker per ``workers``, gradients all-reduced.

    The feature shards, the transformer and run_dir are checked here, once, before any worker starts (see
    ``trainer.feature_settings.require_matching_features``, ``trainer.pretrained.require_fitting_model`` and
    ``trainer.run_guard.prepare_run_dir``).
    """
    require_matching_features(config)
    require_fitting_model(config)
    prepare_run_dir(config, resume=resume, overwrite=overwrite, allow_config_change=allow_config_change)
    if config.workers == 1:
        return train(config, resume=resume, check_run_dir=False)
    return _ray_train(config, resume=resume)


def weights_checksum(model: torch.nn.Module) -> float:
    """A cheap fingerprint of all parameters (DDP ranks must agree on it)."""
    with torch.no_grad():
        return float(sum(p.double().abs().sum().item() + p.double().sum().item() for p in model.parameters()))


def _worker_loop(loop_config: dict) -> None:
    import json
    from pathlib import Path

    import ray.train
    import ray.train.torch

    config = TrainConfig.model_validate(loop_config["config"])
    context = ray.train.get_context()
    result = train(
        config,
        resume=loop_config["resume"],
        check_run_dir=False,  # the driver did, before the workers started
        rank=context.get_world_rank(),
        world=context.get_world_size(),
        device=ray.train.torch.get_device(),
        wrap=ray.train.torch.prepare_model,
    )
    rank_file = Path(config.run_dir) / "workers" / f"rank-{context.get_world_rank()}.json"
    write_atomic(rank_file, json.dumps({"step": result.step, "weights_checksum": weights_checksum(result.model)}))


def _ray_train(config: TrainConfig, *, resume: bool) -> TrainResult:
    """Needs a connected Ray (the CLI connects, to 127.0.0.1 unless told otherwise)."""
    from pathlib import Path

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = torch.cuda.is_available() if config.use_gpu is None else config.use_gpu
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"config": config.model_dump(mode="json"), "resume": resume},
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=use_gpu),
        run_config=RunConfig(storage_path=str(Path(config.run_dir).resolve() / "ray_train"), name="train"),
    )
    try:
        trainer.fit()
    except Exception as exc:
        user_error = worker_user_error(exc)
        if user_error is None:
            raise
        raise user_error from None  # e.g. a corrupt feature file or a non-finite loss: one sentence, not a traceback
    step = check_ranks_agree(Path(config.run_dir), config.workers)
    return TrainResult(step=step, run_dir=Path(config.run_dir))


def worker_user_error(exc: BaseException) -> UserError | None:
    """The ``UserError`` a Ray Train worker stopped with, from the error ``fit()`` raised (None if none).

    Every rank stops at a non-finite step; the rank whose own batch had it names the samples, so its
    error is preferred over one that only says another worker's was.
    """
    failures = getattr(exc, "worker_failures", None) or {}
    candidates = [failures[rank] for rank in sorted(failures)] + [exc]
    found: list[UserError] = []
    for candidate in candidates:
        seen = 0
        while candidate is not None and seen < 8:
            if isinstance(candidate, UserError):
                found.append(candidate)
                break
            candidate = getattr(candidate, "_base_exc", None) or candidate.__cause__
            seen += 1
    own = [e for e in found if "another worker's" not in str(e)]
    return (own or found or [None])[0]


def check_ranks_agree(run_dir, workers: int) -> int:
    """Every DDP rank must end at the same step with the same weights; returns the step, raises otherwise."""
    import json

    ranks = [json.loads((run_dir / "workers" / f"rank-{r}.json").read_text()) for r in range(workers)]
    sums = [r["weights_checksum"] for r in ranks]
    if len({r["step"] for r in ranks}) != 1 or max(sums) - min(sums) > 1e-6 * max(1.0, abs(sums[0])):
        raise RuntimeError(f"DDP ranks ended differently: {ranks}")
    return ranks[0]["step"]
