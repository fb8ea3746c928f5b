"""Checkpoints: transformer and EMA in diffusers format (safetensors), optimizer, LR schedule, RNG, step.

No checkpoint is written with NaN or infinite weights. Readers (``--resume``, ``export``) take the newest
checkpoint that loads completely and holds finite weights; each newer one that does not is skipped with a
printed line that names it and says why (a truncated file, say), and ``UnusableCheckpointError`` is raised
when none loads.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from schemas.atomic import atomic_output
from trainer.errors import TrainingDivergedError, UnusableCheckpointError

STATE_FILE = "training_state.pt"
TRANSFORMER, TRANSFORMER_EMA = "transformer", "transformer_ema"
ALL_PARTS = (TRANSFORMER, TRANSFORMER_EMA, STATE_FILE)


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The finished checkpoints, oldest first; in-progress folders (``.tmp-``) and incomplete ones are ignored."""
    return sorted(
        p for p in checkpoints_dir(run_dir).glob("step-*") if p.name[5:].isdigit() and (p / "state.json").is_file()
    )


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the highest step (whether it loads or not: see ``load_newest_checkpoint``)."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def nonfinite_tensors(tensors: Iterable[tuple[str, Any]]) -> list[str]:
    """The names of the floating-point tensors among ``(name, tensor)`` that hold NaN or infinite values."""
    return [
        name
        for name, t in tensors
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]


def nonfinite_weights(model: Any) -> list[str]:
    """The parameters and buffers of ``model`` that hold NaN or infinite values."""
    return nonfinite_tensors(model.state_dict().items())


def listed_names(names: list[str], limit: int = 3) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: Any,
    ema: Any,
    optimizer: Any,
    lr_schedule: Any,
    *,
    nonfinite_steps: int = 0,
) -> Path:
    """Write ``checkpoints/step-NNNNNNNN`` atomically (a temporary folder, renamed when complete).

    ``nonfinite_steps``: how many steps of the run were skipped for a non-finite loss or gradients (kept
    so that a resume goes on counting them). Refuses (``TrainingDivergedError``) non-finite weights.
    """
    bad = [f"{TRANSFORMER}.{n}" for n in nonfinite_weights(model)]
    bad += [f"{TRANSFORMER_EMA}.{n}" for n in nonfinite_weights(ema.module)]
    if bad:
        raise TrainingDivergedError(
            f"the weights are NaN or infinite after step {step} (in {listed_names(bad)}) so no checkpoint was written "
            "for it; lower optim.lr (or optim.grad_clip) and resume from an earlier checkpoint"
        )
    final = checkpoints_dir(run_dir) / f"step-{step:08d}"
    with atomic_output(final) as tmp:
        _write_checkpoint(tmp, step, model, ema, optimizer, lr_schedule, nonfinite_steps)
    return final


def _write_checkpoint(
    tmp: Path, step: int, model: Any, ema: Any, optimizer: Any, lr_schedule: Any, nonfinite_steps: int
) -> None:
    model.save_pretrained(tmp / "transformer", safe_serialization=True)
    ema.module.save_pretrained(tmp / "transformer_ema", safe_serialization=True)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "lr_schedule": lr_schedule.state_dict(),
            "ema_n_averaged": ema.n_averaged,
            "rng": torch.get_rng_state(),
            "nonfinite_steps": nonfinite_steps,
        },
        tmp / STATE_FILE,
    )
    (tmp / "state.json").write_text(json.dumps({"step": step}))


@dataclass
class LoadedCheckpoint:
    """A checkpoint read completely (the parts asked for), its weights finite."""

    path: Path
    step: int
    transformer: Any = None  # PixArtTransformer2DModel
    transformer_ema: Any = None
    state: dict[str, Any] | None = None  # training_state.pt


class _Unloadable(Exception):
    """A checkpoint part that does not load: ``short`` for a one-sentence refusal, ``detail`` for the log."""

    def __init__(self, short: str, detail: str = "") -> None:
        super().__init__(short)
        self.short, self.detail = short, detail or short


def _failure(part: str, exc: BaseException) -> _Unloadable:
    """Why ``part`` does not load, from the innermost error (diffusers wraps the safetensors error in an OSError)."""
    chain = [exc]
    while (inner := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 8:
        chain.append(inner)
    root = chain[-1]
    first = (str(root).strip().splitlines() or [""])[0].split(". ")[0][:160]
    short = f"{part} does not load ({type(root).__name__})"
    return _Unloadable(short, f"{part} does not load ({type(root).__name__}: {first})" if first else short)


def _read_weights(path: Path, part: str) -> Any:
    from diffusers import PixArtTransformer2DModel

    try:
        model = PixArtTransformer2DModel.from_pretrained(path / part)
    except Exception as exc:  # a truncated or damaged safetensors file, a missing config, ...
        raise _failure(part, exc) from None
    bad = nonfinite_weights(model)
    if bad:
        short = f"{part} has NaN or infinite weights"
        raise _Unloadable(short, f"{short} ({listed_names(bad)})")
    return model


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path / STATE_FILE, weights_only=True)
    except Exception as exc:  # truncated: "PytorchStreamReader failed reading zip archive", EOFError, ...
        raise _failure(STATE_FILE, exc) from None
    needed = ("optimizer", "lr_schedule", "ema_n_averaged", "rng")
    missing = [k for k in needed if not isinstance(state, dict) or k not in state]
    if not missing and not isinstance(state["optimizer"], dict):
        missing = ["optimizer"]
    if missing:
        raise _Unloadable(f"{STATE_FILE} lacks {', '.join(missing)}")
    moments = [
        (f"optimizer.{i}.{name}", t)
        for i, per_param in state["optimizer"].get("state", {}).items()
        for name, t in per_param.items()
    ]
    bad = nonfinite_tensors(moments)
    if bad:
        short = f"{STATE_FILE} has NaN or infinite optimizer state"
        raise _Unloadable(short, f"{short} ({listed_names(bad)})")
    return state


def read_checkpoint(path: Path, parts: Iterable[str] = ALL_PARTS) -> LoadedCheckpoint:
    """Every part of ``path`` in ``parts`` (``transformer``, ``transformer_ema``, ``training_state.pt``), read
    and checked; raises ``_Unloadable`` naming the first part that does not load or is not finite."""
    parts = tuple(parts)
    try:
        step = int(json.loads((path / "state.json").read_text())["step"])
    except Exception as exc:
        raise _failure("state.json", exc) from None
    loaded = LoadedCheckpoint(path=path, step=step)
    if TRANSFORMER in parts:
        loaded.transformer = _read_weights(path, TRANSFORMER)
    if TRANSFORMER_EMA in parts:
        loaded.transformer_ema = _read_weights(path, TRANSFORMER_EMA)
    if STATE_FILE in parts:
        loaded.state = _read_state(path)
    return loaded


def warn_line(line: str) -> None:
    """Print a warning line of training (to stderr, as it happens)."""
    print(line, file=sys.stderr, flush=True)


def load_newest_checkpoint(
    run_dir: Path,
    parts: Iterable[str] = ALL_PARTS,
    *,
    action: str = "resuming from",
    remedy: str = "train without --resume and with --overwrite to start over",
    warn: Callable[[str], None] | None = warn_line,
) -> LoadedCheckpoint | None:
    """The newest checkpoint of ``run_dir`` whose ``parts`` load completely, with finite weights.

    ``None`` when the run has no checkpoint. Each newer checkpoint that does not load is skipped with a line
    to ``warn`` naming it and why (then one saying which checkpoint ``action`` uses);
    ``UnusableCheckpointError`` (one sentence, ending in ``remedy``) when none loads.
    """
    parts = tuple(parts)
    found = complete_checkpoints(run_dir)
    skipped: list[tuple[Path, _Unloadable]] = []
    for path in reversed(found):
        try:
            loaded = read_checkpoint(path, parts)
        except _Unloadable as why:
            skipped.append((path, why))
            if warn is not None:
                warn(f"warning: skipping checkpoint {path} because {why.detail}")
            continue
        if skipped and warn is not None:
            warn(f"{action} checkpoint {path} (step {loaded.step}), the newest one that loads")
        return loaded
    if not skipped:
        return None
    newest, why = skipped[0]
    raise UnusableCheckpointError(
        f"none of the {len(skipped)} checkpoints in {checkpoints_dir(run_dir)} loads completely (the newest, "
        f"{newest.name}, because {why.short}); {remedy}"
    )
