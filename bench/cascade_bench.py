"""Targeted recaptioning: a cheap captioner on every key, the strong one only where the cheap caption is weak,
the best caption per key merged, against the strong captioner on every key.

    python bench/cascade_bench.py                                   # CPU: tiny models, the plumbing and accounting
    python bench/cascade_bench.py --cheap HuggingFaceTB/SmolVLM-256M-Instruct \\
        --strong llava-hf/llava-1.5-13b-hf --clip ViT-L-14 --clip-pretrained openai --images 2000   # a GPU

Inputs: real photos (the benchmark data's images/openimages_ccby_cc3m_test and images/sa1b_fastsam, see
docs/BENCHMARK_DATA.md; the bundled sample photos when those are missing), cycled to --images files and
sharded. The stages run as a user runs them:

1. ``caption`` with --cheap on every key (field ``cheap``), ``score``, ``ground``;
2. ``caption`` with --strong on the keys ``--keys-query`` chooses (field ``strong``): by default the
   --recaption-share of cheap captions with the fewest grounded nouns;
3. ``merge --fields cheap,strong --by grounded_nouns --name cascade``; score and ground it;
4. the baseline: ``caption`` with --strong on every key (field ``strong_all``), scored and grounded.

Columns, on the same keys (every key): keys captioned by the strong model, device-seconds spent (GPU-seconds
on a GPU; worker-seconds on the CPU, where a worker counts as one device), grounded and valid nouns per image,
and the device-hours per 1M images; the last line is the saving of the cascade per 1M images, and whether its
grounded density is at least the baseline's. The tiny models' captions are random words: on the CPU the
figures show that the accounting adds up, not which cascade wins.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench_data import photos
from rich.console import Console
from rich.table import Table

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

WEAKEST = (
    "SELECT key FROM (SELECT key, row_number() OVER (ORDER BY n_grounded_nouns, clip_score, key) AS rank, "
    "count(*) OVER () AS n FROM grounding WHERE field = 'cheap' AND NOT missing) WHERE rank <= n * {share}"
)
# Per field on every key: captions, device-seconds spent (a merged field's: its sources'), whether on the CPU.
COST_SQL = """
SELECT captioner, count(*), sum(CASE WHEN coalesce(gpu_seconds, 0) > 0 THEN gpu_seconds ELSE seconds END),
       bool_or(coalesce(gpu_seconds, 0) = 0 AND seconds > 0)
