"""Pipeline specs and Ray jobs: validation before submission, a real Ray head on 127.0.0.1, stop and resubmit."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from densecurate.cli import main
from jobs.demo import demo_spec
from schemas.pipeline_spec import parse_spec, resolve_paths
from tests.process_groups import free_ports, stop_process_group

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "jobs" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_specs_validate_and_resolve(example):
    spec = resolve_paths(parse_spec(example.read_text(), source=example.name), REPO)
    assert Path(spec.root).is_absolute()
    assert spec.shard is not None and spec.caption and spec.score is not None


def test_resolve_paths_keeps_hub_ids_and_makes_local_paths_absolute():
    spec = resolve_paths(parse_spec((REPO / "jobs/examples/sa1b_alignment.yaml").read_text()), REPO)
    assert spec.caption[0].model.model == "llava-hf/llava-1.5-7b-hf"
    assert spec.features.vae == "PixArt-alpha/PixArt-XL-2-1024-MS"
    demo = resolve_paths(parse_spec((REPO / "jobs/examples/demo.yaml").read_text()), REPO)
    assert demo.root == f"{REPO}/demo_out/dataset"
    assert demo.caption[0].model.model == f"{REPO}/demo_out/models/llava"  # ./ marks a local model folder
    assert demo.ground.clip.model == f"local-dir:{REPO}/demo_out/models/clip"
    assert f"run_dir={REPO}/demo_out/runs/tiny" in demo.train.overrides
    assert f"data.features={REPO}/demo_out/features" in demo.train.overrides
    assert resolve_paths(demo, REPO) == demo  # a job resolves its spec again: each path is still there once


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s["shard"].update(shard_size=0), "shard.shard_size: Input should be greater than or equal to 1"),
        (lambda s: s["caption"][0]["generation"].update(batch_size="lots"), "caption.0.generation.batch_size"),
        (lambda s: s.update(stages=["shard"]), "stages: Extra inputs are not permitted"),
        (lambda s: s["curate"].pop("field"), "curate: Value error, give the field to curate"),
    ],
)
def test_bad_spec_is_refused_before_submission(tmp_path, capsys, edit, message):
    spec = yaml.safe_load((REPO / "jobs/examples/demo.yaml").read_text())
    edit(spec)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    # The address points nowhere: validation must fail before any connection is tried.
    assert main(["submit", str(path), "--address", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert f"bad.yaml: {message}" in err


def test_a_spec_names_every_problem_and_the_key_meant(tmp_path, capsys):
    spec = yaml.safe_load((REPO / "jobs/examples/demo.yaml").read_text())
    spec["shard"]["shard_sise"] = spec["shard"].pop("shard_size", 4)
    spec["caption"][0]["generaton"] = spec["caption"][0].pop("generation", {})
    spec["score"]["min_count"] = "many"
    path = tmp_path / "typos.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["submit", str(path), "--address", "http://127.0.0.1:9"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "shard.shard_sise: Extra inputs are not permitted (did you mean shard_size?)" in err
    assert "caption.0.generaton: Extra inputs are not permitted (did you mean generation?)" in err
    assert "score.min_count" in err


def _descendants(head: subprocess.Popen) -> set[psutil.Process]:
    """The processes the head started (recursively) that are alive now."""
    try:
        return set(psutil.Process(head.pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return set()


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head with the job server, on 127.0.0.1 and free ports; stopped at the end even if tests fail."""
    gcs, dash, client, nm, om, agent, agent_grpc, rt_env, metrics = free_ports(9)
    temp = tempfile.mkdtemp(prefix="dcray", dir="/tmp")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    command = [
        str(bin_dir / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}",
        f"--node-manager-port={nm}",
        f"--object-manager-port={om}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={rt_env}",
        f"--metrics-export-port={metrics}",
        "--num-cpus=2",
        f"--temp-dir={temp}",
    ]
    log = open(Path(temp) / "head.log", "w")  # noqa: SIM115 - closed in the finally below
    # Its own session: its process group holds the head and what it starts, and nothing else.
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    started: set[psutil.Process] = set()
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                    break
            except urllib.error.HTTPError:  # answering (401 without the auth token): it is up
                break
            except OSError:
                if time.monotonic() > deadline or head.poll() is not None:
                    tail = (Path(temp) / "head.log").read_text()[-2000:]
                    raise RuntimeError(f"the Ray head did not start: {tail}") from None
                time.sleep(0.5)
        started |= _descendants(head)
        yield address
    finally:
        try:
            stop_process_group(head, started | _descendants(head))
        finally:
            log.close()


