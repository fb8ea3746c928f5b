"""The ``densecurate`` commands: each takes the parsed arguments and returns an exit code."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from rich.console import Console

from pipeline.report.table_output import print_rows
from pipeline.store.catalog import run_query
from schemas.caption_config import CaptionConfig
from schemas.errors import OutputConflictError, UserError
from schemas.features_config import FeaturesConfig
from schemas.ground_config import GroundConfig
from schemas.merge_config import MergeConfig
from schemas.pipeline_spec import PipelineSpec, parse_spec, resolve_paths
from schemas.score_config import (
    ALT_TEXT_FIELD,
    CurateConfig,
    CurateRules,
    NounSettings,
    ScoreConfig,
)
from schemas.shard_config import ShardConfig
from schemas.train_config import load_train_config
from schemas.validation import load_yaml, read_input_text, require_model_folder, validated

console = Console(stderr=True, soft_wrap=True)
# Options every stage command shares (``--replace`` only where the stage takes it).
RUN_OPTIONS = ("workers", "ray_address", "repair", "replace")


def require_folder_option(path: Path | None, option: str) -> None:
    """Refuse an output folder that is, or lies under, an existing file (before any work starts)."""
    for part in (path, *path.parents) if path is not None else ():
        if part.exists():
            if not part.is_dir():
                raise OutputConflictError(
                    f"{option} {path}: {part} is a file, not a folder; choose a folder (it is made when missing)"
                )
            return


def require_file_option(path: Path | None, option: str) -> None:
    """Refuse an output file that is an existing folder, or whose folder cannot be made."""
    if path is not None and path.is_dir():
        raise OutputConflictError(f"{option} {path} is a folder; give the name of a file to write")
    if path is not None:
        require_folder_option(path.parent, option)


def run_options(args: argparse.Namespace) -> dict:
    """The shared stage options the command was given, as config keys."""
    return {name: getattr(args, name) for name in RUN_OPTIONS if hasattr(args, name)}


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
                "max_file_bytes": args.max_file_bytes,
                "max_sidecar_bytes": args.max_sidecar_bytes,
            },
            "image": {
                "max_output_side": args.max_output_side,
                "resize": args.resize,
                "crop": args.crop,
                "min_size": args.min_size,
                "max_aspect": args.max_aspect,
                "max_pixels": args.max_pixels,
                "jpeg_quality": args.jpeg_quality,
            },
            "shard_size": args.shard_size,
            **run_options(args),
        }
    )


def cmd_shard(args: argparse.Namespace) -> int:
    from pipeline.stages.shard import run_shard_stage  # imports Ray: only when needed

    Console().print(run_shard_stage(args.src, args.out, shard_config_from_args(args)).render())
    return 0


def default_captioner_name(model: str) -> str:
    """``llava-hf/llava-1.5-7b-hf`` -> ``llava-1.5-7b-hf``; a directory -> its name."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(model.rstrip("/")).name)
    return name if name.strip(".") else "captioner"


def caption_config_from_args(args: argparse.Namespace) -> CaptionConfig:
    """Validate the caption options into a ``CaptionConfig``."""
    return CaptionConfig.model_validate(
        {
            "name": default_captioner_name(args.model) if args.name is None else args.name,
            "model": {
                "model": args.model,
                "revision": args.revision,
                "dtype": args.dtype,
                "device": args.device,
                "trust_remote_code": args.trust_remote_code,
                "max_image_pixels": args.max_image_pixels,
            },
            "generation": {
                "prompt": args.prompt,
                "batch_size": args.batch_size,
                "max_new_tokens": args.max_new_tokens,
                "temperature": args.temperature,
                "top_p": args.top_p,
                "seed": args.seed,
            },
            "gpus_per_worker": args.gpus_per_worker,
            "sample": args.sample,
            "sample_seed": args.sample_seed,
            "keys_query": args.keys_query,
            "engine": args.engine,
            "vllm": {
                "max_num_seqs": args.max_num_seqs,
                "gpu_memory_utilization": args.gpu_memory_utilization,
                "max_model_len": args.max_model_len,
                "tensor_parallel_size": args.tensor_parallel_size,
                "python": args.vllm_python,
            },
            **run_options(args),
        }
    )