FROM captions GROUP BY captioner
"""
DENSITY_SQL = """
SELECT g.field, avg(g.n_grounded_nouns), avg(d.n_valid_nouns)
FROM grounding g JOIN density d USING (field, key) GROUP BY g.field
"""
SECONDS_PER_HOUR = 3600.0


def tiny_models(work: Path) -> dict[str, str]:
    """The tiny random-weight captioners and CLIP that `densecurate models make-tiny` writes."""
    from captioner.tiny import make_tiny_llava
    from captioner.tiny_qwen2_vl import make_tiny_qwen2_vl
    from trainer.tiny import make_tiny_clip

    return {
        "cheap": str(make_tiny_llava(work / "models" / "llava")),
        "strong": str(make_tiny_qwen2_vl(work / "models" / "qwen2_vl")),
        "clip": "local-dir:" + str(make_tiny_clip(work / "models" / "clip")),
    }


def build_root(work: Path, count: int) -> Path:
    from pipeline.stages.shard import run_shard_stage
    from schemas.shard_config import ShardConfig

    folder = work / "photos"
    folder.mkdir(parents=True)
    images = photos()
    for i in range(count):
        shutil.copy(images[i % len(images)], folder / f"{i:06d}{images[i % len(images)].suffix}")
    root = work / "root"
    run_shard_stage([folder], root, ShardConfig(shard_size=max(1, count // 4), image={"resize": 512}))
    return root


def caption(root: Path, name: str, model: str, args: argparse.Namespace, keys_query: str | None = None) -> float:
    """Caption ``name`` with ``model``; returns the wall seconds."""
    from pipeline.stages.caption import run_caption_stage
    from schemas.caption_config import CaptionConfig

    config = CaptionConfig.model_validate(
        {
            "name": name,
            "model": {"model": model, "dtype": args.dtype, "device": args.device},
            "generation": {"prompt": "pixart", "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens},
            "keys_query": keys_query,
        }
    )
    started = time.perf_counter()
    run_caption_stage(root, config)
    return time.perf_counter() - started


def score_and_ground(root: Path, fields: tuple[str, ...], clip: dict, args: argparse.Namespace) -> None:
    from pipeline.stages.ground import run_ground_stage
    from pipeline.stages.score import run_score_stage
    from schemas.ground_config import GroundConfig
    from schemas.score_config import ScoreConfig

    run_score_stage(root, ScoreConfig(fields=fields, min_count=args.min_count))
    run_ground_stage(root, GroundConfig.model_validate({"fields": fields, "clip": clip, "batch_size": 16}))


def figures(root: Path) -> dict[str, dict]:
    """Per field: captions made, device-seconds spent, on the CPU or not, grounded and valid nouns per image."""
    from pipeline.store.catalog import run_query

    cost = {
        f: {"captions": n, "seconds": s or 0.0, "on_cpu": bool(cpu)} for f, n, s, cpu in run_query(root, COST_SQL)[1]
    }
    for field, grounded, valid in run_query(root, DENSITY_SQL)[1]:
        cost.setdefault(field, {}).update(grounded=grounded, valid=valid)
    return cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--cheap", help="the cheap captioner (default: tiny LLaVA)")
    parser.add_argument("--strong", help="the strong captioner (default: tiny Qwen2-VL)")
    parser.add_argument("--clip", help="open_clip model for grounding (default: the tiny CLIP)")
    parser.add_argument("--clip-pretrained", help="its open_clip pretrained tag (e.g. openai)")
    parser.add_argument("--recaption-share", type=float, default=0.3, help="share of cheap captions recaptioned")
    parser.add_argument("--keys-query", help="choose the keys to recaption (default: the weakest --recaption-share)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--min-count", type=int, default=1, help="valid nouns: seen more than this often")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    from pipeline.core.ray_cluster import init_ray
    from pipeline.stages.merge import run_merge_stage
    from schemas.merge_config import MergeConfig

    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tiny = tiny_models(work) if not (args.cheap and args.strong and args.clip) else {}
        cheap, strong = args.cheap or tiny["cheap"], args.strong or tiny["strong"]
        clip = {
            "model": args.clip or tiny["clip"],
            **({"pretrained": args.clip_pretrained} if args.clip_pretrained else {}),
        }
        init_ray()
        root = build_root(work, args.images)
        wall = {"cheap": caption(root, "cheap", cheap, args)}
        score_and_ground(root, ("cheap",), clip, args)
        query = args.keys_query or WEAKEST.format(share=args.recaption_share)
        wall["strong"] = caption(root, "strong", strong, args, keys_query=query)
        wall["strong_all"] = caption(root, "strong_all", strong, args)
        score_and_ground(root, ("cheap", "strong", "strong_all"), clip, args)
        run_merge_stage(root, MergeConfig(name="cascade", fields=("cheap", "strong"), by="grounded_nouns"))
        score_and_ground(root, ("cheap", "strong", "strong_all", "cascade"), clip, args)
        found = figures(root)
    print_table(console, found, args.images, query)
    if args.json:
        args.json.write_text(
            json.dumps({"images": args.images, "query": query, "fields": found, "wall": wall}, indent=2)
        )


def print_table(console: Console, found: dict[str, dict], images: int, query: str) -> None:
    base, cascade = found["strong_all"], found["cascade"]
    unit = "CPU worker" if base["on_cpu"] else "GPU"
    table = Table("", "strong on every key (baseline)", "cascade", title=f"targeted recaptioning, {images} images")
    table.add_row("keys captioned by the strong model", f"{base['captions']:,}", f"{found['strong']['captions']:,}")
    table.add_row(f"{unit}-seconds spent", f"{base['seconds']:.1f}", f"{cascade['seconds']:.1f}")
    table.add_row("grounded nouns per image", f"{base['grounded']:.2f}", f"{cascade['grounded']:.2f}")
    table.add_row("valid nouns per image", f"{base['valid']:.2f}", f"{cascade['valid']:.2f}")
    per_million = {k: v["seconds"] / images * 1e6 / SECONDS_PER_HOUR for k, v in (("a", base), ("b", cascade))}
    table.add_row(f"{unit}-hours per 1M images", f"{per_million['a']:,.0f}", f"{per_million['b']:,.0f}")
    table.add_row("", "", "")
    saving = per_million["a"] - per_million["b"]
    verdict = "at least" if cascade["grounded"] >= base["grounded"] else "below"
    table.add_row(f"saving per 1M images ({unit}-hours)", "", f"{saving:,.0f} ({saving / per_million['a']:.0%})")
    table.add_row("cascade's grounded density", "", f"{verdict} the baseline's")
    console.print(table)
    console.print(f"keys recaptioned: {query}", soft_wrap=True)


if __name__ == "__main__":
    main()
