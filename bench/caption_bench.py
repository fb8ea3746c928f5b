"""Caption throughput against batch size, at a fixed output length (EOS ignored) so runs compare.

    python bench/caption_bench.py                          # CPU: the tiny LLaVA (a regression number)
    python bench/caption_bench.py --arch llava-1.5-7b      # GPU: full-size LLaVA-1.5-7B, random weights
    python bench/caption_bench.py --model DIR_OR_ID        # any LLaVA-family model that loads here

The full-size architecture is built from its published hyperparameters with random weights (no
download; weights do not change speed) at 336 px. The baseline is batch 1, measured in the same run.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from rich.console import Console
from rich.table import Table
from skimage import data as skdata

from captioner.generation import Captioner, CaptionRequest
from captioner.loading import LoadedModel, load_model, resolve_device, resolve_dtype
from captioner.tiny import make_tiny_llava, train_tokenizer
from schemas.caption_config import GenerationSettings, ModelSettings

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "hubble_deep_field", "retina")


def llava_15_7b(device: torch.device, dtype: torch.dtype, layers: int | None = None) -> LoadedModel:
    """LLaVA-1.5-7B's architecture (CLIP ViT-L/14-336 + Vicuna-7B) with random weights.

    ``layers`` cuts both towers to that depth at full width (a quick smoke test of this path).
    """
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from captioner.tiny import CHAT_TEMPLATE

    tokenizer = train_tokenizer()
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=layers or 24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers or 32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with device:
        model = LlavaForConditionalGeneration(config).eval()
    torch.set_default_dtype(previous)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    return LoadedModel(model, processor, "llava-1.5-7b (random weights)", "none", device, dtype)


def make_requests(n: int) -> list[CaptionRequest]:
    requests = []
    for i in range(n):
        im = Image.fromarray(getattr(skdata, PHOTOS[i % len(PHOTOS)])()).convert("RGB").resize((768, 512))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=95)
        requests.append(CaptionRequest(f"bench-{i:05d}", buf.getvalue(), "a photo"))
    return requests


def measure(loaded: LoadedModel, batch: int, new_tokens: int, n_images: int) -> tuple[float, int]:
    """Seconds for ``n_images`` captions after one warm-up batch, and the tokens generated."""
    settings = GenerationSettings(batch_size=batch, max_new_tokens=new_tokens, ignore_eos=True)
    captioner = Captioner(loaded, settings)
    list(captioner.caption(make_requests(batch)))  # warm-up
    requests = make_requests(n_images)
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    results = list(captioner.caption(requests))
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, sum(r.num_tokens for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model id or directory (default: a tiny LLaVA built here)")
    parser.add_argument("--arch", choices=["llava-1.5-7b"], help="random-weight full-size architecture")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default: 1,4,16 CPU; 1,8,32,64 GPU)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per caption (default 64 CPU, 200 GPU)")
    parser.add_argument("--batches", type=int, default=4, help="batches per measurement (at least 8 captions)")
    parser.add_argument("--layers", type=int, help="with --arch: cut both towers to this depth (smoke test)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    new_tokens = args.new_tokens or (200 if gpu else 64)
    sizes = [int(b) for b in (args.batch_sizes or ("1,8,32,64" if gpu else "1,4,16")).split(",")]
    if args.arch:
        loaded = llava_15_7b(device, resolve_dtype(args.dtype, device), args.layers)
    else:
        model = args.model or str(make_tiny_llava(Path(tempfile.mkdtemp()) / "llava"))
        loaded = load_model(ModelSettings(model=model, device=args.device, dtype=args.dtype))

    where = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    table = Table(title=f"{loaded.model_id} on {where}, {loaded.dtype}, {new_tokens} new tokens per caption")
    for col in ("batch", "captions", "seconds", "captions/s", "tokens/s", "vs batch 1"):
        table.add_column(col)
    base = None
    for batch in sizes:
        n_images = max(8, batch * args.batches)
        seconds, tokens = measure(loaded, batch, new_tokens, n_images)
        rate = n_images / seconds
        base = base or rate
        table.add_row(
            str(batch), str(n_images), f"{seconds:.2f}", f"{rate:.2f}", f"{tokens / seconds:.0f}", f"{rate / base:.2f}x"
        )
        Console(width=140).print(f"batch {batch}: {rate:.2f} captions/s")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
