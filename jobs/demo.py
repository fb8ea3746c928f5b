"""`densecurate demo`: the demo job spec (jobs/examples/demo.yaml) for an output folder, run in-process."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from rich.console import Console

from schemas.pipeline_spec import PipelineSpec, resolve_paths

EXAMPLE = Path(__file__).resolve().parent / "examples" / "demo.yaml"
TINY_MODEL_NOTE = (
    "The captions come from tiny random-weight LLaVA and Qwen2-VL models built offline: they are not meaningful; "
    "they show the plumbing. For real dense captions, on a GPU machine, caption a sample with each candidate, "
    "compare, then caption everything with the best:\n"
    "  densecurate caption ROOT --model llava-hf/llava-1.5-7b-hf --name llava15 --sample 200\n"
    "  densecurate caption ROOT --model Qwen/Qwen2-VL-7B-Instruct --name qwen2vl --sample 200\n"
    "  densecurate score ROOT --field alt_text --field llava15 --field qwen2vl && densecurate compare ROOT"
)


def demo_spec(out: Path) -> PipelineSpec:
    """jobs/examples/demo.yaml with its ``demo_out`` folder moved to ``out``, paths made absolute."""
    folder = f"{out.resolve()}/"
    text = re.sub(r"(?<![\w/.])(\./)?demo_out/", lambda _: folder, EXAMPLE.read_text())
    spec = yaml.safe_load(text)
    spec["train"]["config"] = str(Path(__file__).resolve().parents[1] / "trainer" / "configs" / "tiny.yaml")
    return resolve_paths(PipelineSpec.model_validate(spec), Path.cwd())


def run_demo(out: Path) -> Path:
    """Every stage on the bundled sample, then the alt text and captions side by side."""
    from jobs.steps import run_pipeline
    from pipeline.report.table_output import print_rows
    from pipeline.store.catalog import run_query

    console = Console()
    spec = demo_spec(out)
    run_pipeline(spec)
    console.print(f"[yellow]{TINY_MODEL_NOTE}[/yellow]")
    sql = (
        "SELECT s.key, s.alt_text, c.num_tokens, c.finish_reason, left(c.caption, 40) AS caption "
        "FROM samples s JOIN captions c USING (key) ORDER BY s.key LIMIT 5"
    )
    console.rule(f'densecurate query {spec.root} "{sql}"')
    print_rows(*run_query(Path(spec.root), sql))
    console.print(f"Report: {spec.report.html}; exported pipeline: {spec.export.out}")
    console.print(f'Query the dataset with: densecurate query {spec.root} "SQL"')
    return Path(spec.root)