def _write_spec(out: Path) -> Path:
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(demo_spec(out).model_dump(mode="json")))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "densecurate", *args], capture_output=True, text=True, timeout=600)


def _records(out: Path) -> dict[str, object]:
    """What must not depend on interruptions: shard bytes, captions, density, curated keys, features keys."""
    root = out / "dataset"
    records: dict[str, object] = {p.name: p.read_bytes() for p in sorted((root / "shards").glob("*.tar"))}
    for part, cols in (("captions/tiny-llava", ["key", "caption", "num_tokens"]), ("density/alt_text", None)):
        for p in sorted((root / part).glob("*.parquet")):
            records[f"{part}/{p.name}"] = pq.read_table(p, columns=cols).to_pylist()
    for folder in ("curated", "features"):
        for p in sorted((out / folder).glob("*.parquet")):
            records[f"{folder}/{p.name}"] = pq.read_table(p, columns=["key", "status"]).to_pylist()
    return records


@pytest.fixture(scope="module")
def submitted_demo(ray_head, tmp_path_factory):
    out = tmp_path_factory.mktemp("job") / "demo"
    result = _cli("submit", str(_write_spec(out)), "--address", ray_head, "--follow")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


@pytest.mark.slow
def test_submitted_demo_job_writes_every_stage(submitted_demo, ray_head):
    out, result = submitted_demo
    job_id = result.stdout.splitlines()[0].strip()
    status = _cli("jobs", "status", job_id, "--address", ray_head).stdout.splitlines()
    assert status[:2] == ["SUCCEEDED", "step: export"]
    logs = _cli("jobs", "logs", job_id, "--address", ray_head).stdout
    assert "spec demo from " in logs and "spec-b64" not in logs and "DENSECURATE_SPEC_JSON" not in logs
    assert job_id in _cli("jobs", "list", "--address", ray_head).stdout
    assert "demo: export" in _cli("jobs", "logs", job_id, "--address", ray_head).stdout
    root = out / "dataset"
    assert len(list((root / "shards").glob("*.tar"))) == 4
    assert len(list((root / "captions" / "tiny-llava").glob("*.parquet"))) == 4
    assert (root / "vocab" / "tiny-llava.parquet").is_file() and (out / "report.html").is_file()
    assert len(list((out / "curated").glob("*.tar"))) == 4 and len(list((out / "features").glob("*.tar"))) == 4
    assert (out / "export" / "model_index.json").is_file()


@pytest.mark.slow
def test_job_stopped_half_way_then_resubmitted_gives_the_same_records(submitted_demo, ray_head, tmp_path):
    reference, _ = submitted_demo
    out = tmp_path / "demo"
    spec = _write_spec(out)
    submit = _cli("submit", str(spec), "--address", ray_head)
    job_id = submit.stdout.splitlines()[0].strip()
    deadline = time.monotonic() + 300
    while not list((out / "dataset" / "captions" / "tiny-llava").glob("*.parquet")):
        assert time.monotonic() < deadline, "the first captions never appeared"
        time.sleep(0.2)
    assert _cli("jobs", "stop", job_id, "--address", ray_head).stdout.strip() == "stopped"
    while _cli("jobs", "status", job_id, "--address", ray_head).stdout.splitlines()[0] not in (
        "STOPPED",
        "FAILED",
        "SUCCEEDED",
    ):
        time.sleep(0.5)
    assert not (out / "export").exists(), "the stop must land before the end"
    stopped = _cli("jobs", "status", job_id, "--address", ray_head).stdout.splitlines()
    assert stopped[1].startswith("step: ") and stopped[1] != "step: export", stopped
    again = _cli("submit", str(spec), "--address", ray_head, "--follow")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert _records(out) == _records(reference)
    leftovers = [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


@pytest.mark.parametrize("out", ["demo_out", "elsewhere/demo_out", "/tmp/x/demo"])
def test_demo_spec_moves_every_demo_path_once(out, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    spec = demo_spec(Path(out))
    folder = str((tmp_path / out).resolve())
    assert spec.root == f"{folder}/dataset"
    assert spec.caption[0].model.model == f"{folder}/models/llava"
    assert spec.features.vae == f"{folder}/models/pixart" and spec.export.out == f"{folder}/export"
    assert f"pipeline={folder}/models/pixart" in spec.train.overrides
    dumped = spec.model_dump_json()
    assert f"{folder}/{folder}" not in dumped and f"{folder}//" not in dumped
