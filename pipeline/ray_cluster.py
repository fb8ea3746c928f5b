"""Ray for the stages: connect or start a local Ray on loopback, and start model-holding actors."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from pipeline.stage import Actors
from schemas.errors import EnvironmentFailure

# Read by Ray when it is imported: with it off, a local Ray takes 127.0.0.1 as its node address and
# every Ray service listens on loopback only (Ray's default is the machine's external address).
RAY_LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
CONNECT_TIMEOUT_S = 5.0  # to tell a dead head from a live one before Ray's own minute of retries
# Signals that end a command which started a local Ray: each raises SystemExit in the main thread, so
# finally-blocks run (actors killed, locks released) and the exit hook shuts the local Ray down.
# SIGINT needs nothing: Python raises KeyboardInterrupt. SIGKILL cannot be caught (see shutdown_local_ray).
EXIT_SIGNALS = ("SIGTERM", "SIGHUP")
PROCESS_EXIT_WAIT_S = 5.0

_local_ray_hooks_installed = False


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` or ``RAY_ADDRESS`` (a cluster; set inside Ray jobs), or start a local Ray
    bound to 127.0.0.1; no-op if connected.

    A local Ray lives as long as this process: it is shut down when the process exits, also on
    SIGTERM, SIGHUP and Ctrl-C (``shutdown_local_ray``). A cluster that cannot be reached is an
    ``EnvironmentFailure`` naming its address.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        os.environ.setdefault(RAY_LOOPBACK_SWITCH, "0")
    import ray

    if ray.is_initialized():
        return
    if address:
        _require_reachable(address)
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except ConnectionError as exc:
            raise EnvironmentFailure(_unreachable(address, str(exc).splitlines()[0] if str(exc) else "")) from exc
    else:
        _shut_down_with_this_process()
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
        _exit_on_signals()  # after ray.init, which sets its own SIGTERM handler


def _unreachable(address: str, why: str) -> str:
    return (
        f"cannot reach the Ray cluster at {address}{f' ({why})' if why else ''}: start its head "
        "(`ray start --head`) or pass the address of a running one (--ray-address or RAY_ADDRESS)"
    )


def _require_reachable(address: str) -> None:
    """Refuse at once a ``HOST:PORT`` address where nothing listens (``auto`` and ``ray://`` are left to Ray)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if address.startswith("ray://") or not sep or not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise EnvironmentFailure(_unreachable(address, exc.strerror or str(exc))) from exc


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _shut_down_with_this_process() -> None:
    """Shut the local Ray down when this process exits (also when ``ray.init`` is interrupted)."""
    global _local_ray_hooks_installed
    if not _local_ray_hooks_installed:
        _local_ray_hooks_installed = True
        atexit.register(shutdown_local_ray)  # runs before Ray's own exit hook (registered earlier)


def _exit_on_signals() -> None:
    """Make the signals of ``EXIT_SIGNALS`` raise SystemExit, so the process exits through its exit hooks."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set in the main thread
    for name in EXIT_SIGNALS:
        signum = getattr(signal, name, None)
        if signum is None:
            continue
        current = signal.getsignal(signum)
        if current is signal.SIG_IGN:
            continue  # e.g. SIGHUP under nohup: the user asked to survive it
        signal.signal(signum, _exit_on_signal)


def _ray_processes() -> dict[int, str]:
    """This process's descendants that run Ray (raylet, gcs_server, agents, workers), with their start
    times (``/proc``; empty where there is none)."""
    children: dict[int, list[int]] = {}
    started: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid = int(stat.parent.name)
        children.setdefault(int(fields[1]), []).append(pid)
        started[pid] = fields[19]
    found: dict[int, str] = {}
    todo = list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"ray" in cmdline:
            found[pid] = started[pid]
    return found


def _still_running(pid: int, start: str) -> bool:
    """Whether ``pid`` is still the process that started at ``start`` (a reused pid is another one) and not a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[19] == start and fields[0] != "Z"


def shutdown_local_ray() -> None:
    """Shut down the local Ray this process started and end whichever of its processes outlive that.

    ``ray.shutdown`` stops the raylet and GCS; their agents (dashboard agent, runtime-env agent) may
    outlive a raylet stopped mid-task by a minute, so every Ray process this process started is ended
    here. A SIGKILLed command runs none of this: then Ray's reaper process stops the GCS and raylet
    when it sees its parent gone, and the agents and workers end on their own once they find the
    raylet gone (about a minute).
    """
    import ray

    processes = _ray_processes()
    if ray.is_initialized():
        ray.shutdown()
    deadline = time.monotonic() + PROCESS_EXIT_WAIT_S
    left = processes
    while left and time.monotonic() < deadline:
        left = {pid: start for pid, start in left.items() if _still_running(pid, start)}
        if left:
            time.sleep(0.1)
    for pid, start in left.items():
        if _still_running(pid, start):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def cluster_cpus() -> int:
    """CPUs of the connected Ray cluster (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def start_actors(pool: Actors, count_cap: int) -> tuple[list[Any], str]:
    """Start the pool's actors (at most ``count_cap``): GPU actors when the cluster has GPUs and the
    pool wants them, else CPU actors. Actors restart when they die and retry the call they were
    running. Returns them and the device kind (``cuda`` or ``cpu``)."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    kwargs: dict[str, Any] = {}
    if gpus and pool.gpus_per_worker > 0 and pool.device != "cpu":
        count = pool.workers or max(1, int(gpus // pool.gpus_per_worker))
        resources: dict[str, Any] = {"num_gpus": pool.gpus_per_worker, "num_cpus": 1}
        kind = "cuda"
    elif pool.one_per_core:
        count = pool.workers or cluster_cpus()
        resources, kind = {"num_cpus": 1}, "cpu"
    else:
        count = pool.workers or 1
        threads = max(1, cluster_cpus() // count)
        resources, kind, kwargs = {"num_cpus": threads}, "cpu", {"cpu_threads": threads}
    if pool.runtime_env:
        resources["runtime_env"] = pool.runtime_env
    remote_cls = ray.remote(max_restarts=2, max_task_retries=2)(pool.cls)
    count = max(1, min(count, count_cap))
    return [remote_cls.options(**resources).remote(*pool.args, **kwargs) for _ in range(count)], kind
