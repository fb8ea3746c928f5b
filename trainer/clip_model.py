"""An open_clip model for scoring: normalised image and text embeddings, loaded the way `eval` and `ground` name it.

Names: an open_clip architecture with a weights tag or file (``ViT-L-14`` + ``openai``), ``hf-hub:REPO``,
or ``local-dir:DIR`` (a folder with ``open_clip_config.json`` and ``open_clip_model.safetensors``, as
``densecurate models make-tiny`` writes ``OUT/clip``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from schemas.errors import ConfigError, MissingInputError

LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
_HASH_CHUNK = 1 << 20


def require_clip_model(model: str) -> None:
    """Refuse an open_clip model name that open_clip does not know, or a ``local-dir:`` folder that is missing."""
    import open_clip

    if model.startswith(LOCAL_DIR):
        folder = Path(model.removeprefix(LOCAL_DIR))
        if not (folder / "open_clip_config.json").is_file():
            raise MissingInputError(
                f"CLIP model folder {folder} does not exist or holds no open_clip_config.json "
                "(--clip-model local-dir:DIR)"
            )
    elif not model.startswith(HF_HUB) and model not in open_clip.list_models():
        raise ConfigError(
            f"unknown open_clip model {model!r}: use a name of open_clip.list_models(), hf-hub:REPO or local-dir:DIR"
        )


def clip_folder_name(model: str, pretrained: str | None) -> str:
    """The folder name of a CLIP model's outputs: ``ViT-L-14-openai``, ``local-NAME`` for ``local-dir:.../NAME``."""
    if model.startswith(LOCAL_DIR):
        base = "local-" + Path(model.removeprefix(LOCAL_DIR).rstrip("/")).name
    else:
        base = model.removeprefix(HF_HUB)
        if pretrained:
            base += "-" + (Path(pretrained).stem if Path(pretrained).is_file() else pretrained)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", base).strip(".") or "clip"


def _file_digest(path: Path, digest: Any) -> None:
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)


def clip_weights_identity(model: str, pretrained: str | None) -> str:
    """What identifies the weights: the name and tag, and the contents of local files (a local folder's
    config and weights, or a weights file given as ``pretrained``)."""
    digest = hashlib.sha256(f"{model}\0{pretrained}".encode())
    files: list[Path] = []
    if model.startswith(LOCAL_DIR):
        folder = Path(model.removeprefix(LOCAL_DIR))
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.startswith("open_clip"))
    elif pretrained and Path(pretrained).is_file():
        files = [Path(pretrained)]
    for path in files:
        digest.update(path.name.encode())
        _file_digest(path, digest)
    return digest.hexdigest()


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when there is a GPU, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class ClipModel:
    """An open_clip model in eval mode on one device (fp16 on CUDA), with its preprocessing and tokenizer."""

    def __init__(self, model: str, pretrained: str | None, device: str | torch.device = "auto") -> None:
        import open_clip

        require_clip_model(model)
        self.device = resolve_device(device) if isinstance(device, str) else device
        precision = "fp16" if self.device.type == "cuda" else "fp32"
        weights = None if model.startswith((LOCAL_DIR, HF_HUB)) else pretrained
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                model, pretrained=weights, device=self.device, precision=precision
            )
            self.tokenizer = open_clip.get_tokenizer(model)
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(
                f"cannot load the CLIP model {model} (weights {pretrained}): {first}; pass --clip-model "
                "local-dir:DIR for a local open_clip folder"
            ) from exc
        self.model.eval()
        self.dtype = next(self.model.parameters()).dtype

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)

    @property
    def image_size(self) -> int:
        """The side of the model's input images."""
        size = self.model.visual.image_size
        return int(max(size) if isinstance(size, tuple | list) else size)

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings (float32, on the CPU) of preprocessed images."""
        features = self.model.encode_image(pixels.to(self.device, self.dtype))
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    def encode_images(self, images: Sequence[Any]) -> torch.Tensor:
        """Normalised image embeddings of PIL images (preprocessed as the model expects)."""
        return self.encode_pixels(torch.stack([self.preprocess(im) for im in images]))

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Normalised text embeddings (float32, on the CPU); texts longer than the context are cut."""
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start : start + batch_size])).to(self.device)
            out.append(torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)
