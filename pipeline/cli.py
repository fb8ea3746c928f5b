"""The ``densecurate`` command line."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import duckdb
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from captioner.errors import ModelNotAvailableError
from pipeline.catalog import run_query
from pipeline.nouns import SpacyModelNotAvailableError
from pipeline.table_output import print_rows
from schemas.caption_config import CaptionConfig
from schemas.features_config import FeaturesConfig
from schemas.pipeline_spec import STAGES, PipelineSpec, parse_spec, resolve_paths
from schemas.score_config import (
    ALT_TEXT_FIELD,
    DEFAULT_SPACY_MODEL,
    CurateConfig,
    CurateRules,
    NounSettings,
    ScoreConfig,
)
from schemas.shard_config import ShardConfig
from schemas.train_config import load_train_config

console = Console(stderr=True, soft_wrap=True)


def _add_ray_options(p: argparse.ArgumentParser, workers_help: str) -> None:
    p.add_argument("--workers", type=int, help=workers_help)
    p.add_argument("--ray-address", help="Ray cluster to run on (default: a local Ray on 127.0.0.1)")


def _add_shard_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "shard",
        help="pack images (SA-1B, img2dataset/LAION, folders, Parquet) into webdataset shards",
        description="Write ROOT/shards/NNNNN.tar, NNNNN.parquet and NNNNN_stats.json from the sources. "
        "Finished shards are skipped on a rerun.",
    )
    p.add_argument("src", nargs="+", type=Path, help="source paths (folders, tars, Parquet tables)")
    p.add_argument("--out", required=True, type=Path, help="dataset root")
    p.add_argument("--format", default="auto", choices=["auto", "folder", "sa1b", "img2dataset", "parquet"])
    p.add_argument("--resize", type=int, default=512, help="short side after resizing; 0 keeps the size")
    p.add_argument("--crop", default="none", choices=["center", "none"], help="center: square crop")
    p.add_argument("--shard-size", type=int, default=1000, help="input records per shard")
    p.add_argument("--min-size", type=int, default=64, help="skip images whose short side is smaller")
    p.add_argument("--max-aspect", type=float, default=4.0, help="skip images with a larger long/short ratio")
    p.add_argument("--max-pixels", type=int, default=100_000_000, help="refuse larger images before decoding")
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--source-name", help="key prefix (default: the format's name)")
    p.add_argument("--image-column", default="image_path", help="parquet: column with the image path")
    p.add_argument("--caption-column", default="caption", help="parquet: column with the alt text")
    p.add_argument("--id-column", help="parquet: column with the original id (default: the image path)")
    _add_ray_options(p, "shards processed at once (default: every CPU)")
    p.set_defaults(handler=_cmd_shard)


def _add_query_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "query",
        help="run SQL on the dataset's tables with DuckDB (read-only)",
        description="Views: samples (ROOT/shards/*.parquet). The catalog is also in ROOT/catalog.duckdb.",
    )
    p.add_argument("root", type=Path, help="dataset root")
    p.add_argument("sql", help='SQL, e.g. "SELECT status, count(*) FROM samples GROUP BY ALL"')
    p.add_argument("--format", default="table", choices=["table", "csv", "json"])
    p.set_defaults(handler=_cmd_query)


def _add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the pipeline offline on the bundled sample photos",
        description="Runs jobs/examples/demo.yaml with DIR for demo_out: sample photos, tiny models, shard, "
        "caption, score, report (DIR/report.html), curate, features, train, export (DIR/export).",
    )
    p.add_argument("--out", required=True, type=Path, help="demo directory")
    p.set_defaults(handler=_cmd_demo)


def _add_caption_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "caption",
        help="write dense captions for every shard with a LLaVA-family model (Ray actors, one per GPU)",
        description="Reads ROOT/shards/*.tar, writes ROOT/captions/NAME/NNNNN.parquet (one row per key). "
        "Finished shards are skipped on a rerun.",
    )
    p.add_argument("root", type=Path, help="dataset root")
    p.add_argument("--model", required=True, help="hub id (e.g. llava-hf/llava-1.5-7b-hf) or local directory")
    p.add_argument("--name", help="captioner name, the folder under ROOT/captions (default: from the model)")
    p.add_argument("--prompt", default="pixart", help="pixart | pixart-alt | free text, may hold {alt_text}")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); above 0 samples")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--revision", help="model revision (branch, tag or commit)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repo's own code (off by default)")
    p.add_argument("--gpus-per-worker", type=float, default=1.0)
    _add_ray_options(p, "model replicas (default: one per GPU, or 1 on CPU)")
    p.set_defaults(handler=_cmd_caption)


def _add_models_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="model utilities", description="Model utilities.")
    models_sub = p.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    tiny = models_sub.add_parser(
        "make-tiny",
        help="write tiny random-weight models of the real architectures (tests, offline demo)",
        description="Writes OUT/llava: a tiny LLaVA (CLIP vision tower + Llama, locally trained tokenizer, "
        "chat template), OUT/pixart: a tiny PixArtAlphaPipeline folder (T5 encoder, VAE, transformer, "
        "scheduler), and OUT/clip: a tiny open_clip model (local-dir:OUT/clip); all load like hub models.",
    )
    tiny.add_argument("out", type=Path)
    tiny.set_defaults(handler=_cmd_make_tiny)


def _add_nouns_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spacy-model", default=DEFAULT_SPACY_MODEL, help="installed spaCy pipeline")
    p.add_argument("--nouns", default="all", choices=["all", "common"], help="all: NOUN+PROPN; common: NOUN")
    p.add_argument("--min-count", type=int, default=10, help="a noun is valid when seen more than this often")


def _add_score_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="concept density: nouns per caption for alt text and captioners, and each field's vocabulary",
        description="Writes ROOT/density/FIELD/NNNNN.parquet and ROOT/vocab/FIELD.parquet.",
    )
    p.add_argument("root", type=Path, help="dataset root")
    p.add_argument(
        "--field", action="append", help="alt_text or a captioner name; repeat for several (default: alt_text)"
    )
    _add_nouns_options(p)
    _add_ray_options(p, "spaCy processes (default: every CPU)")
    p.set_defaults(handler=_cmd_score)


def _add_density_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "density",
        help="the Table-1 row of a caption table on its own (Parquet, CSV or JSONL; no images needed)",
        description="Scores one text column and prints PixArt-alpha's Table-1 numbers for it.",
    )
    p.add_argument("file", type=Path)
    p.add_argument("--column", required=True, help="the caption column")
    _add_nouns_options(p)
    p.add_argument("--format", default="table", choices=["table", "json"])
    p.set_defaults(handler=_cmd_density)


def _add_curate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "curate",
        help="keep samples whose chosen caption is dense enough, as new webdataset shards",
        description="Writes OUT/NNNNN.tar (KEY.jpg, KEY.txt = the caption of --field, KEY.json with density), "
        "OUT/NNNNN.parquet and OUT/NNNNN_stats.json, and prints how many samples each rule removed. "
        "Rules come from --config (YAML with the keys min_valid_nouns, min_nouns, drop_flagged, min_words); "
        "options given on the command line override it.",
    )
    p.add_argument("root", type=Path, help="dataset root (scored for --field)")
    p.add_argument("--field", required=True, help="alt_text or a captioner name: the caption to keep")
    p.add_argument("--out", required=True, type=Path, help="output folder of the curated shards")
    p.add_argument("--min-valid-nouns", type=int, help="drop captions with fewer valid noun occurrences")
    p.add_argument("--min-nouns", type=int, help="drop captions with fewer noun occurrences")
    p.add_argument("--min-words", type=int, help="drop captions with fewer words (default 1: no caption)")
    p.add_argument("--drop-flagged", action="store_true", default=None, help="drop truncated/repetitive/empty")
    p.add_argument("--config", type=Path, help="curate.yaml with the rules")
    _add_ray_options(p, "tasks at once (default: every CPU)")
    p.set_defaults(handler=_cmd_curate)


def _add_features_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "features",
        help="precompute VAE posteriors and T5 states of curated shards for training",
        description="Writes FEATS/NNNNN.tar (KEY.feat.safetensors: VAE mean+std and T5 states, fp16; KEY.txt; "
        "KEY.json), NNNNN.parquet, NNNNN_stats.json and null_caption.safetensors. Finished shards are skipped.",
    )
    p.add_argument("curated", type=Path, help="folder of curated shards (densecurate curate --out)")
    p.add_argument("--out", required=True, type=Path, help="folder of the feature shards")
    p.add_argument("--vae", required=True, help="AutoencoderKL: hub id or directory (a PixArt pipeline folder works)")
    p.add_argument("--text-encoder", required=True, help="T5 encoder and tokenizer: hub id or directory")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--gpus-per-worker", type=float, default=1.0)
    _add_ray_options(p, "encoder replicas (default: one per GPU, or 1 on CPU)")
    p.set_defaults(handler=_cmd_features)


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train the PixArt-alpha alignment stage on feature shards",
        description="CONFIG is YAML (see trainer/configs/alignment_256.yaml and tiny.yaml); key.path=value "
        "arguments override it. Checkpoints, TensorBoard logs and sample grids go to run_dir.",
    )
    p.add_argument("config", type=Path, help="training config (YAML)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 data.batch_size=32")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in run_dir")
    p.add_argument("--workers", type=int, help="Ray Train workers (DDP), overriding the config's `workers`")
    p.add_argument("--ray-address", help="Ray cluster for --workers > 1 (default: a local Ray on 127.0.0.1)")
    p.set_defaults(handler=_cmd_train)


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a run's latest checkpoint as a folder PixArtAlphaPipeline.from_pretrained loads",
        description="Transformer (or its EMA with --ema), the run's VAE, T5 encoder and tokenizer, DPM-Solver.",
    )
    p.add_argument("run", type=Path, help="run directory (run_dir of the training config)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    p.set_defaults(handler=_cmd_export)


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="generate images for prompts with an exported pipeline and report their CLIP score",
        description="CLIP score = 100 * max(cosine(image, prompt), 0) with an open_clip model, per prompt and mean.",
    )
    p.add_argument("pipeline", type=Path, help="exported pipeline folder (densecurate export --out)")
    p.add_argument("--prompts", required=True, type=Path, help="text file, one prompt per line")
    p.add_argument("--clip-model", default="ViT-L-14", help="open_clip model name, or local-dir:DIR")
    p.add_argument("--clip-pretrained", default="openai", help="open_clip weights tag or file")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=Path, help="save the generated images here")
    p.add_argument("--format", default="table", choices=["table", "json"])
    p.set_defaults(handler=_cmd_eval)


def _add_spec_parsers(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser(
        "run",
        help="run a pipeline spec in this process (local Ray), stage after stage, skipping what is done",
        description="SPEC is YAML (see jobs/examples/); relative paths are taken from the current directory.",
    )
    run.add_argument("spec", type=Path)
    run.add_argument("--stage", action="append", help="run only this stage (repeatable)")
    run.set_defaults(handler=_cmd_run)
    submit = sub.add_parser(
        "submit",
        help="submit a pipeline spec to a Ray cluster as a job (Ray Job Submission API)",
        description="Validates the spec, resolves its relative paths here, and submits it with a runtime "
        "environment that carries densecurate's packages. Address: --address, else RAY_ADDRESS, else "
        "the local head (http://127.0.0.1:8265).",
    )
    submit.add_argument("spec", type=Path)
    submit.add_argument("--address", help="the cluster's dashboard, e.g. http://127.0.0.1:8265")
    submit.add_argument("--stage", action="append", help="run only this stage (repeatable)")
    submit.add_argument("--follow", action="store_true", help="stream the logs until the job ends")
    submit.set_defaults(handler=_cmd_submit)
    jobs = sub.add_parser("jobs", help="list, inspect, read or stop submitted jobs", description="Ray jobs.")
    jobs.add_argument("action", choices=["list", "status", "logs", "stop"])
    jobs.add_argument("job_id", nargs="?", help="needed by status, logs and stop")
    jobs.add_argument("--address", help="the cluster's dashboard (default: RAY_ADDRESS, then the local head)")
    jobs.set_defaults(handler=_cmd_jobs)


def _add_report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="compare caption fields: Table-1 rows side by side, noun distributions, long tail, flags",
        description="Prints the report; with --html also writes one self-contained page with plots and a gallery.",
    )
    p.add_argument("root", type=Path, help="dataset root (scored)")
    p.add_argument("--html", type=Path, help="write the HTML report here")
    p.add_argument("--gallery", type=int, default=8, help="samples in the HTML gallery")
    p.add_argument("--spacy-model", default=DEFAULT_SPACY_MODEL, help="for marking nouns in the gallery")
    p.set_defaults(handler=_cmd_report)


def _add_stats_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stats",
        help="the common questions: counts by status and source, captions, nouns per image, top nouns",
        description="Runs the common DuckDB queries on the dataset root's catalog.",
    )
    p.add_argument("root", type=Path, help="dataset root")
    p.set_defaults(handler=_cmd_stats)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="densecurate",
        description="Build text-to-image training data with dense, concept-rich captions.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_shard_parser(sub)
    _add_query_parser(sub)
    _add_caption_parser(sub)
    _add_score_parser(sub)
    _add_density_parser(sub)
    _add_stats_parser(sub)
    _add_report_parser(sub)
    _add_curate_parser(sub)
    _add_features_parser(sub)
    _add_train_parser(sub)
    _add_export_parser(sub)
    _add_eval_parser(sub)
    _add_spec_parsers(sub)
    _add_models_parser(sub)
    _add_demo_parser(sub)
    return parser


def shard_config_from_args(args: argparse.Namespace) -> ShardConfig:
    """Validate the shard options into a ``ShardConfig``."""
    return ShardConfig.model_validate(
        {
            "sources": {
                "format": args.format,
                "source_name": args.source_name,
                "image_column": args.image_column,
                "caption_column": args.caption_column,
                "id_column": args.id_column,
            },
            "image": {
                "resize": args.resize,
                "crop": args.crop,
                "min_size": args.min_size,
                "max_aspect": args.max_aspect,
                "max_pixels": args.max_pixels,
                "jpeg_quality": args.jpeg_quality,
            },
            "shard_size": args.shard_size,
            "workers": args.workers,
            "ray_address": args.ray_address,
        }
    )


def print_shard_summary(summary, root: Path) -> None:
    """The end-of-run summary: written, skipped by reason, speed."""
    table = Table(title=f"shard stage -> {root}/shards", show_header=False)
    table.add_row("inputs", str(summary.inputs))
    table.add_row("written", str(summary.written))
    table.add_row("skipped", str(summary.skipped))
    for reason, count in sorted(summary.skipped_by_reason.items()):
        table.add_row(f"  skipped: {reason}", str(count))
    table.add_row("shards", f"{summary.shards} ({summary.shards_reused} already done)")
    table.add_row(
        "speed",
        f"{summary.images_processed} images in {summary.seconds:.1f} s = {summary.images_per_second:.1f} images/s",
    )
    Console().print(table)


def _cmd_shard(args: argparse.Namespace) -> int:
    from pipeline.shard_stage import run_shard_stage  # imports Ray: only when needed

    config = shard_config_from_args(args)
    summary = run_shard_stage(args.src, args.out, config)
    print_shard_summary(summary, args.out)
    return 0


def default_captioner_name(model: str) -> str:
    """``llava-hf/llava-1.5-7b-hf`` -> ``llava-1.5-7b-hf``; a directory -> its name."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(model.rstrip("/")).name)
    return name or "captioner"


