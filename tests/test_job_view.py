"""`jobs status` reads the step, the progress and the last error from a job's log."""

from __future__ import annotations

import io

from rich.console import Console

from jobs.job_view import JobView, job_view
from jobs.pipeline_job import SPEC_ENV
from jobs.submission import entrypoint, runtime_env
from schemas.pipeline_spec import PipelineSpec


def _log(*steps: tuple[str, str]) -> str:
    """A job log as `run_pipeline` writes it to a file: rules, then each stage's progress line."""
    out = io.StringIO()
    console = Console(file=out, width=100)
    for step, progress in steps:
        console.rule(f"demo: {step}")
        console.print(progress)
    return out.getvalue()


def test_the_latest_step_its_progress_and_the_last_error():
    log = _log(("shard", "shards ━━━━━━━━━━━━━━━━━━━━ 4/4 0:00:01"), ("caption", "caption ━━━━━━━╺━━━━━ 2/4 0:00:09"))
    assert job_view(log) == JobView("caption", "caption 2/4", None)
    failed = log + "Traceback (most recent call last):\n  File x\nschemas.errors.OutputConflictError: replaced 4\n"
    assert job_view(failed).last_error == "schemas.errors.OutputConflictError: replaced 4"
    assert job_view("error: the Ray cluster at x cannot be reached\n").lines() == [
        "last error: error: the Ray cluster at x cannot be reached"
    ]
    assert job_view(_log(("report", "written"))).lines() == ["step: report"]  # no bar in this step
    assert job_view("").lines() == []


def test_the_job_command_names_the_spec_and_carries_it_in_its_environment(tmp_path):
    spec = PipelineSpec.model_validate({"name": "demo", "root": str(tmp_path / "root")})
    command = entrypoint(spec, ["shard"], tmp_path / "my spec.yaml")
    assert command == f"python -m jobs.pipeline_job --spec demo --spec-path '{tmp_path}/my spec.yaml' --stage shard"
    assert PipelineSpec.model_validate_json(runtime_env(spec)["env_vars"][SPEC_ENV]) == spec
