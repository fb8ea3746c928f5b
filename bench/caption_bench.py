"""Caption throughput: the transformers engine (static batches) against vLLM (continuous batching).

    python bench/caption_bench.py                                  # CPU: tiny LLaVA, transformers only
    python bench/caption_bench.py --engine both                    # + vLLM (needs `make setup-vllm`)
    python bench/caption_bench.py --engine both --arch llava-1.5-7b   # GPU: full-size LLaVA-1.5-7B
    python bench/caption_bench.py --arch qwen2-vl-7b --layers 1    # CPU smoke test of a full-width arch
    python bench/caption_bench.py --model DIR_OR_ID                # any model that loads here

Two workloads, both with EOS ignored so that runs compare: **fixed** (every caption ``--new-tokens``
long) and **natural** (each caption as long as a real dense caption: lengths drawn from the LLaVA
``detail`` captions of the benchmark data's ``dense_captions/llava`` (docs/BENCHMARK_DATA.md) when present, at 1.33
tokens per word, else uniformly from 64 to 256 tokens). Static batches pay for their longest caption;
continuous batching does not. transformers' best batch size is the baseline, measured in the same run on
the same device.

``--arch`` builds a captioner family's full-size architecture from its published hyperparameters with
random weights (no download; weights do not change speed), with the tiny builders' locally trained
tokenizer, chat template and processor (the text tower keeps the real vocabulary size); vLLM gets the same
folder with ``load_format=dummy``. On 768x512 photos:

- ``llava-1.5-7b``: LLaVA-1.5-7B (CLIP ViT-L/14 at 336 px + Vicuna-7B); 576 image tokens.
- ``qwen2-vl-7b``: Qwen2-VL-7B-Instruct (675M ViT, patch 14, 2x2 merger + Qwen2-7B, M-RoPE) at the
  real processor's native resolution; 486 image tokens.
- ``smolvlm-256m``: SmolVLM-256M-Instruct (Idefics3: SigLIP-B/16 at 512 px, pixel shuffle x4, 135M-sized
  Llama), the image not split into tiles; 64 image tokens.

Every arch's natural captions are capped at the same ``--max-model-len`` minus 700 tokens, so their
workloads match. ``--layers`` cuts both towers to that depth at full width: a smoke test, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_data import bench_data
from PIL import Image
from rich.console import Console
from rich.table import Table
from skimage import data as skdata

from captioner.generation import Captioner, CaptionRequest
from captioner.loading import LoadedModel, load_model, resolve_device, resolve_dtype
from captioner.tiny import CHAT_TEMPLATE, make_tiny_llava, train_tokenizer
from schemas.caption_config import GenerationSettings, ModelSettings

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "hubble_deep_field", "retina")
LLAVA_DETAIL = bench_data("dense_captions", "llava")
TOKENS_PER_WORD = 1.33  # LLaMA's tokenizer on English prose
REPO = Path(__file__).resolve().parents[1]


def llava_15_7b_folder(out: Path, layers: int | None = None) -> Path:
    """LLaVA-1.5-7B's architecture (CLIP ViT-L/14-336 + Vicuna-7B): config and processor, no weights.

    ``layers`` cuts both towers to that depth at full width (a quick smoke test of this path).
    """
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor

    tokenizer = train_tokenizer()
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
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config.architectures = ["LlavaForConditionalGeneration"]  # how vLLM picks its model class
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    config.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def qwen2_vl_7b_folder(out: Path, layers: int | None = None) -> Path:
    """Qwen2-VL-7B-Instruct's architecture (675M ViT with 2x2 patch merger + Qwen2-7B): config and processor.

    The vision defaults of ``Qwen2VLConfig`` are the 7B's; its text defaults are the 72B's, so the text tower
    is spelt out. The processor keeps the real pixel limits: a 768x512 image is 486 image tokens.
    """
    from transformers import Qwen2VLConfig, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    from captioner import tiny_qwen2_vl as qwen

    tokenizer = qwen.train_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in qwen.SPECIAL_TOKENS}
    config = Qwen2VLConfig(
        vision_config={"depth": layers or 32},  # embed_dim 1280, 16 heads, patch 14, merge 2, out 3584: defaults
        text_config={
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": layers or 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    config.architectures = ["Qwen2VLForConditionalGeneration"]
    pixels = {"patch_size": 14, "merge_size": 2}  # default min/max pixels: the real processor's
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tokenizer,
        chat_template=qwen.CHAT_TEMPLATE,
    )
    config.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def smolvlm_256m_folder(out: Path, layers: int | None = None) -> Path:
    """SmolVLM-256M-Instruct's architecture (Idefics3: SigLIP-B/16-512 + pixel shuffle x4 + SmolLM2-135M-sized
    Llama): config and processor. Images are not split: one 512-px image is 64 image tokens."""
    from transformers import Idefics3Config, Idefics3ImageProcessor, Idefics3Processor

    from captioner import tiny_idefics3 as idefics3

    tokenizer = idefics3.train_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in idefics3.SPECIAL_TOKENS}
    image_size, patch_size, scale_factor = 512, 16, 4
    config = Idefics3Config(
        vision_config={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": layers or 12,
            "num_attention_heads": 12,
            "image_size": image_size,
            "patch_size": patch_size,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": 49280,
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": layers or 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "max_position_embeddings": 8192,
            "rope_parameters": {"rope_type": "default", "rope_theta": 100_000.0},
            "bos_token_id": ids["<|im_start|>"],
            "eos_token_id": ids["<end_of_utterance>"],
            "pad_token_id": ids["<|im_end|>"],
        },
        image_token_id=ids["<image>"],
        scale_factor=scale_factor,
        pad_token_id=ids["<|im_end|>"],
    )
    config.architectures = ["Idefics3ForConditionalGeneration"]
    edge = {"longest_edge": image_size}
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessor(do_image_splitting=False, size=edge, max_image_size=edge),
        tokenizer=tokenizer,
        image_seq_len=(image_size // patch_size) ** 2 // scale_factor**2,
        chat_template=idefics3.CHAT_TEMPLATE,
    )
    config.save_pretrained(out)
    processor.save_pretrained(out)
    return out


ARCHS = {"llava-1.5-7b": llava_15_7b_folder, "qwen2-vl-7b": qwen2_vl_7b_folder, "smolvlm-256m": smolvlm_256m_folder}
PROMPT_RESERVE = 700  # tokens kept for the prompt under --max-model-len: LLaVA's 576 image tokens (the most) + text


def random_weight_model(folder: Path, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """The folder's architecture with random weights, built on the device (no checkpoint needed)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, GenerationConfig

    config = AutoConfig.from_pretrained(folder)
    config._attn_implementation = "sdpa"
    processor = AutoProcessor.from_pretrained(folder)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with device:
        model = AutoModelForImageTextToText.from_config(config).eval()
    torch.set_default_dtype(previous)
    tokenizer = processor.tokenizer
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    processor.tokenizer.padding_side = "left"
    return LoadedModel(model, processor, f"{folder.name} (random weights)", "none", device, dtype)