def caption_config_from_args(args: argparse.Namespace) -> CaptionConfig:
    """Validate the caption options into a ``CaptionConfig``."""
    return CaptionConfig.model_validate(
        {
            "name": args.name or default_captioner_name(args.model),
            "model": {
                "model": args.model,
                "revision": args.revision,
                "dtype": args.dtype,
                "device": args.device,
                "trust_remote_code": args.trust_remote_code,
            },
            "generation": {
                "prompt": args.prompt,
                "batch_size": args.batch_size,
                "max_new_tokens": args.max_new_tokens,
                "temperature": args.temperature,
                "top_p": args.top_p,
                "seed": args.seed,
            },
            "workers": args.workers,
            "gpus_per_worker": args.gpus_per_worker,
            "ray_address": args.ray_address,
        }
    )


def print_caption_summary(summary, root: Path, name: str) -> None:
    """The end-of-run summary of the caption stage."""
    t = summary.totals
    table = Table(title=f"caption stage -> {root}/captions/{name}", show_header=False)
    table.add_row("keys", str(t["count"]))
    table.add_row("captioned", str(t["ok"]))
    for reason, count in sorted(summary.errors_by_reason.items()):
        table.add_row(f"  error: {reason}", str(count))
    for flag in ("truncated", "repetitive", "empty"):
        table.add_row(f"  flagged {flag}", str(t[flag]))
    table.add_row("shards", f"{summary.shards} ({summary.shards_reused} already done)")
    if summary.seconds and summary.captions_this_run:
        rate = summary.captions_this_run / summary.seconds
        table.add_row("speed", f"{rate:.2f} captions/s on {summary.workers} {summary.device} worker(s)")
    Console().print(table)


