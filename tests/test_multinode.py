"""A real two-node Ray cluster on 127.0.0.1, reached as the README says: stages through --ray-address and a
submitted job spec land on both nodes; a node lost mid-caption leaves the run to finish on the other with
the records of an uninterrupted run. Without an address a command starts its own Ray, whatever `ray start`
left on the machine; a head that is absent or refuses this machine's token is one sentence within seconds.

The cluster runs under a private RAY_TMPDIR and HOME (its auth token), on free ports, each node in its own
process group, which the tests stop; a local run beside it shares its RAY_TMPDIR, the other one has its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.sample_data import write_sample_folder
from pipeline.store.parquet_meta import read_meta
from tests.process_groups import free_ports, stop_process_group

BIN = Path(sys.executable).parent
DENSECURATE = str(BIN / "densecurate")
SHARDS = 8  # four folders of ten photos, five a shard
# Every caption runs to its 512 tokens (the tiny model never ends early): seconds a shard on a CPU.
CAPTION_OPTIONS = ("--name", "tiny", "--max-new-tokens", "512", "--batch-size", "1", "--workers", "2")
# `ray start --address` swaps a loopback address for the machine's external one, where a head started on
# loopback does not listen (and refuses to join at all with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0): the
# second node runs Ray's own CLI with that swap off, so it joins and listens on 127.0.0.1.
JOIN_ON_LOOPBACK = (
    "import sys, ray._private.services as services; services.resolve_ip_for_localhost = lambda host: host; "
    "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"
)


@dataclass
class Cluster:
    address: str  # the head's GCS, for --ray-address
    dashboard: str  # for `densecurate submit`
    env: dict[str, str]  # of every command run against it: its HOME (token) and RAY_TMPDIR
    head_id: str
    worker_id: str
    worker: subprocess.Popen


def _node_ports() -> list[str]:
    names = ("node-manager", "object-manager", "dashboard-agent-listen", "dashboard-agent-grpc", "runtime-env-agent")
    return [f"--{name}-port={port}" for name, port in zip(names, free_ports(len(names)), strict=True)] + [
        f"--metrics-export-port={free_ports(1)[0]}"
    ]


def _start_node(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start a `ray start --block` in its own process group and wait until it says the node runs."""
    with log.open("w") as out:
        node = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while "Ray runtime started" not in log.read_text():
        if node.poll() is not None or time.monotonic() > deadline:
            _stop(node)
            raise RuntimeError(f"a Ray node did not start: {log.read_text()[-3000:]}")
        time.sleep(0.3)
    return node


def _node_id(node: subprocess.Popen) -> str:
    """The Ray node id of the raylet that ``node`` started."""
    for proc in psutil.Process(node.pid).children(recursive=True):
        for arg in proc.cmdline():
            if arg.startswith("--node_id="):
                return arg.removeprefix("--node_id=")
    raise RuntimeError("no raylet under this node")


