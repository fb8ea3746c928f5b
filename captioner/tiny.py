"""Tiny random-weight LLaVA (CLIP vision tower + Llama) for tests and the offline demo.

Built from configs of the real architectures, with a tokenizer trained here by ``tokenizers`` and a
LLaVA-1.5 style chat template, then saved with ``save_pretrained`` so it loads through exactly the
code path of a hub model — in transformers and in vLLM: its weights use the hub's key layout
(``vision_tower.vision_model.*``, as ``llava-hf/llava-1.5-7b-hf``) and its attention heads are 32
wide (vLLM's CPU attention supports 32, 64, 80, ... ). Its captions are random words: it checks
plumbing, not quality.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from captioner.prompts import PRESETS

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
IMAGE_SIZE, PATCH_SIZE = 30, 6  # 25 patches + CLS; the "default" strategy drops CLS: 25 image tokens

# The chat template of the llava-hf LLaVA-1.5 processors, reduced to what captioning uses.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_CORPUS = [
    *PRESETS.values(),
    "USER: ASSISTANT:",
    "The image shows a cat sitting on a red sofa next to a large window with white curtains.",
    "A man in a dark coat holds a camera on a tripod in a park with tall trees and a cloudy sky.",
    "A cup of coffee stands on a saucer with a silver spoon on a wooden table near a book.",
    "An astronaut in an orange suit smiles in front of a flag and a model of the space shuttle.",
    "A white rocket rises from the launch pad with smoke, fire and a blue sky in the background.",
    "Old coins of different sizes lie on a dark background, with letters and faces on them.",
    "The surface of the moon is grey with craters, shadows and bright edges under sunlight.",
    "Galaxies of many colors shine in the dark night sky, some round and some like spirals.",
    "A street with cars, buses and people walking past shops, signs and lamps in the evening.",
    "A dog runs on green grass with a ball in its mouth while children play near a fence.",
    "The photo is taken from above and shows a river, a bridge, boats and houses with roofs.",
    "The style is realistic with soft light, warm colors and a shallow depth of field.",
    "A woman wearing a hat and glasses reads a newspaper on a bench beside a bicycle.",
    "Mountains covered with snow rise behind a lake with reflections of clouds and trees.",
]


def train_bpe_tokenizer(special_tokens: list[str], vocab_size: int = 600, **named: Any) -> PreTrainedTokenizerFast:
    """A small BPE tokenizer (Metaspace words, newlines kept) trained on the corpus above, ``special_tokens`` first
    (ids 0, 1, ...); ``named`` are its named tokens (``eos_token=...``). Pads on the left, as captioning batches."""
    tok = Tokenizer(models.BPE(unk_token=named.get("unk_token")))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(
        _CORPUS * 4, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=["\n"])
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **named)


def train_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """The tiny LLaVA's tokenizer."""
    return train_bpe_tokenizer(
        SPECIAL_TOKENS,
        vocab_size,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


def make_tiny_llava(out: Path, *, seed: int = 0) -> Path:
    """Write a tiny LLaVA (model, processor, tokenizer, chat template) to ``out``; returns ``out``."""
    tokenizer = train_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        ),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # the CLS token, as llava-hf's processors set it
    )
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=64,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids["<image>"],
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    save_tiny_model(
        out,
        LlavaForConditionalGeneration,
        config,
        processor,
        seed=seed,
        bos=ids["<s>"],
        eos=ids["</s>"],
        pad=ids["<pad>"],
    )
    use_hub_key_layout(out)
    return out


def save_tiny_model(
    out: Path, model_class: Any, config: Any, processor: Any, *, seed: int, bos: int, eos: int | list[int], pad: int
) -> Path:
    """Build ``model_class(config)`` with random weights (seeded), give it a generation config with these token
    ids, and save it with its processor to ``out`` like a hub model; returns ``out``."""
    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, max_new_tokens=64)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _hub_key(key: str) -> str:
    for prefix in ("model.vision_tower.", "vision_tower."):
        if key.startswith(prefix) and not key.startswith(prefix + "vision_model."):
            return prefix + "vision_model." + key[len(prefix) :]
    return key


def use_hub_key_layout(folder: Path) -> None:
    """Rename the saved vision-tower weights to the hub's layout (``vision_tower.vision_model.*``), which
    published LLaVA checkpoints use and vLLM expects; transformers loads either layout."""
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as weights:
            metadata = weights.metadata() or {"format": "pt"}
            tensors = {_hub_key(k): weights.get_tensor(k) for k in weights.keys()}  # noqa: SIM118
        save_file(tensors, str(path), metadata=metadata)
