"""Stop a Ray node started by a test in its own process group, and every process it started."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

import psutil


def stop_process_group(leader: subprocess.Popen, started: set[psutil.Process] | list[psutil.Process]) -> None:
    """End ``leader``'s process group, then kill any process of ``started`` that outlived it: only these, by
    PID (psutil remembers each start time, so a PID reused since is never killed)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(leader.pid, signal.SIGTERM)
    try:
        leader.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader.pid, signal.SIGKILL)
        leader.wait()
    _, alive = psutil.wait_procs(started, timeout=10)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)
    with contextlib.suppress(ProcessLookupError):  # the group outlives its leader while members remain
        os.killpg(leader.pid, signal.SIGKILL)
