"""The offline demo on the bundled sample."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from pipeline.catalog import run_query
from pipeline.sample_data import write_sample_folder
from pipeline.table_output import print_rows
from schemas.caption_config import CaptionConfig
from schemas.features_config import FeaturesConfig
from schemas.score_config import ALT_TEXT_FIELD, DEFAULT_SPACY_MODEL, CurateConfig, ScoreConfig
from schemas.shard_config import ShardConfig
from schemas.train_config import load_train_config

TINY_TRAIN_CONFIG = Path(__file__).resolve().parents[1] / "trainer" / "configs" / "tiny.yaml"

TINY_MODEL_NOTE = (
    "These captions come from a tiny random-weight LLaVA built offline: they are not meaningful; they show "
    "the plumbing. For real dense captions run, on a GPU machine:\n"
    "  densecurate caption ROOT --model llava-hf/llava-1.5-7b-hf --name llava15 --prompt pixart-alt "
    "--batch-size 32 --max-new-tokens 512"
)


def run_demo(out: Path, *, workers: int = 2) -> Path:
    """The whole path on the sample photos: shard, caption (tiny LLaVA), score, report, curate, train, export."""
    from captioner.tiny import make_tiny_llava
    from pipeline.caption_stage import run_caption_stage
    from pipeline.cli import print_caption_summary, print_shard_summary
    from pipeline.curate_stage import run_curate_stage
    from pipeline.features_stage import run_features_stage
    from pipeline.report import gather_report, print_report
    from pipeline.report_html import write_html_report
    from pipeline.score_stage import run_score_stage
    from pipeline.shard_stage import run_shard_stage
    from trainer.export import export_pipeline
    from trainer.loop import train
    from trainer.tiny import make_tiny_pixart

    console = Console()
    photos = write_sample_folder(out / "sample_photos")
    root = out / "dataset"
    console.rule("shard: sample photos -> webdataset shards")
    summary = run_shard_stage([photos], root, ShardConfig(shard_size=4, workers=workers))
    print_shard_summary(summary, root)
    sql = "SELECT status, reason, count(*) AS n FROM samples GROUP BY ALL ORDER BY status, reason"
    console.rule(f'densecurate query {root} "{sql}"')
    print_rows(*run_query(root, sql))

    console.rule("caption: tiny LLaVA (random weights) -> captions/tiny-llava")
    model_dir = out / "models" / "llava"
    if not (model_dir / "config.json").is_file():
        make_tiny_llava(model_dir)
    config = CaptionConfig.model_validate(
        {
            "name": "tiny-llava",
            "model": {"model": str(model_dir)},
            "generation": {"prompt": "pixart-alt", "batch_size": 8, "max_new_tokens": 48},
        }
    )
    print_caption_summary(run_caption_stage(root, config), root, config.name)
    console.print(f"[yellow]{TINY_MODEL_NOTE}[/yellow]")
    sql = (
        "SELECT s.key, s.alt_text, c.num_tokens, c.finish_reason, left(c.caption, 40) AS caption "
        "FROM samples s JOIN captions c USING (key) ORDER BY s.key LIMIT 5"
    )
    console.rule("alt text and caption side by side")
    print_rows(*run_query(root, sql))

    console.rule("score: concept density of alt text and captions")
    run_score_stage(root, ScoreConfig(fields=(ALT_TEXT_FIELD, config.name), workers=workers))
    reports = gather_report(root)
    print_report(reports)
    report_page = write_html_report(root, reports, out / "report.html", gallery=8, spacy_model=DEFAULT_SPACY_MODEL)

    console.rule("curate: alt text with at least 3 nouns -> curated/")
    curated = run_curate_stage(root, out / "curated", CurateConfig(field=ALT_TEXT_FIELD, rules={"min_nouns": 3}))
    console.print(
        f"kept {curated.kept} of {curated.inputs}; removed by rule: {dict(curated.removed_by_rule) or 'none'}"
    )

    console.rule("train: a few PixArt-alpha alignment steps of a tiny model on the curated shards")
    pixart = out / "models" / "pixart"
    if not (pixart / "model_index.json").is_file():
        make_tiny_pixart(pixart)
    features = FeaturesConfig(vae=str(pixart), text_encoder=str(pixart), resolution=64, batch_size=8)
    run_features_stage(out / "curated", out / "features", features)
    overrides = [f"run_dir={out / 'runs' / 'tiny'}", f"pipeline={pixart}", f"data.features={out / 'features'}"]
    config = load_train_config(TINY_TRAIN_CONFIG.read_text(), overrides, source=str(TINY_TRAIN_CONFIG))
    result = train(config, resume=True)
    exported = export_pipeline(result.run_dir, out / "export", ema=True)
    console.print(f"trained to step {result.step}; exported pipeline (EMA): {exported}")
    console.print(f"Report page: {report_page}")
    console.print(f'Everything is under {root}; query it with: densecurate query {root} "SQL"')
    return root