def _cmd_caption(args: argparse.Namespace) -> int:
    from pipeline.caption_stage import run_caption_stage

    config = caption_config_from_args(args)
    summary = run_caption_stage(args.root, config)
    print_caption_summary(summary, args.root, config.name)
    return 0


def _noun_settings(args: argparse.Namespace) -> dict:
    return {"spacy_model": args.spacy_model, "nouns": args.nouns}


def _cmd_score(args: argparse.Namespace) -> int:
    from pipeline.score_stage import run_score_stage

    config = ScoreConfig.model_validate(
        {
            "fields": args.field or [ALT_TEXT_FIELD],
            "nouns": _noun_settings(args),
            "min_count": args.min_count,
            "workers": args.workers,
            "ray_address": args.ray_address,
        }
    )
    results = run_score_stage(args.root, config)
    table = Table("field", "captions", "missing", "nouns", "distinct texts tagged", "shards", title="score stage")
    for r in results:
        t = r.totals
        shards = f"{r.shards} ({r.shards_reused} already done)"
        table.add_row(
            r.field, str(t["count"]), str(t["missing"]), str(t["total_nouns"]), str(t["texts_tagged"]), shards
        )
    Console().print(table)
    from pipeline.report import print_table1

    print_table1(args.root)
    return 0


def _cmd_density(args: argparse.Namespace) -> int:
    from pipeline.density_file import score_file

    settings = NounSettings.model_validate(_noun_settings(args))
    row = score_file(args.file, args.column, settings, min_count=args.min_count)
    if args.format == "json":
        print(json.dumps(row.as_json(), indent=1))
    else:
        from pipeline.report import table1_table

        Console().print(table1_table([row], title=f"{args.file} [{args.column}]"))
    return 0