def cmd_caption(args: argparse.Namespace) -> int:
    from pipeline.stages.caption import run_caption_stage

    Console().print(run_caption_stage(args.root, caption_config_from_args(args)).render())
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from pipeline.stages.merge import run_merge_stage

    config = MergeConfig.model_validate({"name": args.name, "fields": args.fields, "by": args.by, **run_options(args)})
    Console().print(run_merge_stage(args.root, config).render())
    return 0


def _noun_settings(args: argparse.Namespace) -> dict:
    return {"spacy_model": args.spacy_model, "nouns": args.nouns, "max_text_chars": args.max_text_chars}


def cmd_score(args: argparse.Namespace) -> int:
    from pipeline.stages.score import run_score_stage

    config = ScoreConfig.model_validate(
        {
            "fields": args.field or [ALT_TEXT_FIELD],
            "nouns": _noun_settings(args),
            "min_count": args.min_count,
            **run_options(args),
        }
    )
    Console().print(run_score_stage(args.root, config).render())
    from pipeline.report.console import print_table1

    print_table1(args.root)
    return 0


def ground_config_from_args(args: argparse.Namespace) -> GroundConfig:
    """Validate the ground options into a ``GroundConfig``."""
    grounding = {
        "z_threshold": args.z_threshold,
        "min_negatives": args.min_negatives,
        "min_std": args.min_std,
        "calibration_images": args.calibration_images,
        "max_sentences": args.max_sentences,
    }
    if args.noun_prompt:
        grounding["noun_prompts"] = args.noun_prompt
    return GroundConfig.model_validate(
        {
            "fields": args.field or [ALT_TEXT_FIELD],
            "clip": {"model": args.clip_model, "pretrained": args.clip_pretrained},
            "grounding": grounding,
            "duplicates": {
                "threshold": args.dup_threshold,
                "exact_limit": args.dup_exact_limit,
                "nprobe": args.dup_nprobe,
            },
            "batch_size": args.batch_size,
            "device": args.device,
            "gpus_per_worker": args.gpus_per_worker,
            **run_options(args),
        }
    )


def cmd_ground(args: argparse.Namespace) -> int:
    from pipeline.stages.ground import run_ground_stage

    Console().print(run_ground_stage(args.root, ground_config_from_args(args)).render())
    return 0


def cmd_density(args: argparse.Namespace) -> int:
    from pipeline.stages.density_file import DensityOptions, sample_file, score_file

    keys = ("column", "min_count", "workers", "ray_address", "sample", "seed", "batch_rows")
    nouns = NounSettings.model_validate(_noun_settings(args))
    options = DensityOptions.model_validate({"nouns": nouns, **{k: getattr(args, k) for k in keys}})
    title = f"{args.file} [{args.column}]"
    if options.sample is not None:
        estimate = sample_file(args.file, options)
        if args.format == "json":
            print(json.dumps(estimate.as_json(), indent=1))
            return 0
        from rich.table import Table

        table = Table("", args.column, title=f"{title}, sampled", caption=estimate.NOT_REPORTED)
        for name, value in estimate.lines():
            table.add_row(name, value)
        Console().print(table)
        return 0
    row = score_file(args.file, options)
    if args.format == "json":
        print(json.dumps(row.as_json(), indent=1))
    else:
        from pipeline.report.console import table1_table

        Console().print(table1_table([row], title=title))
    return 0