def _stop(node: subprocess.Popen) -> None:
    """End the node's process group, then any process it started that outlived it (by PID, start time checked)."""
    try:
        started = psutil.Process(node.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        started = []
    stop_process_group(node, started)


def _kill_node(node: subprocess.Popen) -> None:
    """Lose a node at once: SIGKILL its workers (Ray gives each a process group of its own), then its group."""
    workers = psutil.Process(node.pid).children(recursive=True)
    for proc in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    os.killpg(node.pid, signal.SIGKILL)


def _wait_for_nodes(dashboard: str, token: str, count: int) -> None:
    """Wait until the head counts ``count`` live nodes (its dashboard's node list)."""
    request = urllib.request.Request(f"{dashboard}/nodes?view=summary", headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, KeyError):
            with urllib.request.urlopen(request, timeout=5) as reply:
                nodes = json.load(reply)["data"]["summary"]
            if sum(node["raylet"]["state"] == "ALIVE" for node in nodes) == count:
                return
        time.sleep(0.5)
    raise RuntimeError(f"the head never counted {count} live nodes")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A head (2 CPUs, token authentication, the README's loopback recipe) and a second node (1 CPU) joined
    to it; both stopped at the end even if tests fail."""
    base = Path(tempfile.mkdtemp(prefix="dcmn", dir="/tmp"))  # short: Ray's socket paths must stay short
    home = base / "home"
    (home / ".ray").mkdir(parents=True)
    token = secrets.token_hex(32)
    (home / ".ray" / "auth_token").write_text(token)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(HOME=str(home), RAY_TMPDIR=str(base), PATH=f"{BIN}:{env['PATH']}", HF_HUB_OFFLINE="1")
    gcs, dash, client = free_ports(3)
    # A lost node is noticed after 3 missed health checks a second apart (Ray's default: 5 of 3 s).
    head_env = {
        **env,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
    }
    head_command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}",
        "--num-cpus=2",
        *_node_ports(),
    ]
    worker_env = {k: v for k, v in env.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    worker_env["RAY_AUTH_MODE"] = "token"  # `ray start --address` sends the token only in token mode
    worker_command = [
        sys.executable,
        "-c",
        JOIN_ON_LOOPBACK,
        "start",
        "--block",
        f"--address=127.0.0.1:{gcs}",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=1",
        *_node_ports(),
    ]
    nodes: list[subprocess.Popen] = []
    try:
        nodes.append(_start_node(head_command, head_env, base / "head.log"))
        nodes.append(_start_node(worker_command, worker_env, base / "worker.log"))
        _wait_for_nodes(f"http://127.0.0.1:{dash}", token, 2)
        yield Cluster(
            f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", env, _node_id(nodes[0]), _node_id(nodes[1]), nodes[1]
        )
    finally:
        for node in reversed(nodes):
            _stop(node)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Four sub-folders (four input units, so four shard tasks) of the ten sample photos each."""
    sample = write_sample_folder(tmp_path_factory.mktemp("sample"), with_bad_files=False)
    folder = tmp_path_factory.mktemp("photos")
    for part in range(4):
        shutil.copytree(sample, folder / f"p{part}")
    return folder


def _cli(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """A separate densecurate process: its own Ray driver."""
    return subprocess.run([DENSECURATE, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _shard(env: dict[str, str], src: Path, root: Path, *options: str) -> subprocess.CompletedProcess:
    return _cli(env, "shard", str(src), "--out", str(root), "--shard-size", "5", *options, timeout=120)


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _shard_nodes(root: Path) -> list[str | None]:
    return [json.loads(p.read_text()).get("node_id") for p in sorted((root / "shards").glob("*_stats.json"))]


def _caption_nodes(folder: Path) -> list[str | None]:
    return [(read_meta(p) or {}).get("node_id") for p in sorted(folder.glob("*.parquet"))]


def _caption_records(folder: Path) -> dict[str, list[dict]]:
    columns = ["key", "status", "caption", "num_tokens"]
    return {p.name: pq.read_table(p, columns=columns).to_pylist() for p in sorted(folder.glob("*.parquet"))}


@pytest.fixture(scope="module")
def sharded(cluster, photos, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cluster") / "root"
    _ok(_shard(cluster.env, photos, root, "--ray-address", cluster.address))
    return root


@pytest.fixture(scope="module")
def captioned(cluster, sharded, tiny_llava_dir) -> Path:
    """The captions of an uninterrupted run on both nodes."""
    model = ("--model", str(tiny_llava_dir))
    _ok(_cli(cluster.env, "caption", str(sharded), *model, *CAPTION_OPTIONS, "--ray-address", cluster.address))
    return sharded / "captions" / "tiny"


def test_nothing_listening_is_one_sentence_at_once(photos, tmp_path):
    started = time.monotonic()
    result = _shard(dict(os.environ), photos, tmp_path / "root", "--ray-address", "127.0.0.1:9")
    assert result.returncode == 1 and time.monotonic() - started < 30
    assert "error: cannot reach the Ray cluster at 127.0.0.1:9 (Connection refused)" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_stale_address_file_does_not_stop_a_local_run(photos, tmp_path):
    """A crashed head leaves its address in RAY_TMPDIR/ray/ray_current_cluster; a local run never reads it."""
    temp = Path(tempfile.mkdtemp(prefix="dcst", dir="/tmp"))
    try:
        (temp / "ray").mkdir()
        (temp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_ports(1)[0]}")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(temp)}
        _ok(_shard(env, photos / "p0", tmp_path / "root"))
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert _shard_nodes(tmp_path / "root") and None not in _shard_nodes(tmp_path / "root")


@pytest.mark.slow
def test_without_address_a_command_starts_its_own_ray_beside_a_running_head(cluster, photos, tmp_path):
    assert (Path(cluster.env["RAY_TMPDIR"]) / "ray" / "ray_current_cluster").read_text() == cluster.address
    _ok(_shard(cluster.env, photos / "p0", tmp_path / "root"))
    nodes = set(_shard_nodes(tmp_path / "root"))
    assert len(nodes) == 1 and not nodes & {cluster.head_id, cluster.worker_id}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("0" * 64, "refused the auth token of RAY_AUTH_TOKEN: use its head's token (`ray get-auth-token` on the head)"),
        (None, "requires an auth token and this machine has none: put its head's token"),
    ],
    ids=["wrong-token", "no-token"],
)
def test_refused_token_is_one_sentence_within_seconds(cluster, photos, tmp_path, token, message):
    env = {**cluster.env, "RAY_AUTH_TOKEN": token} if token else {**cluster.env, "HOME": str(tmp_path)}
    started = time.monotonic()
    result = _shard(env, photos, tmp_path / "root", "--ray-address", cluster.address)
    assert result.returncode == 1 and time.monotonic() - started < 30
    assert f"error: the Ray cluster at {cluster.address} {message}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_stages_through_ray_address_run_on_both_nodes(cluster, sharded, captioned):
    both = {cluster.head_id, cluster.worker_id}
    assert len(_shard_nodes(sharded)) == SHARDS and set(_shard_nodes(sharded)) == both
    assert len(_caption_nodes(captioned)) == SHARDS and set(_caption_nodes(captioned)) == both


@pytest.mark.slow
def test_submitted_job_runs_on_both_nodes(cluster, photos, tmp_path):
    root = tmp_path / "root"
    spec = {"name": "multinode", "root": str(root), "shard": {"inputs": [str(photos)], "shard_size": 5}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = _ok(_cli(cluster.env, "submit", str(path), "--address", cluster.dashboard, "--follow"))
    assert "multinode: shard" in result.stdout
    assert len(_shard_nodes(root)) == SHARDS and set(_shard_nodes(root)) == {cluster.head_id, cluster.worker_id}


@pytest.mark.slow
def test_node_lost_mid_caption_the_run_finishes_on_the_other_with_the_same_records(
    cluster, sharded, captioned, tiny_llava_dir, tmp_path
):
    """Kills the second node (every process of it) once it has captioned a shard: runs last."""
    out = sharded / "captions" / "killed"
    options = [a if a != "tiny" else "killed" for a in CAPTION_OPTIONS]
    command = [DENSECURATE, "caption", str(sharded), "--model", str(tiny_llava_dir), *options]
    log = tmp_path / "caption.log"
    with log.open("w") as output:
        run = subprocess.Popen(
            [*command, "--ray-address", cluster.address], env=cluster.env, stdout=output, stderr=output
        )
    try:
        deadline = time.monotonic() + 120
        while cluster.worker_id not in _caption_nodes(out):
            assert run.poll() is None and time.monotonic() < deadline, "the second node never captioned a shard"
            time.sleep(0.1)
        time.sleep(0.5)  # the node's actor is handed its next shard
        done_at_kill = {p.name for p in out.glob("*.parquet")}
        _kill_node(cluster.worker)
        run.wait(timeout=180)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 0, log.read_text()[-3000:]
    assert len(done_at_kill) <= SHARDS - 2, "the kill must land while both nodes have a shard under way"
    after_kill = [p for p in sorted(out.glob("*.parquet")) if p.name not in done_at_kill]
    assert {(read_meta(p) or {}).get("node_id") for p in after_kill} == {cluster.head_id}
    assert _caption_records(out) == _caption_records(captioned)