def curate_config_from_args(args: argparse.Namespace) -> CurateConfig:
    """Rules from --config, overridden by the options given; validated with the file named in errors."""
    rules: dict = {}
    if args.config:
        loaded = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: expected a mapping of rules, got {type(loaded).__name__}")
        rules = loaded.get("rules", loaded)
        try:
            CurateRules.model_validate(rules)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ValueError(f"{args.config}: {where}: {err['msg']}") from None
    for name in ("min_valid_nouns", "min_nouns", "min_words", "drop_flagged"):
        if getattr(args, name) is not None:
            rules[name] = getattr(args, name)
    return CurateConfig.model_validate(
        {"field": args.field, "rules": rules, "workers": args.workers, "ray_address": args.ray_address}
    )


def _cmd_curate(args: argparse.Namespace) -> int:
    from pipeline.curate_stage import RULE_ORDER, run_curate_stage

    config = curate_config_from_args(args)
    summary = run_curate_stage(args.root, args.out, config)
    table = Table(title=f"curate {config.field} -> {args.out}", show_header=False)
    table.add_row("samples", str(summary.inputs))
    for rule in RULE_ORDER:
        table.add_row(f"  removed by {rule}", str(summary.removed_by_rule.get(rule, 0)))
    table.add_row("kept", str(summary.kept))
    table.add_row("shards", f"{summary.shards} ({summary.shards_reused} already done)")
    Console().print(table)
    return 0


