"""Checkpoints: transformer and EMA in diffusers format (safetensors), optimizer, LR schedule, RNG, step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from schemas.atomic import atomic_output

STATE_FILE = "training_state.pt"


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the highest step; in-progress folders (``.tmp-``) and incomplete ones are ignored."""
    found = sorted(
        p for p in checkpoints_dir(run_dir).glob("step-*") if p.name[5:].isdigit() and (p / "state.json").is_file()
    )
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, step: int, model: Any, ema: Any, optimizer: Any, lr_schedule: Any) -> Path:
    """Write ``checkpoints/step-NNNNNNNN`` atomically (a temporary folder, renamed when complete)."""
    final = checkpoints_dir(run_dir) / f"step-{step:08d}"
    with atomic_output(final) as tmp:
        _write_checkpoint(tmp, step, model, ema, optimizer, lr_schedule)
    return final


def _write_checkpoint(tmp: Path, step: int, model: Any, ema: Any, optimizer: Any, lr_schedule: Any) -> None:
    model.save_pretrained(tmp / "transformer", safe_serialization=True)
    ema.module.save_pretrained(tmp / "transformer_ema", safe_serialization=True)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "lr_schedule": lr_schedule.state_dict(),
            "ema_n_averaged": ema.n_averaged,
            "rng": torch.get_rng_state(),
        },
        tmp / STATE_FILE,
    )
    (tmp / "state.json").write_text(json.dumps({"step": step}))


def load_training_state(checkpoint: Path) -> tuple[int, dict[str, Any]]:
    """``(step, state)``; the state is read with ``weights_only=True``."""
    step = json.loads((checkpoint / "state.json").read_text())["step"]
    return step, torch.load(checkpoint / STATE_FILE, weights_only=True)
