"""Ray for the stages: start a local Ray on loopback or connect to a running cluster, and start
model-holding actors."""

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
from typing import TYPE_CHECKING, Any

from pipeline.core.workers import host_class
from schemas.errors import EnvironmentFailure, UserError

if TYPE_CHECKING:
    from pipeline.core.stage import Actors

# Both are read by Ray when it is imported, so they are set before. With the switch off, Ray keeps
# 127.0.0.1 as given: a local Ray takes it as its node address and listens on loopback only, and a
# cluster address on 127.0.0.1 is reached there (by default Ray swaps 127.0.0.1 for the machine's
# external address, where a head started on loopback does not listen).
RAY_LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
AUTH_MODE = "RAY_AUTH_MODE"  # ``token``: Ray sends this machine's auth token to the clusters it joins
CONNECT_TIMEOUT_S = 5.0  # to tell a dead head from a live one before Ray's own retries
# Signals that end a command which started a local Ray: each raises SystemExit in the main thread, so
# finally-blocks run (actors killed, locks released) and the exit hook shuts the local Ray down.
# SIGINT needs nothing: Python raises KeyboardInterrupt. SIGKILL cannot be caught (see shutdown_local_ray).
EXIT_SIGNALS = ("SIGTERM", "SIGHUP")
PROCESS_EXIT_WAIT_S = 5.0

_local_ray_hooks_installed = False
_received_stop_signal: int | None = None


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to the cluster at ``address`` or ``RAY_ADDRESS`` (set inside Ray jobs), or else start a
    local Ray bound to 127.0.0.1; no-op if connected.

    Without an address a local Ray always starts, whatever cluster ``ray start`` left on this machine
    (running, or crashed with its address file left behind). It lives as long as this process: it is
    shut down when the process exits, also on SIGTERM, SIGHUP and Ctrl-C (``shutdown_local_ray``).
    A cluster is joined with this machine's auth token when there is one; one that does not answer or
    refuses the token is an ``EnvironmentFailure`` naming its address and why, within seconds.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault(RAY_LOOPBACK_SWITCH, "0")
    if address:
        use_auth_token()
    import ray

    if ray.is_initialized():
        return
    if address:
        _connect(address)
    else:
        _start_local(num_cpus)


def _auth_token_source() -> str | None:
    """Where Ray finds this machine's auth token, in its order: ``RAY_AUTH_TOKEN``, the file of
    ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``; None when there is none."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return str(path) if path.is_file() else None


def use_auth_token() -> None:
    """Make Ray send this machine's auth token, if it has one, to the clusters it connects to.

    A head that ``ray start`` started where a token exists requires it (one without token
    authentication ignores it); Ray sends it only with ``RAY_AUTH_MODE=token``, set here unless the
    mode is set. Call before Ray is imported.
    """
    if AUTH_MODE not in os.environ and _auth_token_source() is not None:
        os.environ[AUTH_MODE] = "token"


def _start_local(num_cpus: int | None) -> None:
    """Start a local Ray for this process (``address="local"``: never a cluster found on the machine)."""
    import ray

    _shut_down_with_this_process()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    _exit_on_signals()  # after ray.init, which sets its own SIGTERM handler


def _connect(address: str) -> None:
    """Join the cluster at ``address`` after checking that its head answers and accepts this machine."""
    import ray

    _require_head(address)
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except ConnectionError as exc:
        raise EnvironmentFailure(_unreachable(address, _first_line(exc))) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _unreachable(address: str, why: str) -> str:
    return (
        f"cannot reach the Ray cluster at {address}{f' ({why})' if why else ''}: start its head "
        "(`ray start --head`, see the README) or pass the address of a running one (--ray-address or RAY_ADDRESS)"
    )


def _token_refused(address: str) -> str:
    """Why the cluster at ``address`` refused this machine, and what to do."""
    source, mode = _auth_token_source(), os.environ.get(AUTH_MODE)
    head_token = "its head's token (`ray get-auth-token` on the head)"
    put = f"put {head_token} in ~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH"
    if mode == "token" and source:
        return f"the Ray cluster at {address} refused the auth token of {source}: use {head_token}"
    if mode in (None, "token"):
        return f"the Ray cluster at {address} requires an auth token and this machine has none: {put}"
    return (
        f"the Ray cluster at {address} requires an auth token and RAY_AUTH_MODE={mode} keeps this machine from "
        f"sending one: unset RAY_AUTH_MODE{'' if source else ' and ' + put}"
    )


def _require_head(address: str) -> None:
    """Refuse at once a ``HOST:PORT`` address where nothing listens or whose cluster refuses this
    machine's token (``auto`` and ``ray://`` addresses are left to Ray)."""
    if "://" in address and not address.startswith("ray://"):
        raise UserError(
            f"{address} is a URL: --ray-address and RAY_ADDRESS take the cluster's address HOST:PORT "
            "(the --port of `ray start --head`, 6379 by default); the dashboard's URL is for `densecurate submit`"
        )
    host, sep, port = address.rpartition(":")
    if address.startswith("ray://") or not sep or not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise EnvironmentFailure(_unreachable(address, exc.strerror or str(exc))) from exc
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError, RpcError

    try:
        GcsClient(address=address)  # what ray.init retries for 20 s when refused; this answers at once
    except AuthenticationError as exc:
        raise EnvironmentFailure(_token_refused(address)) from exc
    except RpcError as exc:
        raise EnvironmentFailure(
            _unreachable(address, f"something listens there but does not answer as a Ray head: {_first_line(exc)}")
        ) from exc


def _exit_on_signal(signum: int, frame: Any) -> None:
    global _received_stop_signal
    _received_stop_signal = signum
    raise SystemExit(128 + signum)


def received_stop_signal() -> int | None:
    """The signal of ``EXIT_SIGNALS`` that is ending this process, if one came. Raised while the main thread
    waits in ``ray.get``, its SystemExit reaches the caller as Ray's ``SystemExit(1)``: this tells them apart."""
    return _received_stop_signal


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


def _node_cpus() -> int:
    """CPUs of the largest live node of the connected cluster (at least 1): the most one actor can hold."""
    import ray

    return max([1, *(int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node["Alive"])])


def start_actors(pool: Actors, count_cap: int) -> tuple[list[Any], str]:
    """Start the pool's actors (at most ``count_cap``): GPU actors when the cluster has GPUs and the
    pool wants them, else CPU actors. Each hosts one worker (``pool.cls``; its methods are run with
    ``actor.call.remote(method, *args)``, see ``pipeline.core.workers``). They are spread over the
    cluster's nodes; one that dies (or whose node is lost) restarts where there is room and retries the
    call it was running. Returns them and the device kind (``cuda`` or ``cpu``)."""
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
        threads = max(1, min(cluster_cpus() // count, _node_cpus()))
        resources, kind, kwargs = {"num_cpus": threads}, "cpu", {"cpu_threads": threads}
    if pool.runtime_env:
        resources["runtime_env"] = pool.runtime_env
    # A call is retried as long as its actor may restart: a node lost mid-call first makes its actor
    # unreachable (each try fails at once) and only then dead, and restarted elsewhere.
    remote_cls = ray.remote(max_restarts=2, max_task_retries=-1)(host_class(pool.cls))
    count = max(1, min(count, count_cap))
    options = {**resources, "scheduling_strategy": "SPREAD"}
    return [remote_cls.options(**options).remote(pool.cls, pool.args, kwargs) for _ in range(count)], kind
