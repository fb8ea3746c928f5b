"""The ``densecurate`` command line."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from importlib.metadata import version as package_version
from pathlib import Path
from typing import get_args

from pydantic import ValidationError
from rich.markup import escape

from densecurate import commands
from densecurate.quiet import quiet_libraries
from schemas.atomic import TMP_MARK
from schemas.errors import EnvironmentFailure, UserError
from schemas.merge_config import MergeRule
from schemas.pipeline_spec import STAGES
from schemas.score_config import DEFAULT_MAX_TEXT_CHARS, DEFAULT_SPACY_MODEL
from schemas.shard_config import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_OUTPUT_SIDE, DEFAULT_MAX_SIDECAR_BYTES

console = commands.console


def _path(text: str) -> Path:
    """A path argument; an empty string, which would name the current directory, is refused."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty string is not a path")
    return Path(text)


def _add_rerun_options(p: argparse.ArgumentParser, *, replace: bool) -> None:
    p.add_argument(
        "--repair",
        action="store_true",
        help="check finished outputs in depth (see `densecurate verify`) and redo exactly the damaged ones",
    )
    if replace:
        p.add_argument(
            "--replace",
            action="store_true",
            help="let this run replace or remove finished outputs of an earlier run (refused without it)",
        )


def _add_fields_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--field", action="append", help="alt_text or a captioner name; repeat for several (default: alt_text)"
    )


def _add_ray_options(p: argparse.ArgumentParser, workers_help: str) -> None:
    p.add_argument("--workers", type=int, help=workers_help)
    p.add_argument("--ray-address", help="Ray cluster to run on (default: a local Ray on 127.0.0.1)")


def _add_model_worker_options(
    p: argparse.ArgumentParser,
    *,
    batch_size: int,
    batch_help: str | None = None,
    device_help: str | None = "auto | cpu | cuda",
) -> None:
    """``--batch-size``, ``--device`` and ``--gpus-per-worker``: the options of a stage whose workers hold a model."""
    p.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    p.add_argument("--device", default="auto", help=device_help)
    p.add_argument("--gpus-per-worker", type=float, default=1.0)


def _add_shard_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "shard",
        help="pack images (SA-1B, img2dataset/LAION, folders, Parquet) into webdataset shards",
        description="Write ROOT/shards/NNNNN.tar, NNNNN.parquet and NNNNN_stats.json from the sources. "
        "Finished shards are skipped on a rerun.",
    )
    p.add_argument("src", nargs="+", type=_path, help="source paths (folders, tars, Parquet tables)")
    p.add_argument("--out", required=True, type=_path, help="dataset root")
    p.add_argument("--format", default="auto", choices=["auto", "folder", "sa1b", "img2dataset", "parquet"])
    p.add_argument("--resize", type=int, default=512, help="short side after resizing; 0 keeps the size")
    p.add_argument("--crop", default="none", choices=["center", "none"], help="center: square crop")
    p.add_argument("--shard-size", type=int, default=1000, help="input records per shard")
    p.add_argument("--min-size", type=int, default=64, help="skip images whose short side is smaller")
    p.add_argument("--max-aspect", type=float, default=4.0, help="skip images with a larger long/short ratio")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=100_000_000,
        help="skip images with more pixels (by the header, before decoding) or whose resized image would have more",
    )
    p.add_argument(
        "--max-output-side",
        type=int,
        default=DEFAULT_MAX_OUTPUT_SIDE,
        help="the largest --resize accepted (at most 65535, JPEG's limit)",
    )
    p.add_argument(
        "--max-file-bytes",
        type=int,
        default=DEFAULT_MAX_FILE_BYTES,
        help="skip image files and tar members larger than this (bytes; default 256 MiB)",
    )
    p.add_argument(
        "--max-sidecar-bytes",
        type=int,
        default=DEFAULT_MAX_SIDECAR_BYTES,
        help="skip records whose .json/.txt sidecar is larger than this (bytes; default 16 MiB)",
    )
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--source-name", help="key prefix (default: the format's name)")
    p.add_argument("--image-column", default="image_path", help="parquet: column with the image path")
    p.add_argument("--caption-column", default="caption", help="parquet: column with the alt text")
    p.add_argument("--id-column", help="parquet: column with the original id (default: the image path)")
    _add_ray_options(p, "shards processed at once (default: every CPU)")
    _add_rerun_options(p, replace=True)
    p.set_defaults(handler=commands.cmd_shard)


def _add_query_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "query",
        help="run SQL on the dataset's tables with DuckDB (read-only)",
        description="Views (each once its tables exist): samples, captions, density, vocab, embeddings (without "
        "the vectors; embedding_vectors has them), grounding, noun_calibration, duplicates. The catalog is also in "
        "ROOT/catalog.duckdb.",
    )
    p.add_argument("root", type=_path, help="dataset root")
    p.add_argument("sql", help='SQL, e.g. "SELECT status, count(*) FROM samples GROUP BY ALL"')
    p.add_argument("--format", default="table", choices=["table", "csv", "json"])
    p.set_defaults(handler=commands.cmd_query)


