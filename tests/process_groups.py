"""Ray nodes started by tests: free loopback ports for them, and stopping one's process group and every process
it started."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
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


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 now."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports
