"""Loading a diffusers model's weights, with one sentence for a weights file that is missing or damaged."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

from trainer.errors import UnreadableWeightsError

T = TypeVar("T")
# diffusers' messages for a weights file it cannot parse, and for a folder without one.
_DAMAGED_FILE = re.compile(r"checkpoint file for '([^']+)'")
_NO_FILE = "no file named"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def load_weights(load: Callable[[], T], what: str, remedy: str) -> T:
    """``load()``; an ``UnreadableWeightsError`` naming ``what`` (and the file) when its weights are missing or
    cannot be read, ending with ``remedy``."""
    try:
        return load()
    except OSError as exc:
        damaged = _DAMAGED_FILE.search(str(exc))
        if damaged is not None:
            problem = f"{damaged.group(1)} is damaged or cut short"
        elif _NO_FILE in str(exc):
            problem = "it has no weights file (diffusion_pytorch_model.safetensors)"
        else:
            problem = _first_line(exc)
        raise UnreadableWeightsError(f"cannot read the weights of {what}: {problem}; {remedy}") from None