def _add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the pipeline offline on the bundled sample photos",
        description="Runs jobs/examples/demo.yaml with DIR for demo_out: sample photos, tiny models, shard, "
        "caption, score, report (DIR/report.html), curate, features, train, export (DIR/export).",
    )
    p.add_argument("--out", required=True, type=_path, help="demo directory")
    p.set_defaults(handler=commands.cmd_demo)


def _add_caption_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "caption",
        help="write dense captions for every shard with a vision-language model (LLaVA, Qwen2-VL, SmolVLM; Ray "
        "actors, one per GPU)",
        description="Reads ROOT/shards/*.tar, writes ROOT/captions/NAME/NNNNN.parquet (one row per key). "
        "Finished shards are skipped on a rerun.",
    )
    p.add_argument("root", type=_path, help="dataset root")
    p.add_argument("--model", required=True, help="hub id (e.g. llava-hf/llava-1.5-7b-hf) or local directory")
    p.add_argument("--name", help="captioner name, the folder under ROOT/captions (default: from the model)")
    p.add_argument("--prompt", default="pixart", help="pixart | pixart-alt | free text, may hold {alt_text}")
    _add_model_worker_options(p, batch_size=8)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); above 0 samples")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--revision", help="model revision (branch, tag or commit)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repo's own code (off by default)")
    p.add_argument(
        "--max-image-pixels",
        type=int,
        metavar="N",
        help="downscale larger images (aspect kept) to N pixels before the processor (default: the model family's: "
        "451584 for Qwen2-VL / Qwen2.5-VL, no cap for others)",
    )
    p.add_argument(
        "--sample",
        type=float,
        help="caption a reproducible sample of each shard: N keys, or a fraction below 1 (e.g. 0.01); the same keys "
        "for every model, so captioners can be compared before a full run (which keeps the sampled rows)",
    )
    p.add_argument("--sample-seed", type=int, default=0, help="which keys --sample takes")
    p.add_argument(
        "--keys-query",
        metavar="SQL",
        help="caption only the keys a read-only DuckDB query over the catalog's views returns (its `key` column), "
        "e.g. \"SELECT key FROM grounding WHERE field = 'cheap' AND (grounded_share < 0.6 OR n_nouns < 8)\"; "
        "recorded with the fingerprints of the tables it read; a rerun chooses again",
    )
    engine = p.add_argument_group("engine")
    engine.add_argument(
        "--engine",
        default="transformers",
        choices=["transformers", "vllm"],
        help="transformers: static batches (--batch-size); vllm: continuous batching of whole shards, in the "
        "vLLM environment `make setup-vllm` builds",
    )
    engine.add_argument("--max-num-seqs", type=int, default=256, help="vllm: sequences scheduled at once")
    engine.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vllm: share of GPU memory")
    engine.add_argument("--max-model-len", type=int, help="vllm: prompt + caption tokens (default: the model's)")
    engine.add_argument(
        "--tensor-parallel-size", type=int, default=1, help="vllm: GPUs per replica (set --gpus-per-worker to it)"
    )
    engine.add_argument("--vllm-python", help="vllm: interpreter of the vLLM environment (default: .venv-vllm)")
    _add_ray_options(p, "model replicas (default: one per GPU, or 1 on CPU)")
    _add_rerun_options(p, replace=True)
    p.set_defaults(handler=commands.cmd_caption)


