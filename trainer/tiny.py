"""A tiny random-weight PixArt-α pipeline (T5 encoder, AutoencoderKL, PixArtTransformer2DModel) for tests.

Saved with ``save_pretrained`` as a folder that ``PixArtAlphaPipeline.from_pretrained`` loads, so tests
and the offline demo take exactly the code path of a hub checkpoint. It generates noise, quickly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing

TINY_RESOLUTION = 64  # pixels; latents are 8x8 (the VAE downsamples by 8)
_CORPUS = [
    "a photo of a cat sitting on a red sofa next to a window",
    "a white rocket on the launch pad with smoke and a blue sky",
    "a cup of coffee on a saucer with a spoon on a wooden table",
    "an astronaut in an orange suit in front of a flag",
    "grey surface of the moon with craters and shadows",
    "old coins on a dark background",
    "a man with a camera on a tripod in a park",
    "galaxies in the night sky",
]


def train_t5_tokenizer(vocab_size: int = 200):
    """A Unigram tokenizer in T5's layout (pad 0, eos 1, unk 2; eos appended), trained on the corpus above."""
    from transformers import T5Tokenizer

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(
        _CORPUS * 8,
        trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"),
    )
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    return T5Tokenizer(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0)


def make_tiny_pixart(out: Path, *, seed: int = 0) -> Path:
    """Write a tiny PixArtAlphaPipeline folder to ``out``; returns ``out``."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = train_t5_tokenizer()
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),  # four levels: 8x downsampling, as sd-vae-ft-ema
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
        scaling_factor=0.18215,
    )
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,  # epsilon and the learned variance
        num_layers=2,
        cross_attention_dim=32,
        caption_channels=32,
        sample_size=TINY_RESOLUTION // 8,
        patch_size=2,
        norm_num_groups=8,
        use_additional_conditions=False,
    )
    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    pipe.save_pretrained(out)
    return out


def make_tiny_dit(out: Path, *, seed: int = 0, **sizes: Any) -> Path:
    """Write a tiny random-weight ``DiTTransformer2DModel`` folder (the tiny PixArt transformer's sizes) to ``out``.

    Class-conditional (1000 classes and the null class), adaLN-Zero with random (not zero) modulation weights.
    Every block shares block 0's timestep and class embedders, as in the hub DiT checkpoints. ``norm_eps`` is
    1e-6, the original DiT's in every LayerNorm (diffusers' default is 1e-5). ``sizes`` override the config
    (tests of sizes that do not fit). Returns ``out``.
    """
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    config: dict[str, Any] = {
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "in_channels": 4,
        "out_channels": 8,  # epsilon and the learned variance
        "num_layers": 2,
        "sample_size": TINY_RESOLUTION // 8,
        "patch_size": 2,
        "num_embeds_ada_norm": 1000,
        "norm_eps": 1e-6,
    }
    dit = DiTTransformer2DModel(**{**config, **sizes})
    with torch.no_grad():
        first = dit.transformer_blocks[0].norm1.emb
        for block in dit.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first.state_dict())
    dit.save_pretrained(out, safe_serialization=True)
    return out


def make_tiny_clip(out: Path, *, seed: int = 0) -> Path:
    """Write a tiny random-weight open_clip model to ``out`` (load it as ``local-dir:OUT``); returns ``out``."""
    import json

    import open_clip
    from safetensors.torch import save_file

    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    torch.manual_seed(seed)
    model = open_clip.CLIP(**config)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    preprocess = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": preprocess}))
    return out
