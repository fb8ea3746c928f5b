"""Tiny random-weight Qwen2-VL (the architecture of Qwen2-VL; Qwen2.5-VL is served by the same code paths).

Built from ``Qwen2VLConfig`` with the family's special tokens, a chat template reduced from the real one and
the real generation config layout (two EOS ids: ``<|im_end|>`` and ``<|endoftext|>``), then saved with
``save_pretrained``: transformers and vLLM load it as they load ``Qwen/Qwen2-VL-2B-Instruct``. Images are
capped at 64 tokens of 28x28 pixels by the processor; attention heads are 32 wide and the M-RoPE sections
(temporal, height, width) sum to half of that, as in the real model.
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from captioner.tiny import save_tiny_model, train_bpe_tokenizer

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
PATCH_SIZE, MERGE_SIZE = 14, 2  # one image token per 28x28 pixels, as in the real model
MIN_PIXELS, MAX_PIXELS = 4 * 28 * 28, 64 * 28 * 28  # 4 to 64 image tokens
HEAD_DIM = 32
MROPE_SECTION = [4, 6, 6]  # the real [16, 24, 24] scaled to head_dim 32: sums to HEAD_DIM / 2

# The chat template of Qwen2-VL-Instruct, reduced to what captioning uses (no default system message).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer() -> PreTrainedTokenizerFast:
    """A small BPE tokenizer with Qwen2-VL's special tokens and their roles."""
    return train_bpe_tokenizer(SPECIAL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def make_tiny_qwen2_vl(out: Path, *, seed: int = 0) -> Path:
    """Write a tiny Qwen2-VL (model, processor, tokenizer, chat template) to ``out``; returns ``out``."""
    tokenizer = train_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    pixels = {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS, "patch_size": PATCH_SIZE, "merge_size": MERGE_SIZE}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    config = Qwen2VLConfig(
        vision_config={
            "depth": 2,
            "embed_dim": 64,
            "hidden_size": 128,  # the merger's output: the text model's width
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": MERGE_SIZE,
            "temporal_patch_size": 2,
        },
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 128 // HEAD_DIM,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": MROPE_SECTION},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    end = ids["<|endoftext|>"]
    return save_tiny_model(
        out,
        Qwen2VLForConditionalGeneration,
        config,
        processor,
        seed=seed,
        bos=end,
        eos=[ids["<|im_end|>"], end],
        pad=end,
    )
