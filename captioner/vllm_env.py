"""The vLLM environment's interpreter, checked before any caption actor starts in it.

Ray starts the vLLM caption actors with that interpreter (``py_executable``); one that cannot run them is
retried for minutes before Ray gives up, so the caption stage runs it once first, with a timeout.
"""

from __future__ import annotations

import subprocess
from importlib.metadata import version
from pathlib import Path

from captioner.errors import VllmEnvironmentError
from schemas.errors import EnvironmentFailure

# What a vLLM caption actor imports; the check prints the environment's Ray version (it must be the driver's).
ACTOR_IMPORTS = "vllm, ray, pipeline.stages.caption"
CHECK_CODE = f"import {ACTOR_IMPORTS}; print(ray.__version__)"
CHECK_TIMEOUT_S = 60.0  # importing vLLM takes seconds
REMEDY = (
    "run `make setup-vllm`, or pass --vllm-python with the interpreter of an environment that has vLLM and densecurate"
)


def _last_line(text: str) -> str:
    """The last non-empty line of an output (a Python error's ``Type: message``)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def check_vllm_python(python: str, timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """Refuse, in one sentence, an interpreter that is missing, does not run, cannot import what a vLLM caption
    actor imports or has another Ray version than this process (``VllmEnvironmentError``); a check that runs
    past ``timeout_s`` is the machine's failure (``EnvironmentFailure``)."""
    where = f"the vLLM environment {python}"
    if not Path(python).is_file():
        raise VllmEnvironmentError(f"{where} does not exist: {REMEDY}")
    try:
        done = subprocess.run(
            [python, "-c", CHECK_CODE], capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise EnvironmentFailure(
            f"{where} did not import {ACTOR_IMPORTS} within {timeout_s:.0f} s: check that machine's disk and load "
            "and rerun the same command"
        ) from None
    except OSError as exc:
        raise VllmEnvironmentError(f"{where} cannot be run ({exc.strerror}): {REMEDY}") from None
    if done.returncode != 0:
        said = _last_line(done.stderr) or _last_line(done.stdout) or "no message"
        raise VllmEnvironmentError(
            f"{where} failed `import {ACTOR_IMPORTS}` (exit status {done.returncode}, {said}): {REMEDY}"
        )
    theirs, ours = _last_line(done.stdout), version("ray")
    if theirs != ours:
        raise VllmEnvironmentError(
            f"{where} has Ray {theirs or 'of an unknown version'} but this process has Ray {ours} (one version "
            f"across a cluster's interpreters): install it there with `{python} -m pip install 'ray[default]=={ours}'`"
        )