def _cmd_features(args: argparse.Namespace) -> int:
    from pipeline.features_stage import run_features_stage

    keys = ("vae", "text_encoder", "resolution", "max_tokens", "batch_size", "device", "workers", "gpus_per_worker")
    config = FeaturesConfig.model_validate({k: getattr(args, k) for k in (*keys, "ray_address")})
    run = run_features_stage(args.curated, args.out, config)
    samples = sum(s["successes"] for s in run.stats)
    Console().print(f"features: {samples} samples in {len(run.stats)} shards ({run.reused} already done) -> {args.out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from trainer.launch import launch_training

    overrides = [*args.overrides, *([f"workers={args.workers}"] if args.workers else [])]
    config = load_train_config(args.config.read_text(), overrides, source=str(args.config))
    if config.workers > 1:
        from pipeline.ray_runner import init_ray

        init_ray(args.ray_address)
    result = launch_training(config, resume=args.resume)
    Console().print(f"trained to step {result.step}; checkpoints in {result.run_dir / 'checkpoints'}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from trainer.export import export_pipeline

    out = export_pipeline(args.run, args.out, ema=args.ema)
    Console().print(f"exported {'EMA ' if args.ema else ''}pipeline to {out}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from trainer.evaluate import evaluate, read_prompts

    scores = evaluate(
        args.pipeline,
        read_prompts(args.prompts),
        clip_model=args.clip_model,
        clip_pretrained=args.clip_pretrained,
        resolution=args.resolution,
        steps=args.steps,
        seed=args.seed,
        images_out=args.images,
    )
    mean = sum(s.clip_score for s in scores) / len(scores)
    if args.format == "json":
        print(json.dumps({"clip_score": mean, "prompts": [vars(s) for s in scores]}, indent=1))
    else:
        print_rows(
            ["prompt", "clip_score"], [(s.prompt, f"{s.clip_score:.2f}") for s in scores] + [("mean", f"{mean:.2f}")]
        )
    return 0


def _load_spec(path: Path) -> PipelineSpec:
    if not path.is_file():
        raise FileNotFoundError(f"spec {path} does not exist")
    return resolve_paths(parse_spec(path.read_text(), source=str(path)), Path.cwd())


def _check_stages(stages: list[str] | None) -> None:
    unknown = [s for s in stages or () if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r} (stages: {', '.join(STAGES)})")


def _cmd_run(args: argparse.Namespace) -> int:
    from jobs.stages import run_pipeline

    _check_stages(args.stage)
    run_pipeline(_load_spec(args.spec), only=args.stage)
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from jobs.submission import follow, job_address, submit

    _check_stages(args.stage)
    spec = _load_spec(args.spec)
    job_id = submit(spec, address=args.address, stages=args.stage)
    print(job_id, flush=True)
    console.print(f"submitted {spec.name} to {job_address(args.address)} as {job_id}")
    if args.follow:
        status = follow(job_id, address=args.address)
        console.print(f"job {job_id}: {status}")
        return 0 if status == "SUCCEEDED" else 1
    return 0


def _cmd_jobs(args: argparse.Namespace) -> int:
    from jobs.submission import client

    jobs = client(args.address)
    if args.action == "list":
        rows = [
            (j.submission_id, str(j.status.value), (j.metadata or {}).get("densecurate_spec", ""), j.entrypoint[:60])
            for j in jobs.list_jobs()
        ]
        print_rows(["job_id", "status", "spec", "entrypoint"], rows)
        return 0
    if not args.job_id:
        raise ValueError(f"`densecurate jobs {args.action}` needs a job id")
    if args.action == "status":
        print(jobs.get_job_status(args.job_id).value)
    elif args.action == "logs":
        print(jobs.get_job_logs(args.job_id), end="")
    else:
        stopped = jobs.stop_job(args.job_id)
        print("stopped" if stopped else "not running")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from pipeline.report import gather_report, print_report

    reports = gather_report(args.root)
    print_report(reports)
    if args.html:
        from pipeline.report_html import write_html_report

        write_html_report(args.root, reports, args.html, gallery=args.gallery, spacy_model=args.spacy_model)
        Console().print(f"HTML report written to {args.html}")
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from pipeline.stats_queries import print_stats

    print_stats(args.root)
    return 0


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from captioner.tiny import make_tiny_llava
    from trainer.tiny import make_tiny_clip, make_tiny_pixart

    llava = make_tiny_llava(args.out / "llava")
    pixart = make_tiny_pixart(args.out / "pixart")
    clip = make_tiny_clip(args.out / "clip")
    Console().print(f"tiny models (random weights, for tests): {llava}, {pixart}, {clip} (local-dir:{clip})")
    return 0


def _cmd_query(args: argparse.Namespace) -> int:
    columns, rows = run_query(args.root, args.sql)
    print_rows(columns, rows, args.format)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from jobs.demo import run_demo

    run_demo(args.out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``densecurate`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ValidationError as exc:
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            option = "--" + str(err["loc"][-1]).replace("_", "-")
            console.print(f"[red]error:[/red] {field} ({option}): {err['msg']}")
        return 2
    except (FileNotFoundError, ValueError, duckdb.Error, ModelNotAvailableError, SpacyModelNotAvailableError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
