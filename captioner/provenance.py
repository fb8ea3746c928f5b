"""Where a caption came from, beyond the model id: the weights' digest, the prompt template's, the engine's version."""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

# The files of a model folder that hold its weights.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
ENGINE_PACKAGES = {"transformers": "transformers", "vllm": "vllm"}


def weights_sha256(model: str) -> str | None:
    """One sha256 over a local model folder's weight files (each file's name and bytes, in name order); None for a
    hub id, whose revision names its weights. Every byte is read: about 1 s per GB."""
    folder = Path(model)
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    for path in files:
        with path.open("rb") as handle:
            file_digest = hashlib.file_digest(handle, "sha256").hexdigest()
        digest.update(f"{path.relative_to(folder).as_posix()}\0{file_digest}\n".encode())
    return digest.hexdigest()


def prompt_sha256(template: str) -> str:
    """The sha256 of a prompt template, before ``{alt_text}`` is filled in."""
    return hashlib.sha256(template.encode()).hexdigest()


def engine_version(engine: str) -> str:
    """``"transformers 5.1.0"``, ``"vllm 0.32.0"``: the engine and the version of its package here."""
    try:
        found = importlib.import_module(ENGINE_PACKAGES.get(engine, engine)).__version__
    except (ImportError, AttributeError):
        found = "(version unknown)"
    return f"{engine} {found}"