def _add_models_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="model utilities", description="Model utilities.")
    models_sub = p.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    tiny = models_sub.add_parser(
        "make-tiny",
        help="write tiny random-weight models of the real architectures (tests, offline demo)",
        description="Writes OUT/llava: a tiny LLaVA (CLIP vision tower + Llama, locally trained tokenizer, "
        "chat template), OUT/qwen2_vl: a tiny Qwen2-VL, OUT/idefics3: a tiny Idefics3 (SmolVLM), "
        "OUT/pixart: a tiny PixArtAlphaPipeline folder (T5 encoder, VAE, transformer, "
        "scheduler), and OUT/clip: a tiny open_clip model (local-dir:OUT/clip); all load like hub models.",
    )
    tiny.add_argument("out", type=_path)
    tiny.set_defaults(handler=commands.cmd_make_tiny)
    convert = models_sub.add_parser(
        "convert-dit",
        help="re-parameterise a class-conditional ImageNet DiT to a PixArt-α transformer (adaLN-single)",
        description="Writes OUT: a PixArtTransformer2DModel folder (model.pretrained of a training config) whose "
        "per-block adaLN-single embeddings reproduce the DiT's modulation at t = 500 for one class, with a "
        "zero-initialised cross-attention output, so that it starts out computing what the DiT computed "
        "(PixArt-α, arXiv 2310.00426, section 2.3).",
    )
    convert.add_argument("source", metavar="DIT_ID_OR_DIR", help="hub id or folder of a DiT (or a DiT pipeline)")
    convert.add_argument("--out", type=_path, required=True, help="new folder for the PixArt transformer")
    convert.add_argument(
        "--class-label",
        default="null",
        metavar="null|N",
        help="the class whose modulation is kept at t = 500 (default null: the classifier-free null class)",
    )
    convert.add_argument(
        "--caption-channels", type=int, default=4096, help="text encoder hidden size (default 4096: T5 v1.1 XXL)"
    )
    convert.set_defaults(handler=commands.cmd_convert_dit)


def _add_nouns_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spacy-model", default=DEFAULT_SPACY_MODEL, help="installed spaCy pipeline")
    p.add_argument("--nouns", default="all", choices=["all", "common"], help="all: NOUN+PROPN; common: NOUN")
    p.add_argument("--min-count", type=int, default=10, help="a noun is valid when seen more than this often")
    p.add_argument(
        "--max-text-chars",
        type=int,
        default=DEFAULT_MAX_TEXT_CHARS,
        help="score a longer text on its first this many characters and flag it (density: cut)",
    )


def _add_score_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="concept density: nouns per caption for alt text and captioners, and each field's vocabulary",
        description="Writes ROOT/density/FIELD/NNNNN.parquet and ROOT/vocab/FIELD.parquet.",
    )
    p.add_argument("root", type=_path, help="dataset root")
    _add_fields_option(p)
    _add_nouns_options(p)
    _add_ray_options(p, "spaCy processes (default: every CPU)")
    _add_rerun_options(p, replace=False)
    p.set_defaults(handler=commands.cmd_score)


