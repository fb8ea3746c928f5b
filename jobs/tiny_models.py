"""The tiny random-weight models of the real architectures, for tests and the offline demo."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def _builders() -> dict[str, Callable[[Path], Path]]:
    from captioner.tiny import make_tiny_llava
    from captioner.tiny_idefics3 import make_tiny_idefics3
    from captioner.tiny_qwen2_vl import make_tiny_qwen2_vl
    from trainer.tiny import make_tiny_clip, make_tiny_dit, make_tiny_pixart

    return {
        "llava": make_tiny_llava,
        "qwen2_vl": make_tiny_qwen2_vl,
        "idefics3": make_tiny_idefics3,
        "pixart": make_tiny_pixart,
        "clip": make_tiny_clip,
        "dit": make_tiny_dit,
    }


def make_tiny_models(out: Path, *, keep_existing: bool = False) -> dict[str, Path]:
    """Write every tiny model to ``out/NAME``; with ``keep_existing`` a folder that already holds one is kept."""
    made = {}
    for name, make in _builders().items():
        folder = out / name
        made[name] = folder if keep_existing and any(folder.glob("*.json")) else make(folder)
    return made
