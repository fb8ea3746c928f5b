"""Tiny random-weight Idefics3 (the architecture of SmolVLM, e.g. ``HuggingFaceTB/SmolVLM-256M-Instruct``).

Built from ``Idefics3Config`` (SigLIP-style vision tower, pixel-shuffle connector, Llama) with SmolVLM's special
tokens, a chat template reduced from SmolVLM's and its generation config (EOS ``<end_of_utterance>``), then
saved with ``save_pretrained``: transformers and vLLM load it as they load SmolVLM. Images are not split into
tiles and are resized to 64x64: 64 patches, 16 image tokens after the pixel shuffle. Attention heads are 32
wide (vLLM's CPU attention supports 32, 64, 80, ...).
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3Processor,
    PreTrainedTokenizerFast,
)

from captioner.tiny import save_tiny_model, train_bpe_tokenizer

GRID_TOKENS = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
    "<global-img>",
    *GRID_TOKENS,
]
IMAGE_SIZE, PATCH_SIZE, SCALE_FACTOR = 64, 8, 2
IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2

# SmolVLM's chat template, reduced to what captioning uses.
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{{ '<end_of_utterance>\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def train_tokenizer() -> PreTrainedTokenizerFast:
    """A small BPE tokenizer with SmolVLM's special tokens and their roles."""
    return train_bpe_tokenizer(
        SPECIAL_TOKENS,
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
    )


def make_tiny_idefics3(out: Path, *, seed: int = 0) -> Path:
    """Write a tiny Idefics3 (model, processor, tokenizer, chat template) to ``out``; returns ``out``."""
    tokenizer = train_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessor(
            do_image_splitting=False,
            size={"longest_edge": IMAGE_SIZE},
            max_image_size={"longest_edge": IMAGE_SIZE},
        ),
        tokenizer=tokenizer,
        image_seq_len=IMAGE_SEQ_LEN,
        chat_template=CHAT_TEMPLATE,
    )
    config = Idefics3Config(
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            "bos_token_id": ids["<|im_start|>"],
            "eos_token_id": ids["<end_of_utterance>"],
            "pad_token_id": ids["<|im_end|>"],
        },
        image_token_id=ids["<image>"],
        scale_factor=SCALE_FACTOR,
        pad_token_id=ids["<|im_end|>"],
    )
    return save_tiny_model(
        out,
        Idefics3ForConditionalGeneration,
        config,
        processor,
        seed=seed,
        bos=ids["<|im_start|>"],
        eos=ids["<end_of_utterance>"],
        pad=ids["<|im_end|>"],
    )