def curate_config_from_args(args: argparse.Namespace) -> CurateConfig:
    """Rules from --config, overridden by the options given; validated with the file named in errors."""
    rules: dict = {}
    if args.config:
        loaded = load_yaml(read_input_text(args.config, "curation rules"), str(args.config)) or {}
        rules = loaded.get("rules", loaded) if isinstance(loaded, dict) else loaded
        rules = validated(CurateRules, rules, str(args.config)).model_dump(exclude_unset=True)
    for name in CurateRules.model_fields:
        if getattr(args, name) is not None:
            rules[name] = getattr(args, name)
    fields = [*(args.field or []), *(args.fields or [])]
    return CurateConfig.model_validate({"fields": fields, "rules": rules, **run_options(args)})


def cmd_curate(args: argparse.Namespace) -> int:
    from pipeline.stages.curate import run_curate_stage

    Console().print(run_curate_stage(args.root, args.out, curate_config_from_args(args)).render())
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from pipeline.stages.features import run_features_stage

    keys = ("vae", "text_encoder", "resolution", "max_tokens", "batch_size", "device", "gpus_per_worker")
    config = FeaturesConfig.model_validate({**{k: getattr(args, k) for k in keys}, **run_options(args)})
    require_model_folder(config.vae, "--vae")
    require_model_folder(config.text_encoder, "--text-encoder")
    Console().print(run_features_stage(args.curated, args.out, config).render())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from trainer.launch import launch_training

    overrides = [*args.overrides, *([f"workers={args.workers}"] if args.workers else [])]
    if args.nan_tolerance is not None:
        overrides.append(f"nan_tolerance={args.nan_tolerance}")
    config = load_train_config(read_input_text(args.config, "training config"), overrides, source=str(args.config))
    if config.workers > 1:
        from pipeline.core.ray_cluster import init_ray

        init_ray(args.ray_address)
    result = launch_training(
        config, resume=args.resume, overwrite=args.overwrite, allow_config_change=args.allow_config_change
    )
    Console().print(f"trained to step {result.step}; checkpoints in {result.run_dir / 'checkpoints'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from trainer.export import export_pipeline

    require_folder_option(args.out, "--out")
    exported = export_pipeline(args.run, args.out, ema=args.ema)
    Console().print(f"exported {'EMA ' if args.ema else ''}pipeline to {exported.out}")
    if hint := exported.call_hint():
        Console().print(hint, soft_wrap=True)  # one line, so that the call can be copied
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from trainer.evaluate import evaluate, read_prompts

    require_folder_option(args.images, "--images")
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
    return resolve_paths(parse_spec(read_input_text(path, "spec"), source=str(path)), Path.cwd())


def cmd_run(args: argparse.Namespace) -> int:
    from jobs.steps import present_stages, run_pipeline

    spec = _load_spec(args.spec)
    if args.dry_run:
        from jobs.dry_run import dry_run_lines

        steps = [s for s in present_stages(spec) if not args.stage or s in args.stage]
        for line in dry_run_lines(spec, steps):
            print(line)
        return 0
    run_pipeline(spec, only=args.stage)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from jobs.submission import follow, job_address, submit

    spec = _load_spec(args.spec)
    job_id = submit(spec, address=args.address, stages=args.stage, source=args.spec.resolve())
    print(job_id, flush=True)
    console.print(f"submitted {spec.name} to {job_address(args.address)} as {job_id}")
    if args.follow:
        status = follow(job_id, address=args.address)
        console.print(f"job {job_id}: {status}")
        return 0 if status == "SUCCEEDED" else 1
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from jobs.job_view import job_view
    from jobs.submission import client, cluster_errors, follow

    if args.action != "list" and not (args.job_id or "").strip():
        raise UserError(f"`densecurate jobs {args.action}` needs a job id")
    jobs = client(args.address)
    if args.action == "list":
        with cluster_errors(args.address):
            listed = jobs.list_jobs()
        rows = [
            (j.submission_id, str(j.status.value), (j.metadata or {}).get("densecurate_spec", ""), j.entrypoint[:60])
            for j in listed
        ]
        print_rows(["job_id", "status", "spec", "entrypoint"], rows)
        return 0
    with cluster_errors(args.address, args.job_id):
        if args.action == "status":  # the status word first; then the step, its progress, the last error
            print(jobs.get_job_status(args.job_id).value)
            for line in job_view(jobs.get_job_logs(args.job_id)).lines():
                print(line)
        elif args.action == "logs" and args.follow:
            print(f"job {args.job_id}: {follow(args.job_id, address=args.address)}")
        elif args.action == "logs":
            print(jobs.get_job_logs(args.job_id), end="")
        else:
            stopped = jobs.stop_job(args.job_id)
            print("stopped" if stopped else "not running")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.report.run import run_report

    require_file_option(args.html, "--html")
    run_report(args.root, html=args.html, gallery=args.gallery, spacy_model=args.spacy_model)
    if args.html:
        Console().print(f"HTML report written to {args.html}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pipeline.report.cascade import cascade_figures, cascade_table
    from pipeline.report.compare import compare_fields, comparison_table
    from pipeline.report.console import warn_if_stale
    from pipeline.report.table_output import table_console

    compared = compare_fields(args.root, args.field)
    cascades = {c.field: c for c in cascade_figures(args.root, [c.field for c in compared])}
    if args.format == "json":
        rows = [
            {**c.as_json(), "cascade": cascades[c.field].as_json() if c.field in cascades else None} for c in compared
        ]
        print(json.dumps(rows, indent=1))
    else:
        warn_if_stale(args.root)
        console = table_console()  # whole rows when piped: a comparison of several fields is wide
        console.print(comparison_table(compared))
        for cascade in cascades.values():
            console.print(cascade_table(cascade))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from pipeline.report.stats_queries import print_stats

    print_stats(args.root)
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from jobs.tiny_models import make_tiny_models

    require_folder_option(args.out, "OUT")
    made = make_tiny_models(args.out)
    listed = ", ".join(f"local-dir:{path}" if name == "clip" else str(path) for name, path in made.items())
    Console().print(f"tiny models (random weights, for tests): {listed}")
    return 0


def cmd_convert_dit(args: argparse.Namespace) -> int:
    from trainer.convert_dit import convert_dit

    raw = str(args.class_label).strip().lower()
    if raw != "null" and not raw.isdigit():
        raise UserError(f"--class-label {args.class_label!r} must be null or a class number")
    label = None if raw == "null" else int(raw)
    require_folder_option(args.out, "--out")
    out = convert_dit(args.source, args.out, class_label=label, caption_channels=args.caption_channels)
    Console().print(
        f"wrote {out}: PixArt transformer from DiT {args.source} (adaLN-single at t = 500, class "
        f"{'null' if label is None else label}, caption_channels {args.caption_channels}); "
        f"set model.pretrained: {out}"
    )
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    columns, rows = run_query(args.root, args.sql)
    print_rows(columns, rows, args.format)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from jobs.demo import run_demo

    require_folder_option(args.out, "--out")
    run_demo(args.out)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from pipeline.store.verify import verify_folder

    damaged = verify_folder(args.root, deep=args.deep)
    if not damaged:
        Console().print(f"{args.root}: every output is intact{' (files hashed)' if args.deep else ''}")
        return 0
    for damage in damaged:
        print(f"damaged {damage.path}: {damage.problem}")
    console.print(f"[red]{len(damaged)} damaged outputs.[/red] Rerun the stages that wrote them with --repair.")
    return 3


def cmd_prune(args: argparse.Namespace) -> int:
    from pipeline.store.prune import prune_root

    removed = prune_root(args.root, dry_run=args.dry_run)
    for path in removed:
        print(f"{'would remove' if args.dry_run else 'removed'} {path}")
    console.print(f"{len(removed)} files {'would be ' if args.dry_run else ''}removed")
    return 0
