"""The transformer a training run trains, checked before any step (in the driver, before any Ray Train worker).

``model.pretrained`` must be a PixArt transformer (a PixArt pipeline folder or hub id with ``transformer/``, or
a transformer's own folder, as ``densecurate models convert-dit`` writes one) that takes the VAE's 4-channel
latents and predicts 8 channels (epsilon and the variance). The transformer's ``caption_channels`` (of
``model.pretrained``, else ``model.caption_channels``) must be the hidden size of the pipeline's text encoder,
whose states it projects.
"""

from __future__ import annotations

from typing import Any

from schemas.errors import ConfigError, MissingInputError
from schemas.train_config import TrainConfig
from trainer.convert_dit import LATENT_CHANNELS
from trainer.errors import IncompatibleModelError
from trainer.features import load_component

PIXART_CLASS = "PixArtTransformer2DModel"
OUTPUT_CHANNELS = 2 * LATENT_CHANNELS  # epsilon and the learned variance (the hybrid loss)
FIX_PRETRAINED = (
    "set it to a PixArt pipeline or transformer folder or hub id (`densecurate models convert-dit` makes one from "
    "a DiT), or leave it out to train a new transformer of the sizes under model"
)


def pretrained_config(source: str) -> dict[str, Any]:
    """The config of the transformer ``model.pretrained`` names (its ``transformer/`` when it has one)."""
    from diffusers import PixArtTransformer2DModel

    try:
        return dict(load_component(PixArtTransformer2DModel.load_config, source, "transformer"))
    except (OSError, ValueError) as exc:
        raise MissingInputError(
            f"model.pretrained {source} has no model config to load: it is no local folder with a config.json nor a "
            f"hub id in the Hugging Face cache or hub ({type(exc).__name__}); {FIX_PRETRAINED}"
        ) from None


def _is_pixart(config: dict[str, Any]) -> bool:
    """A PixArt transformer: diffusers' class, or the hub's PixArt-α checkpoints (``Transformer2DModel`` with
    adaLN-single)."""
    name = config.get("_class_name")
    return name == PIXART_CLASS or (name == "Transformer2DModel" and config.get("norm_type") == "ada_norm_single")


def _model_kind(config: dict[str, Any]) -> str:
    """What a config describes, for a sentence."""
    names = config.get("_class_name") or (config.get("architectures") or [None])[0] or config.get("model_type")
    return names or "no model class"


def require_pixart(config: dict[str, Any], source: str) -> None:
    """Refuse a ``model.pretrained`` that is no PixArt transformer, or one of other latent channels."""
    if not _is_pixart(config):
        raise IncompatibleModelError(
            f"model.pretrained {source} is not a PixArt transformer (its config names {_model_kind(config)}): "
            f"{FIX_PRETRAINED}"
        )
    channels = (config.get("in_channels"), config.get("out_channels"))
    if channels != (LATENT_CHANNELS, OUTPUT_CHANNELS):
        raise IncompatibleModelError(
            f"model.pretrained {source} has in_channels {channels[0]} and out_channels {channels[1]} but training "
            f"feeds {LATENT_CHANNELS}-channel VAE latents and predicts {OUTPUT_CHANNELS} channels (epsilon and the "
            f"variance): {FIX_PRETRAINED}"
        )


def text_encoder_channels(pipeline: str) -> int | None:
    """The hidden size of the pipeline's text encoder (None when its config cannot be read here: the run's
    loading of the pipeline then says so)."""
    from transformers import AutoConfig

    try:
        config = load_component(AutoConfig.from_pretrained, pipeline, "text_encoder")
    except (OSError, ValueError):
        return None
    return getattr(config, "d_model", None) or getattr(config, "hidden_size", None)


def require_fitting_model(config: TrainConfig) -> None:
    """Refuse a ``model.pretrained`` that is no PixArt transformer, and a transformer whose caption channels
    differ from the hidden size of the pipeline's text encoder (one sentence naming the field and the fix)."""
    source = config.model.pretrained
    pretrained = pretrained_config(source) if source else None
    if pretrained is not None:
        require_pixart(pretrained, source)
    text = text_encoder_channels(config.pipeline)
    wanted = pretrained.get("caption_channels") if pretrained is not None else config.model.caption_channels
    if text is None or wanted == text:
        return
    if pretrained is None:
        raise ConfigError(
            f"model.caption_channels is {wanted} but the text encoder of pipeline {config.pipeline} has {text} "
            f"channels: set model.caption_channels to {text}"
        )
    raise IncompatibleModelError(
        f"model.pretrained {source} takes captions of {wanted} channels (caption_channels) but the text encoder of "
        f"pipeline {config.pipeline} has {text}: convert the DiT again with `densecurate models convert-dit "
        f"--caption-channels {text}`, or choose a pipeline whose text encoder has {wanted} channels"
    )