def natural_lengths(n: int, cap: int, seed: int = 0) -> tuple[list[int], str]:
    """``n`` caption lengths in tokens (at most ``cap``) and where they come from."""
    rng = random.Random(seed)
    words = []
    for path in sorted(LLAVA_DETAIL.glob("*.jsonl")) if LLAVA_DETAIL.is_dir() else []:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        words += [len(r["output"].split()) for r in rows if r.get("type") == "detail"]
    if words:
        lengths = [min(cap, round(rng.choice(words) * TOKENS_PER_WORD)) for _ in range(n)]
        return lengths, f"LLaVA detail captions ({len(words)}), x{TOKENS_PER_WORD} tokens/word"
    return [rng.randint(64, min(cap, 256)) for _ in range(n)], "uniform 64..256 tokens"


def write_images(folder: Path, n: int) -> list[Path]:
    """``n`` real photos (scikit-image's) as 768x512 JPEGs."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        im = Image.fromarray(getattr(skdata, PHOTOS[i % len(PHOTOS)])()).convert("RGB").resize((768, 512))
        path = folder / f"bench-{i:05d}.jpg"
        im.save(path, format="JPEG", quality=95)
        paths.append(path)
    return paths


def requests_from(paths: list[Path]) -> list[CaptionRequest]:
    return [CaptionRequest(p.stem, p.read_bytes(), "a photo") for p in paths]


def _timed(fn, cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started


def transformers_run(loaded: LoadedModel, batch: int, lengths: list[int], paths: list[Path]) -> dict:
    """Static batches of ``batch``; each batch generates as many tokens as its longest caption needs."""
    cuda = loaded.device.type == "cuda"
    requests = requests_from(paths)
    warm = Captioner(loaded, GenerationSettings(batch_size=batch, max_new_tokens=8, ignore_eos=True))
    list(warm.caption(requests[:batch]))
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def run() -> None:
        for start in range(0, len(requests), batch):
            longest = max(lengths[start : start + batch])
            settings = GenerationSettings(batch_size=batch, max_new_tokens=longest, ignore_eos=True)
            list(Captioner(loaded, settings).caption(requests[start : start + batch]))

    seconds = _timed(run, cuda)
    memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return {"seconds": seconds, "captions": len(requests), "tokens": sum(lengths), "gpu_gib": memory}


def vllm_run(python: str, model: Path, args: argparse.Namespace, workloads: dict, paths: list[Path]) -> dict:
    """Run bench/vllm_caption_run.py in the vLLM environment; returns its results per workload."""
    spec = {
        "model": str(model),
        "dtype": args.dtype,
        "load_format": "dummy" if args.arch else "auto",
        "max_num_seqs": args.max_num_seqs,
        "max_model_len": args.max_model_len,
        "images": [str(p) for p in paths],
        "workloads": workloads,
        "out": str(model.parent / "vllm_results.json"),
    }
    out = subprocess.run(
        [python, str(REPO / "bench" / "vllm_caption_run.py"), json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(args.cpu_kv_cache_gib)},
    )
    if out.returncode != 0:
        sys.exit(f"the vLLM run failed:\n{out.stderr[-4000:]}")
    return json.loads(Path(spec["out"]).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="transformers", choices=["transformers", "vllm", "both"])
    parser.add_argument("--model", help="model id or directory (default: a tiny LLaVA built here)")
    parser.add_argument("--arch", choices=sorted(ARCHS), help="random-weight full-size architecture")
    parser.add_argument("--layers", type=int, help="with --arch: cut both towers to this depth (smoke test)")
    parser.add_argument("--batch-sizes", help="transformers, comma-separated (default: 1,4,16 CPU; 8,32,64 GPU)")
    parser.add_argument("--captions", type=int, help="captions per measurement (default 32 CPU, 256 GPU)")
    parser.add_argument("--new-tokens", type=int, help="fixed workload's tokens per caption (default 64 CPU, 200 GPU)")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="vLLM's scheduler width")
    parser.add_argument("--max-model-len", type=int, default=None, help="vLLM (default: 1024 with --arch, 512 else)")
    parser.add_argument("--cpu-kv-cache-gib", type=int, default=1)
    parser.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    new_tokens = args.new_tokens or (200 if gpu else 64)
    n = args.captions or (256 if gpu else 32)
    args.max_model_len = args.max_model_len or (1024 if args.arch else 512)
    sizes = [int(b) for b in (args.batch_sizes or ("8,32,64" if gpu else "1,4,16")).split(",")]
    work = Path(tempfile.mkdtemp(prefix="caption-bench-"))
    if args.arch:
        model = ARCHS[args.arch](work / args.arch, args.layers)
    else:
        model = Path(args.model) if args.model else make_tiny_llava(work / "llava")
    natural, natural_source = natural_lengths(n, cap=args.max_model_len - PROMPT_RESERVE if args.arch else 256)
    workloads = {f"fixed {new_tokens}": [new_tokens] * n, "natural": natural}
    paths = write_images(work / "images", n)

    where = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    console = Console(width=150)
    console.print(f"natural lengths: {natural_source}; mean {sum(natural) / n:.0f} tokens")
    rows: list[tuple[str, str, str, dict]] = []
    if args.engine in ("transformers", "both"):
        dtype = resolve_dtype(args.dtype, device)
        loaded = (
            random_weight_model(model, device, dtype)
            if args.arch
            else load_model(ModelSettings(model=str(model), device=args.device, dtype=args.dtype))
        )
        for name, lengths in workloads.items():
            for batch in sizes:
                result = transformers_run(loaded, batch, lengths, paths)
                rows.append(("transformers", name, f"batch {batch}", result))
                console.print(f"transformers {name} batch {batch}: {n / result['seconds']:.2f} captions/s")
        del loaded
        if gpu:
            torch.cuda.empty_cache()
    if args.engine in ("vllm", "both"):
        for name, result in vllm_run(args.vllm_python, model, args, workloads, paths).items():
            rows.append(("vllm", name, f"max_num_seqs {args.max_num_seqs}", result))
            console.print(f"vllm {name}: {n / result['seconds']:.2f} captions/s")

    best = {}
    for engine, name, _, result in rows:
        if engine == "transformers":
            best[name] = max(best.get(name, 0.0), result["captions"] / result["seconds"])
    label = model.name
    if args.arch:
        label = f"{args.arch} (random weights{f', {args.layers}-layer towers' if args.layers else ''})"
    table = Table(title=f"{label} on {where}, {args.dtype}; {n} captions per row")
    for col in (
        "engine",
        "workload",
        "setting",
        "seconds",
        "captions/s",
        "tokens/s",
        "GPU GiB",
        "vs transformers best",
    ):
        table.add_column(col)
    for engine, name, setting, r in rows:
        rate = r["captions"] / r["seconds"]
        ratio = f"{rate / best[name]:.2f}x" if name in best else "-"
        memory = f"{r['gpu_gib']:.1f}" if r.get("gpu_gib") is not None else "-"
        row = (engine, name, setting, f"{r['seconds']:.2f}", f"{rate:.2f}", f"{r['tokens'] / r['seconds']:.0f}")
        table.add_row(*row, memory, ratio)
    console.print(table)


if __name__ == "__main__":
    main()