def _comma_list(text: str) -> tuple[str, ...]:
    """``a,b,c`` -> ``("a", "b", "c")`` (blanks around the commas dropped)."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _add_merge_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="a caption field holding each key's best caption among several fields (a cascade's result)",
        description="Reads the fields' captions, density and grounding; writes ROOT/captions/NAME/NNNNN.parquet "
        "(a captioner's tables, with `source` naming the field each caption came from, and seconds and "
        "gpu_seconds summed over every source's row of the key). Score (and ground) the fields first.",
    )
    p.add_argument("root", type=_path, help="dataset root")
    p.add_argument("--fields", type=_comma_list, required=True, help="fields to choose from, e.g. cheap,strong")
    p.add_argument(
        "--by",
        default="grounded_nouns",
        choices=get_args(MergeRule),
        help="the best caption: most nouns found in the image, most valid nouns, or highest CLIP score; ties go to "
        "the field listed first",
    )
    p.add_argument("--name", required=True, help="the merged field, the folder under ROOT/captions")
    _add_ray_options(p, "parallel shards (default: every CPU)")
    _add_rerun_options(p, replace=False)
    p.set_defaults(handler=commands.cmd_merge)


def _add_ground_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ground",
        help="grounded concept density: CLIP image-caption scores, nouns found in the image, near-duplicates",
        description="Writes ROOT/embeddings/MODEL/NNNNN.parquet (one image embedding per sample and CLIP model), "
        "ROOT/duplicates/MODEL.parquet (exact and near-duplicate clusters), ROOT/calibration/FIELD.parquet "
        "(per-noun calibration) and ROOT/grounding/FIELD/NNNNN.parquet (sentence scores, each noun grounded or "
        "not). Needs the fields scored (`densecurate score`). Finished shards are skipped on a rerun.",
    )
    p.add_argument("root", type=_path, help="dataset root")
    _add_fields_option(p)
    p.add_argument("--clip-model", required=True, help="open_clip model name (ViT-L-14), hf-hub:REPO or local-dir:DIR")
    p.add_argument("--clip-pretrained", help="open_clip weights tag (e.g. openai) or file; not for local-dir:")
    _add_model_worker_options(p, batch_size=64, batch_help="images (and texts) per forward pass")
    rule = p.add_argument_group("grounding rule (docs/GROUNDING.md)")
    rule.add_argument("--z-threshold", type=float, default=2.0, help="grounded when z against the noun's negatives >=")
    rule.add_argument("--min-negatives", type=int, default=20, help="fewer negatives: judged on pooled statistics")
    rule.add_argument("--min-std", type=float, default=0.5, help="floor of a noun's std (100 * cosine units)")
    rule.add_argument("--calibration-images", type=int, default=20_000, help="reference images for the calibration")
    rule.add_argument("--max-sentences", type=int, default=32, help="sentences of a caption scored")
    rule.add_argument(
        "--noun-prompt",
        action="append",
        help='prompt template with {} for the noun, repeatable (default: "a photo of a {}." and three more)',
    )
    dup = p.add_argument_group("near-duplicates")
    dup.add_argument("--dup-threshold", type=float, default=0.95, help="cosine at or above which images are duplicates")
    dup.add_argument("--dup-exact-limit", type=int, default=200_000, help="above this many images: IVF search")
    dup.add_argument("--dup-nprobe", type=int, default=16, help="IVF lists probed per query")
    _add_ray_options(p, "model replicas (default: one per GPU, or 1 on CPU)")
    _add_rerun_options(p, replace=True)
    p.set_defaults(handler=commands.cmd_ground)


def _add_density_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "density",
        help="the Table-1 row of a caption table on its own (Parquet, CSV or JSONL; no images needed)",
        description="Scores one text column, streamed in batches over spaCy processes, and prints PixArt-alpha's "
        "Table-1 numbers for it; with --sample, nouns per caption on a random sample with a 95%% interval.",
    )
    p.add_argument(
        "file", type=_path, help="a .parquet, .csv, .tsv or .jsonl file, a quoted glob of them, or a folder of Parquet"
    )
    p.add_argument("--column", required=True, help="the caption column")
    _add_nouns_options(p)
    _add_ray_options(p, "spaCy processes (default: every CPU; 1 tags in this process, without Ray)")
    p.add_argument("--sample", type=int, help="estimate nouns per caption on this many random rows")
    p.add_argument("--seed", type=int, default=0, help="which rows --sample draws (the same on every run)")
    p.add_argument(
        "--batch-rows", type=int, default=8192, help="captions per batch read and sent to a process (memory)"
    )
    p.add_argument("--format", default="table", choices=["table", "json"])
    p.set_defaults(handler=commands.cmd_density)


def _add_compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="choose a captioner: density against GPU cost per caption field, on the keys every field has",
        description="Per scored caption field, on identical keys: captions, words and tokens, nouns, valid and "
        "grounded nouns per image, flagged shares, GPU-seconds per caption, valid and grounded nouns per "
        "GPU-second, and the GPU-hours to caption 1M and 10M images. Caption a sample with each model "
        "first (`densecurate caption ROOT --sample N`) and score it.",
    )
    p.add_argument("root", type=_path, help="dataset root")
    p.add_argument(
        "--field", action="append", help="alt_text or a captioner name; repeat for several (default: every scored one)"
    )
    p.add_argument("--format", default="table", choices=["table", "json"])
    p.set_defaults(handler=commands.cmd_compare)


def _add_curate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "curate",
        help="keep samples whose chosen caption is dense enough, as new webdataset shards",
        description="Writes OUT/NNNNN.tar (KEY.jpg, KEY.txt = the caption of --field, KEY.json with density; with "
        "several fields KEY.captions.json: every passing caption with its scores), "
        "OUT/NNNNN.parquet and OUT/NNNNN_stats.json, and prints how many samples each rule removed. "
        "Rules come from --config (YAML with the keys min_valid_nouns, min_nouns, drop_flagged, min_words, "
        "min_clip_score, min_grounded_nouns, min_grounded_share, drop_near_duplicates); "
        "options given on the command line override it.",
    )
    p.add_argument("root", type=_path, help="dataset root (scored for --field)")
    p.add_argument(
        "--field",
        action="append",
        help="alt_text or a captioner name: the caption to keep; repeat to keep several captions per image (the "
        "first decides: KEY.txt and the rules' verdict; each further caption that passes the caption rules goes "
        "into KEY.captions.json with its scores)",
    )
    p.add_argument("--fields", type=_comma_list, help="several fields as one comma list, e.g. best,cheap,strong")
    p.add_argument("--out", required=True, type=_path, help="output folder of the curated shards")
    p.add_argument("--min-valid-nouns", type=int, help="drop captions with fewer valid noun occurrences")
    p.add_argument("--min-nouns", type=int, help="drop captions with fewer noun occurrences")
    p.add_argument("--min-words", type=int, help="drop captions with fewer words (default 1: no caption)")
    p.add_argument("--drop-flagged", action="store_true", default=None, help="drop truncated/repetitive/empty")
    grounded = p.add_argument_group("grounding rules (need `densecurate ground` for --field)")
    grounded.add_argument("--min-clip-score", type=float, help="drop captions whose image-caption score is lower")
    grounded.add_argument("--min-grounded-nouns", type=int, help="drop captions with fewer nouns found in the image")
    grounded.add_argument("--min-grounded-share", type=float, help="drop captions with a lower share of grounded nouns")
    grounded.add_argument(
        "--drop-near-duplicates",
        action="store_true",
        default=None,
        help="drop exact and near-duplicates, keeping one sample per cluster",
    )
    p.add_argument("--config", type=_path, help="curate.yaml with the rules")
    _add_ray_options(p, "tasks at once (default: every CPU)")
    _add_rerun_options(p, replace=True)
    p.set_defaults(handler=commands.cmd_curate)


def _add_features_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "features",
        help="precompute VAE posteriors and T5 states of curated shards for training",
        description="Writes FEATS/NNNNN.tar (KEY.feat.safetensors: VAE mean+std and T5 states, fp16; KEY.txt; "
        "KEY.json), NNNNN.parquet, NNNNN_stats.json (with the settings, which train checks against its config) and "
        "null_caption.safetensors. Samples without caption get the empty caption's states and are counted. "
        "Finished shards are skipped.",
    )
    p.add_argument("curated", type=_path, help="folder of curated shards (densecurate curate --out)")
    p.add_argument("--out", required=True, type=_path, help="folder of the feature shards")
    p.add_argument("--vae", required=True, help="AutoencoderKL: hub id or directory (a PixArt pipeline folder works)")
    p.add_argument("--text-encoder", required=True, help="T5 encoder and tokenizer: hub id or directory")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=120)
    _add_model_worker_options(p, batch_size=16, device_help=None)
    _add_ray_options(p, "encoder replicas (default: one per GPU, or 1 on CPU)")
    _add_rerun_options(p, replace=True)
    p.set_defaults(handler=commands.cmd_features)


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train the PixArt-alpha alignment stage on feature shards",
        description="CONFIG is YAML (see trainer/configs/alignment_256.yaml and tiny.yaml); key.path=value "
        "arguments override it. Checkpoints, TensorBoard logs and sample grids go to run_dir. A run_dir "
        "that holds checkpoints needs --resume or --overwrite; a resume whose config changes anything but "
        "steps and logging settings needs --allow-config-change.",
    )
    p.add_argument("config", type=Path, help="training config (YAML)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 data.batch_size=32")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in run_dir")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over: first delete run_dir's checkpoints, samples, TensorBoard logs and saved config",
    )
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --resume: accept a config that differs from the run's (recorded in config_changes.jsonl)",
    )
    p.add_argument("--workers", type=int, help="Ray Train workers (DDP), overriding the config's `workers`")
    p.add_argument(
        "--nan-tolerance",
        type=int,
        metavar="N",
        help="skip (no update) up to N steps of the run whose loss or gradients are NaN or infinite, and stop at "
        "the next; overrides the config's `nan_tolerance` (default 0: the first such step stops training)",
    )
    p.add_argument("--ray-address", help="Ray cluster for --workers > 1 (default: a local Ray on 127.0.0.1)")
    p.set_defaults(handler=commands.cmd_train)


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a run's latest checkpoint as a folder PixArtAlphaPipeline.from_pretrained loads",
        description="Transformer (its EMA weights, or the raw ones with --no-ema), the run's VAE, T5 encoder and "
        "tokenizer, DPM-Solver. "
        "A model of another size than 256, 512 or 1024 px has no resolution bins in PixArtAlphaPipeline: call it "
        "as pipe(prompt, use_resolution_binning=False) (the command prints this line for such a model).",
    )
    p.add_argument("run", type=_path, help="run directory (run_dir of the training config)")
    p.add_argument("--out", required=True, type=_path)
    p.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="export the EMA weights (the default, as a job spec's export.ema); --no-ema: the raw weights",
    )
    p.set_defaults(handler=commands.cmd_export)


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="generate images for prompts with an exported pipeline and report their CLIP score",
        description="CLIP score = 100 * max(cosine(image, prompt), 0) with an open_clip model, per prompt and mean.",
    )
    p.add_argument("pipeline", type=_path, help="exported pipeline folder (densecurate export --out)")
    p.add_argument("--prompts", required=True, type=_path, help="text file, one prompt per line")
    p.add_argument("--clip-model", default="ViT-L-14", help="open_clip model name, or local-dir:DIR")
    p.add_argument("--clip-pretrained", default="openai", help="open_clip weights tag or file")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=_path, help="save the generated images here")
    p.add_argument("--format", default="table", choices=["table", "json"])
    p.set_defaults(handler=commands.cmd_eval)


def _add_spec_parsers(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser(
        "run",
        help="run a pipeline spec in this process (local Ray), stage after stage, skipping what is done",
        description="SPEC is YAML (see jobs/examples/); relative paths are taken from the current directory.",
    )
    run.add_argument("spec", type=_path)
    run.add_argument("--stage", action="append", choices=STAGES, help="run only this stage (repeatable)")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="print each step's command and what it would do (shards planned, done, to run, replaced); run nothing",
    )
    run.set_defaults(handler=commands.cmd_run)
    submit = sub.add_parser(
        "submit",
        help="submit a pipeline spec to a Ray cluster as a job (Ray Job Submission API)",
        description="Validates the spec, resolves its relative paths here, and submits it with a runtime "
        "environment that carries densecurate's packages. Address: --address, else RAY_ADDRESS, else "
        "the local head (http://127.0.0.1:8265).",
    )
    submit.add_argument("spec", type=_path)
    submit.add_argument("--address", help="the cluster's dashboard, e.g. http://127.0.0.1:8265")
    submit.add_argument("--stage", action="append", choices=STAGES, help="run only this stage (repeatable)")
    submit.add_argument("--follow", action="store_true", help="stream the logs until the job ends")
    submit.set_defaults(handler=commands.cmd_submit)
    jobs = sub.add_parser(
        "jobs",
        help="list, inspect, read or stop submitted jobs",
        description="Ray jobs. `status` prints the job's status, then the spec's step it runs (or ran last), that "
        "step's latest progress and the last error its log shows.",
    )
    jobs.add_argument("action", choices=["list", "status", "logs", "stop"])
    jobs.add_argument("job_id", nargs="?", help="needed by status, logs and stop")
    jobs.add_argument("--address", help="the cluster's dashboard (default: RAY_ADDRESS, then the local head)")
    jobs.add_argument("--follow", action="store_true", help="logs: stream the log until the job ends (re-attach)")
    jobs.set_defaults(handler=commands.cmd_jobs)


def _add_report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="compare caption fields: Table-1 rows side by side, noun distributions, long tail, flags",
        description="Prints the report; with --html also writes one self-contained page with plots and a gallery.",
    )
    p.add_argument("root", type=_path, help="dataset root (scored)")
    p.add_argument("--html", type=_path, help="write the HTML report here")
    p.add_argument("--gallery", type=int, default=8, help="samples in the HTML gallery")
    p.add_argument("--spacy-model", default=DEFAULT_SPACY_MODEL, help="for marking nouns in the gallery")
    p.set_defaults(handler=commands.cmd_report)


def _add_verify_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="check a dataset root's outputs are intact (exit 3 when damaged ones are found)",
        description="Every shard's stats, Parquet and tar agree and read in full, every written sample has its "
        "members; with --deep every stored image matches its sha256. Caption, density and vocabulary tables read "
        "in full. Rerun the stage that wrote a damaged output with --repair to redo exactly those.",
    )
    p.add_argument("root", type=_path, help="dataset root (or a folder of curated or feature shards)")
    p.add_argument("--deep", action="store_true", help="also hash every stored image")
    p.set_defaults(handler=commands.cmd_verify)
    p = sub.add_parser(
        "prune",
        help="list and remove a dataset root's outputs that belong to no current shard",
        description="Caption and density tables whose shard no longer exists (after a rerun of the shard stage "
        "with fewer shards) and in-progress files of killed runs. Stages never remove these on their own.",
    )
    p.add_argument("root", type=_path, help="dataset root")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    p.set_defaults(handler=commands.cmd_prune)


def _add_stats_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stats",
        help="the common questions: counts by status and source, captions, nouns per image, top nouns",
        description="Runs the common DuckDB queries on the dataset root's catalog.",
    )
    p.add_argument("root", type=_path, help="dataset root")
    p.set_defaults(handler=commands.cmd_stats)


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append ``(default: X)`` to the help of every option of every command that has a default worth showing
    (not None, not False) and does not name it already."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for command in [parser, *(p for sub in subparsers for p in sub.choices.values())]:
        for action in command._actions:
            default, help_text = action.default, action.help or ""
            if not action.option_strings or default in (None, False, argparse.SUPPRESS) or "default" in help_text:
                continue
            shown = ", ".join(map(str, default)) if isinstance(default, list | tuple) else default
            action.help = f"{help_text} (default: {str(shown).replace('%', '%%')})".strip()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="densecurate",
        description="Build text-to-image training data with dense, concept-rich captions.",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"show the full traceback of any error (may also follow the command; or set {DEBUG_ENV}=1)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="keep the libraries' warnings and weight-loading bars (may also follow the command)",
    )
    parser.add_argument("--version", action="version", version=f"densecurate {package_version('densecurate')}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_shard_parser(sub)
    _add_query_parser(sub)
    _add_caption_parser(sub)
    _add_score_parser(sub)
    _add_ground_parser(sub)
    _add_merge_parser(sub)
    _add_density_parser(sub)
    _add_stats_parser(sub)
    _add_verify_parsers(sub)
    _add_report_parser(sub)
    _add_compare_parser(sub)
    _add_curate_parser(sub)
    _add_features_parser(sub)
    _add_train_parser(sub)
    _add_export_parser(sub)
    _add_eval_parser(sub)
    _add_spec_parsers(sub)
    _add_models_parser(sub)
    _add_demo_parser(sub)
    _show_defaults(parser)
    return parser


DEBUG_ENV = "DENSECURATE_DEBUG"
# Settings whose option is not ``--`` + the field's last name.
OPTION_OF_FIELD = {
    "duplicates.threshold": "--dup-threshold",
    "duplicates.exact_limit": "--dup-exact-limit",
    "duplicates.nprobe": "--dup-nprobe",
}
RERUN = "rerun the same command to go on (finished shards are kept)"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NOT_PERMITTED = (errno.EACCES, errno.EPERM, errno.EROFS)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _stop_signal(exc: SystemExit) -> int | None:
    """The stop signal ending the command, if one is: the one the local Ray's handler received (inside
    ``ray.get`` Ray turns its SystemExit into ``SystemExit(1)``), else the one the exit code names."""
    cluster = sys.modules.get("pipeline.core.ray_cluster")
    received = cluster.received_stop_signal() if cluster is not None else None
    if received is not None:
        return received
    return exc.code - 128 if exc.code in [128 + s for s in STOP_SIGNALS] else None


def _ray_cause(exc: BaseException) -> BaseException:
    """The exception a Ray task or actor raised, for the ``RayTaskError`` that ``ray.get`` re-raises."""
    ray_exceptions = sys.modules.get("ray.exceptions")
    while ray_exceptions is not None and isinstance(exc, ray_exceptions.RayTaskError):
        cause = getattr(exc, "cause", None)
        if not isinstance(cause, BaseException) or cause is exc:
            break
        exc = cause
    return exc


def _shown_path(exc: OSError) -> str:
    """The path of an OSError for a message; an in-progress output ``NAME.tmp-PID`` is shown as ``NAME``."""
    if exc.filename is None:
        return "an output"
    name = exc.filename
    text = os.fsdecode(name) if isinstance(name, str | bytes | os.PathLike) else str(name)
    return text.split(TMP_MARK, 1)[0]


def _os_error_sentence(exc: OSError) -> tuple[int, str] | None:
    """A full disk (exit 1) or a path the user may not write (exit 2), with its path; None otherwise."""
    if exc.errno in NO_SPACE:
        return 1, (
            f"no space left on the device of {_shown_path(exc)} ({exc.strerror}): free space or choose an output "
            f"folder on another disk, then {RERUN}"
        )
    if isinstance(exc, PermissionError) or exc.errno in NOT_PERMITTED:
        return 2, (
            f"cannot write {_shown_path(exc)} ({exc.strerror}): fix its permissions or choose another output "
            f"folder, then {RERUN}"
        )
    return None


def explain_error(exc: BaseException) -> tuple[int, list[str]] | None:
    """The exit code and the message (one sentence; one per field of an invalid option) for an error
    densecurate explains; None for a bug.

    2: a mistake the user can fix (``UserError``, an invalid option, an output path it may not write);
    1: a failure of the environment (``EnvironmentFailure``, a full disk). An error raised in a Ray task
    or actor is judged by the exception the task raised.
    """
    exc = _ray_cause(exc)
    if isinstance(exc, ValidationError):
        lines = []
        for err in exc.errors():
            if not err["loc"]:  # a check of several options together: its message says which
                lines.append(err["msg"].removeprefix("Value error, "))
                continue
            field = ".".join(str(p) for p in err["loc"])
            option = OPTION_OF_FIELD.get(field, "--" + str(err["loc"][-1]).replace("_", "-"))
            lines.append(f"{field} ({option}): {err['msg']}")
        return 2, lines
    if isinstance(exc, UserError):
        return 2, [str(exc)]
    if isinstance(exc, EnvironmentFailure):
        return 1, [str(exc)]
    if isinstance(exc, OSError) and (verdict := _os_error_sentence(exc)) is not None:
        return verdict[0], [verdict[1]]
    return None


def _debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``densecurate`` console script.

    Exit codes: 0 done; 2 a user's mistake and 1 a failure of the environment, each one sentence;
    1 with a traceback for a bug; 130 when interrupted (128 + the signal for SIGTERM and SIGHUP);
    ``verify`` 3 for damaged outputs. ``--debug`` (anywhere on the command line) or
    ``DENSECURATE_DEBUG=1`` also prints the traceback of every error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    if not (debug or "--verbose" in argv):
        quiet_libraries()
    args = build_parser().parse_args([a for a in argv if a not in ("--debug", "--verbose")])
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        console.print(f"[red]interrupted:[/red] {RERUN}")
        return 130
    except SystemExit as exc:  # SIGTERM or SIGHUP while a local Ray runs (see pipeline.core.ray_cluster)
        signum = _stop_signal(exc)
        if signum is None:
            raise
        console.print(f"[red]stopped by {signal.Signals(signum).name}:[/red] {RERUN}")
        raise SystemExit(128 + signum) from None
    except Exception as exc:
        verdict = explain_error(exc)
        if verdict is None:
            raise  # a bug: its traceback is shown and the exit code is 1
        if debug:
            traceback.print_exc()
        code, messages = verdict
        for message in messages:
            console.print(f"[red]error:[/red] {escape(message)}")
        return code
