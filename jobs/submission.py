"""Submit pipeline specs to a Ray cluster through Ray's Job Submission API, and follow them."""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jobs.pipeline_job import SPEC_ENV
from pipeline.core.ray_cluster import use_auth_token
from schemas.errors import EnvironmentFailure, MissingInputError
from schemas.pipeline_spec import PipelineSpec

DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # the dashboard of `ray start --head` on this machine
PACKAGES = ("schemas", "pipeline", "captioner", "trainer", "jobs")
PASSED_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "TRANSFORMERS_OFFLINE")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def job_address(address: str | None) -> str:
    """``--address``, else ``RAY_ADDRESS``, else the local head's dashboard."""
    return address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextmanager
def cluster_errors(address: str | None, job_id: str | None = None) -> Iterator[None]:
    """Turn what the Job Submission API raises into one sentence naming the address (and the job).

    A job the cluster does not know is a ``MissingInputError``; a cluster that cannot be reached,
    or that fails the request, an ``EnvironmentFailure``.
    """
    where = job_address(address)
    try:
        yield
    except RuntimeError as exc:  # the dashboard answered with an error status
        if job_id is not None and "status code 404" in str(exc):
            raise MissingInputError(
                f"the Ray cluster at {where} has no job {job_id}: `densecurate jobs list --address {where}` "
                "lists its jobs"
            ) from exc
        raise EnvironmentFailure(f"the Ray cluster at {where} refused the request: {_first_line(exc)}") from exc
    except OSError as exc:  # ConnectionError, timeouts, and the errors of requests and aiohttp
        detail = _first_line(exc)
        why = "" if where in detail else f" ({detail})"
        raise EnvironmentFailure(
            f"cannot reach the Ray cluster at {where}{why}: start its head (`ray start --head`) or pass the "
            "address of a running one's dashboard (--address or RAY_ADDRESS)"
        ) from exc


def client(address: str | None) -> Any:
    """A Job Submission client; sends this machine's Ray auth token when there is one (``use_auth_token``).

    A cluster that cannot be reached is an ``EnvironmentFailure`` naming the address.
    """
    use_auth_token()  # before Ray is imported
    from ray.job_submission import JobSubmissionClient

    with cluster_errors(address):
        return JobSubmissionClient(job_address(address))


def runtime_env(spec: PipelineSpec) -> dict[str, Any]:
    """Carries densecurate's own packages to the cluster (its dependencies must be installed there), and the
    spec as JSON in the job's environment."""
    root = Path(__file__).resolve().parents[1]
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    env[SPEC_ENV] = spec.model_dump_json()
    return {"py_modules": [str(root / name) for name in PACKAGES], "env_vars": env}


def entrypoint(spec: PipelineSpec, stages: Sequence[str] | None = None, source: Path | None = None) -> str:
    """The job's command: the spec by name (and the file it came from), never encoded."""
    parts = ["python", "-m", "jobs.pipeline_job", "--spec", spec.name]
    if source is not None:
        parts += ["--spec-path", str(source)]
    for stage in stages or ():
        parts += ["--stage", stage]
    return shlex.join(parts)


def submit(
    spec: PipelineSpec,
    *,
    address: str | None = None,
    stages: Sequence[str] | None = None,
    source: Path | None = None,
) -> str:
    """Submit a (validated, path-resolved) spec read from ``source``; returns the job id."""
    jobs = client(address)
    metadata = {"densecurate_spec": spec.name, "spec_path": str(source) if source else ""}
    with cluster_errors(address):
        return jobs.submit_job(
            entrypoint=entrypoint(spec, stages, source), runtime_env=runtime_env(spec), metadata=metadata
        )


def follow(job_id: str, *, address: str | None = None, out=sys.stdout) -> str:
    """Stream the job's logs until it ends; returns its final status."""
    jobs = client(address)

    async def tail() -> None:
        async for lines in jobs.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    with cluster_errors(address, job_id):
        asyncio.run(tail())
    return wait(job_id, address=address, timeout=60)


def wait(job_id: str, *, address: str | None = None, timeout: float = 3600, poll: float = 1.0) -> str:
    """Poll until the job ends (or ``timeout``); returns its status."""
    jobs = client(address)
    deadline = time.monotonic() + timeout
    while True:
        with cluster_errors(address, job_id):
            status = str(jobs.get_job_status(job_id).value)
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(poll)
