"""Every error a user meets is one sentence and a non-zero exit: 2 for a mistake they can fix, 1 for a
failure of the environment; ``--debug`` (or ``DENSECURATE_DEBUG=1``) shows the traceback."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from densecurate import commands
from densecurate.cli import build_parser, explain_error, main
from schemas.errors import ConfigError, EnvironmentFailure, MissingInputError, UserError
from schemas.validation import load_yaml
from tests.test_jobs import ray_head  # noqa: F401 - a live Ray head with the job server (module scope)

TRACEBACK = "Traceback (most recent call last)"
DEAD_HEAD = "http://127.0.0.1:1"  # nothing listens on port 1
REPO = Path(__file__).resolve().parents[1]
TAGGED = "name: x\nroot: r\ncurate:\n  field: alt_text\n  out: !!python/object:os.system\n    a: 1\n"
DEEP = "a: " + "[" * 100_000 + "]" * 100_000 + "\n"


def _run(argv: list[str], capsys) -> tuple[int, str]:
    """``main(argv)`` in this process: its exit code (argparse's usage errors included) and its stderr."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: usage errors exit 2
        code = exc.code
    return code, capsys.readouterr().err


def _one_sentence(err: str) -> str:
    """The error line, checked to be one ``error:`` line with no traceback."""
    assert TRACEBACK not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# --- YAML a user wrote -----------------------------------------------------------------------------------


def test_load_yaml_names_an_unsupported_tag_with_file_and_line():
    with pytest.raises(ConfigError) as info:
        load_yaml(TAGGED, "spec.yaml")
    assert str(info.value).startswith("spec.yaml, line 5, column 8: unsupported YAML tag !!python/object:os.system")


def test_load_yaml_refuses_deep_nesting_and_invalid_yaml():
    with pytest.raises(ConfigError, match=r"^deep.yaml: YAML nested too deeply"):
        load_yaml(DEEP, "deep.yaml")
    with pytest.raises(ConfigError, match=r"^bad.yaml, line 2, column 1: invalid YAML"):
        load_yaml("a: [1, 2\n", "bad.yaml")
    assert load_yaml("a: [1, {b: c}]\n", "ok.yaml") == {"a": [1, {"b": "c"}]}


@pytest.mark.parametrize(
    "text, expected", [(TAGGED, "unsupported YAML tag"), (DEEP, "nested too deeply")], ids=["tag", "deep"]
)
@pytest.mark.parametrize("command", ["run", "curate"])
def test_spec_and_curate_config_yaml_errors_are_one_sentence(tmp_path, capsys, command, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    argv = {
        "run": ["run", str(path)],
        "curate": ["curate", str(tmp_path), "--field", "alt_text", "--out", str(tmp_path / "o"), "--config", str(path)],
    }[command]
    code, err = _run(argv, capsys)
    assert code == 2
    line = _one_sentence(err)
    assert str(path) in line and expected in line
    if text is TAGGED:
        assert "line 5" in line


@pytest.mark.parametrize("text", [TAGGED, DEEP], ids=["tag", "deep"])
def test_training_config_yaml_errors_are_one_sentence(tmp_path, capsys, text):
    path = tmp_path / "train.yaml"
    path.write_text(text)
    code, err = _run(["train", str(path)], capsys)
    assert code == 2 and str(path) in _one_sentence(err)


def test_a_training_pipeline_that_does_not_exist_is_one_sentence(tmp_path, capsys):
    from trainer.loop import vae_scaling_factor

    with pytest.raises(MissingInputError, match=r"model\.pipeline '/nonexistent' has no VAE to load"):
        vae_scaling_factor("/nonexistent")


# --- options ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["caption", "{root}", "--model", "m", "--device", "tpu"], "device 'tpu' is not one of auto, cpu, cuda"),
        (["caption", "{root}", "--model", "m", "--name", ".."], "name '..' must be a simple name"),
        (["caption", "{root}", "--model", "m", "--name", "a/b"], "name 'a/b' must be a simple name"),
        (["caption", "{root}", "--model", "m", "--name", ""], "name '' must be a simple name"),
        (
            ["features", "{root}", "--out", "{tmp}/f", "--vae", "v", "--text-encoder", "t", "--device", "tpu"],
            "device 'tpu' is not one of",
        ),
        (
            ["features", "{root}", "--out", "{tmp}/f", "--vae", "{file}", "--text-encoder", "t"],
            "is a file, not a model folder",
        ),
        (
            ["features", "{root}", "--out", "{tmp}/f", "--vae", "{tmp}/nope", "--text-encoder", "t"],
            "--vae {tmp}/nope: the model folder does not exist",
        ),
        (["query", "{root}", ""], "the query is empty"),
        (["query", "{root}", "-- only a comment"], "the query is empty"),
        (["score", "{root}", "--spacy-model", "nosuch"], "spaCy model 'nosuch' is not installed"),
        (["shard", "{tmp}", "--out", "{file}"], "is a file, not a folder"),
        (["eval", "{tmp}/nope", "--prompts", "{file}"], "pipeline folder {tmp}/nope does not exist"),
        (["models", "make-tiny", "{file}"], "is a file, not a folder"),
    ],
)
def test_bad_values_are_one_sentence_with_exit_2(tmp_path, capsys, argv, expected):
    file = tmp_path / "a_file"
    file.write_text("a photo of a cat\n")
    root = tmp_path / "root"
    (root / "shards").mkdir(parents=True)  # a dataset root with no shards yet
    fill = {"root": root, "tmp": tmp_path, "file": file}
    code, err = _run([part.format(**fill) for part in argv], capsys)
    assert code == 2
    assert expected.format(**fill) in _one_sentence(err)


# --- the Ray job server -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["jobs", "list", "--address", DEAD_HEAD],
        ["jobs", "status", "raysubmit_123", "--address", DEAD_HEAD],
        ["jobs", "logs", "raysubmit_123", "--address", DEAD_HEAD],
        ["jobs", "stop", "raysubmit_123", "--address", DEAD_HEAD],
        ["submit", str(REPO / "jobs/examples/laion_recaption.yaml"), "--address", DEAD_HEAD],
    ],
)
def test_a_dead_ray_head_is_one_sentence_with_exit_1(capsys, argv):
    code, err = _run(argv, capsys)
    assert code == 1
    line = _one_sentence(err)
    assert f"cannot reach the Ray cluster at {DEAD_HEAD}" in line and "ray start --head" in line


def test_a_dead_ray_head_through_the_console_script():
    result = subprocess.run(
        [sys.executable, "-m", "densecurate", "jobs", "status", "raysubmit_123", "--address", DEAD_HEAD],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert DEAD_HEAD in _one_sentence(result.stderr)


def test_a_dead_cluster_for_a_stage_is_one_sentence_with_exit_1(tmp_path):
    from pipeline.sample_data import write_sample_folder

    photos = write_sample_folder(tmp_path / "photos")
    command = ["shard", str(photos), "--out", str(tmp_path / "root"), "--ray-address", "127.0.0.1:1"]
    result = subprocess.run(
        [sys.executable, "-m", "densecurate", *command],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    line = _one_sentence(result.stderr)
    assert "cannot reach the Ray cluster at 127.0.0.1:1 " in line and "--ray-address" in line


@pytest.mark.slow
def test_an_unknown_job_on_a_live_head_names_the_id(ray_head, capsys):  # noqa: F811
    for action in ("status", "logs", "stop"):
        code, err = _run(["jobs", action, "BOGUS_ID", "--address", ray_head], capsys)
        assert code == 2
        line = _one_sentence(err)
        assert "has no job BOGUS_ID" in line and ray_head in line


# --- failures of the machine ------------------------------------------------------------------------------


def _raise_in_verify(monkeypatch, exc: BaseException) -> None:
    def handler(args):
        raise exc

    monkeypatch.setattr(commands, "cmd_verify", handler)


@pytest.mark.parametrize(
    "error, code, expected",
    [
        (OSError(errno.ENOSPC, "No space left on device"), 1, "no space left on the device of {out}"),
        (PermissionError(errno.EACCES, "Permission denied"), 2, "cannot write {out}"),
        (OSError(errno.EROFS, "Read-only file system"), 2, "cannot write {out}"),
    ],
)
def test_full_disks_and_unwritable_outputs_name_the_path(tmp_path, capsys, monkeypatch, error, code, expected):
    out = tmp_path / "shards" / "00003.tar"
    error.filename = f"{out}.tmp-4242"  # what a writer holds: the in-progress name
    _raise_in_verify(monkeypatch, error)
    got, err = _run(["verify", str(tmp_path)], capsys)
    assert got == code
    line = _one_sentence(err)
    assert expected.format(out=out) in line and ".tmp-" not in line
    assert "rerun the same command" in line and "finished shards are kept" in line


def test_errors_raised_in_a_ray_task_are_judged_by_their_cause(tmp_path):
    from ray.exceptions import RayTaskError

    cause = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "00001.parquet"))
    wrapped = RayTaskError("write_shard", "remote traceback", cause).as_instanceof_cause()
    code, [line] = explain_error(wrapped)
    assert code == 1 and str(tmp_path / "00001.parquet") in line
    user = RayTaskError("score", "remote traceback", UserError("the user's mistake")).as_instanceof_cause()
    assert explain_error(user) == (2, ["the user's mistake"])


def test_debug_shows_the_traceback_and_keeps_the_exit_code(tmp_path, capsys, monkeypatch):
    (tmp_path / "shards").mkdir()
    argv = ["query", str(tmp_path), ""]
    code, err = _run(argv, capsys)
    assert code == 2 and TRACEBACK not in err
    for debug_argv in (["--debug", *argv], [*argv, "--debug"]):
        code, err = _run(debug_argv, capsys)
        assert code == 2 and TRACEBACK in err and "the query is empty" in err
    monkeypatch.setenv("DENSECURATE_DEBUG", "1")
    code, err = _run(argv, capsys)
    assert code == 2 and TRACEBACK in err


def test_a_bug_still_shows_its_traceback(tmp_path, monkeypatch):
    _raise_in_verify(monkeypatch, ZeroDivisionError("a bug"))
    with pytest.raises(ZeroDivisionError):
        main(["verify", str(tmp_path)])


# --- a worker that died -----------------------------------------------------------------------------------


def _job(tmp_path: Path):
    from pipeline.core.stage import ShardJob

    return ShardJob(index=3, out_dir=tmp_path / "captions" / "m", fingerprint="f", items=1)


def _run_one_job_on(worker_cls: type, tmp_path: Path) -> None:
    from pipeline.core.ray_cluster import start_actors
    from pipeline.core.runner import _ActorLauncher, _run_jobs
    from pipeline.core.stage import Actors, StageRun

    pool = Actors(worker_cls, (), "work", workers=1)
    actors, _ = start_actors(pool, count_cap=1)
    stage = SimpleNamespace(label="caption", item_label=None)
    _run_jobs(stage, [_job(tmp_path)], _ActorLauncher(actors, "work"), StageRun(), total=1)


def test_an_actor_that_dies_more_often_than_it_may_restart_names_the_shard(ray_local, tmp_path):
    class DiesEveryTime:
        def __init__(self, cpu_threads: int | None = None) -> None:
            pass

        def work(self, job):
            os._exit(1)

    with pytest.raises(EnvironmentFailure) as info:
        _run_one_job_on(DiesEveryTime, tmp_path)
    message = str(info.value)
    assert "caption worker died more often than it may restart" in message
    assert f"shard 3 of {tmp_path / 'captions' / 'm'}" in message
    assert "rerun the same command" in message and "finished shards are kept" in message
    assert explain_error(info.value)[0] == 1


@pytest.mark.slow
def test_an_actor_whose_constructor_raises_a_user_error_is_exit_2(ray_local, tmp_path):
    class NeedsAModel:
        def __init__(self, cpu_threads: int | None = None) -> None:
            raise ConfigError("model m is not installed")

        def work(self, job):
            return {}

    with pytest.raises(ConfigError, match=r"^model m is not installed$"):
        _run_one_job_on(NeedsAModel, tmp_path)

    class Broken:
        def __init__(self, cpu_threads: int | None = None) -> None:
            raise RuntimeError("CUDA driver too old")

        def work(self, job):
            return {}

    with pytest.raises(EnvironmentFailure, match=r"the caption workers could not start \(RuntimeError: CUDA"):
        _run_one_job_on(Broken, tmp_path)


# --- a local Ray ends with its command --------------------------------------------------------------------


def _photo_folder(folder: Path, count: int) -> Path:
    from PIL import Image
    from skimage import data as skdata

    folder.mkdir()
    image = Image.fromarray(skdata.astronaut()).resize((128, 128))
    for i in range(count):
        image.save(folder / f"photo{i:03d}.jpg")
    return folder


def _start_as_a_shell_would(arguments: list[str]) -> subprocess.Popen:
    """Python with ``arguments`` in a session of its own, starting a local Ray on loopback, its output read here."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    # A child inherits an ignored SIGINT (and Python then installs no KeyboardInterrupt): start it as a
    # shell would, whatever an earlier test left this process with.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(
            [sys.executable, *arguments],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    finally:
        signal.signal(signal.SIGINT, inherited)


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum, code, said",
    [
        (signal.SIGTERM, 128 + signal.SIGTERM, "stopped by SIGTERM"),
        (signal.SIGINT, 130, "interrupted"),  # Ctrl-C
    ],
)
def test_a_stopped_command_shuts_its_local_ray_down(tmp_path, signum, code, said):
    import psutil

    photos = _photo_folder(tmp_path / "photos", 800)  # 100 inputs of 8: still running when stopped
    out = tmp_path / "root"
    command = ["-m", "densecurate", "shard", str(photos), "--out", str(out)]
    proc = _start_as_a_shell_would([*command, "--shard-size", "1", "--workers", "1", "--min-size", "8"])
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while not list((out / "shards").glob("*_stats.json")):  # Ray is up and shards are being written
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the shard command wrote no shard in 120 s"
            time.sleep(0.1)
        started = psutil.Process(proc.pid).children(recursive=True)
        names = {p.name() for p in started if p.is_running()}
        assert {"raylet", "gcs_server"} <= names, names
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == code, err
        assert said in err and "rerun the same command" in err and TRACEBACK not in err
        _, alive = psutil.wait_procs(started, timeout=20)
        alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        assert not [p for p in alive if p.name() in ("raylet", "gcs_server")]
        assert not alive, [p.name() for p in alive]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for p in started:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


# A command whose main thread waits in ray.get, where Ray turns the SystemExit of a signal into SystemExit(1).
WAITS_IN_RAY_GET = """
import sys, time
import ray
from densecurate import cli, commands
from pipeline.core.ray_cluster import init_ray


def wait_in_ray_get(args):
    init_ray(num_cpus=1)
    slow = ray.remote(lambda: time.sleep(120))
    ref = slow.remote()
    print("waiting", flush=True)
    ray.get(ref)
    return 0


commands.cmd_verify = wait_in_ray_get  # the parser cli.main builds runs it for `verify`
sys.exit(cli.main(["verify", "."]))
"""


@pytest.mark.slow
def test_a_stop_signal_while_waiting_in_ray_get_still_exits_with_its_code(tmp_path):
    proc = _start_as_a_shell_would(["-c", WAITS_IN_RAY_GET])
    try:
        assert proc.stdout.readline().strip() == "waiting", proc.communicate()
        time.sleep(1.0)  # well inside ray.get
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert "stopped by SIGTERM" in err and TRACEBACK not in err
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


# --- every command, with bad arguments --------------------------------------------------------------------

# Arguments that are missing, of the wrong type, empty or out of range; none may start Ray or load a model.
BAD_ARGUMENTS: dict[str, list[list[str]]] = {
    "shard": [
        ["{tmp}/nope", "--out", "{tmp}/o"],
        ["{tmp}", "--out", "{file}"],
        ["{tmp}", "--out", "{tmp}/o", "--resize", "-5"],
        ["{tmp}", "--out", "{tmp}/o", "--shard-size", "zero"],
        ["{tmp}", "--out", "{tmp}/o", "--format", "png"],
        ["{tmp}"],
    ],
    "query": [["{tmp}/nope", "SELECT 1"], ["{root}", ""], ["{root}", "SELECT nope FROM nowhere"], [""], []],
    "caption": [
        ["{tmp}/nope", "--model", "m"],
        ["{root}", "--model", "m", "--device", "tpu"],
        ["{root}", "--model", "m", "--name", ".."],
        ["{root}", "--model", "m", "--name", ""],
        ["{root}", "--model", ""],
        ["{root}", "--model", "m", "--batch-size", "0"],
        ["{root}", "--model", "m", "--temperature", "hot"],
        ["{root}", "--model", "m", "--sample", "2.5"],
        ["{root}", "--model", "m", "--sample", "0"],
        ["{root}", "--model", "m", "--max-image-pixels", "10"],
        ["", "--model", "m"],
    ],
    "compare": [
        ["{tmp}/nope"],
        ["{root}"],
        ["{root}", "--field", "nobody"],
        ["{root}", "--format", "csv"],
        [""],
    ],
    "score": [["{tmp}/nope"], ["{root}", "--spacy-model", "nosuch"], ["{root}", "--min-count", "-1"], [""]],
    "ground": [
        ["{tmp}/nope", "--clip-model", "ViT-B-32"],
        ["{root}", "--clip-model", "ViT-Nope"],
        ["{root}", "--clip-model", "local-dir:{tmp}/nope"],
        ["{root}", "--clip-model", "local-dir:{file}"],
        ["{root}", "--clip-model", "ViT-B-32", "--field", ".."],
        ["{root}", "--clip-model", "ViT-B-32", "--dup-threshold", "1.5"],
        ["{root}", "--clip-model", "ViT-B-32", "--noun-prompt", "a photo"],
        ["{root}", "--clip-model", "ViT-B-32", "--device", "tpu"],
        ["{root}", "--clip-model", "ViT-B-32", "--batch-size", "0"],
        ["{root}"],
        ["", "--clip-model", "ViT-B-32"],
    ],
    "density": [
        ["{tmp}/nope.csv", "--column", "c"],
        ["{file}", "--column", "c"],
        ["{csv}", "--column", "nope"],
        ["{csv}", "--column", "c", "--spacy-model", "nosuch"],
        ["", "--column", "c"],
        ["{csv}", "--column", "c", "--sample", "0"],
        ["{csv}", "--column", "c", "--sample", "many"],
        ["{csv}", "--column", "c", "--workers", "0"],
        ["{csv}", "--column", "c", "--batch-rows", "-1"],
        ["{tmp}/nope/*.parquet", "--column", "c"],
    ],
    "stats": [["{tmp}/nope"], ["{file}"], [""]],
    "verify": [["{tmp}/nope"], ["{file}"], [""]],
    "prune": [["{tmp}/nope"], ["{file}"]],
    "report": [["{tmp}/nope"], ["{root}"], ["{root}", "--html", "{tmp}"], ["{root}", "--gallery", "many"]],
    "curate": [
        ["{tmp}/nope", "--field", "alt_text", "--out", "{tmp}/o"],
        ["{root}", "--field", "alt_text", "--out", "{tmp}/o", "--config", "{tmp}/nope.yaml"],
        ["{root}", "--field", "alt_text", "--out", "{tmp}/o", "--config", "{tagged}"],
        ["{root}", "--field", "alt_text", "--out", "{tmp}/o", "--config", "{deep}"],
        ["{root}", "--field", "alt_text", "--out", "{tmp}/o", "--config", "{binary}"],
        ["{root}", "--field", "alt_text", "--out", "{tmp}/o", "--min-nouns", "-1"],
        ["{root}", "--field", "", "--out", "{tmp}/o"],
        ["{root}", "--field", "alt_text", "--out", "{file}"],
        ["{root}", "--out", "{tmp}/o"],
        ["{root}", "--fields", "alt_text,alt_text", "--out", "{tmp}/o"],
        ["{root}", "--fields", "alt_text,nope", "--out", "{tmp}/o"],
    ],
    "merge": [
        ["{tmp}/nope", "--fields", "alt_text,cheap", "--name", "best"],
        ["{root}", "--fields", "alt_text,nope", "--name", "best"],
        ["{root}", "--fields", "alt_text", "--name", "best"],
        ["{root}", "--fields", "alt_text,alt_text", "--name", "best"],
        ["{root}", "--fields", "alt_text,cheap", "--name", "alt_text"],
        ["{root}", "--fields", "alt_text,cheap", "--name", "best", "--by", "length"],
        ["{file}", "--fields", "alt_text,cheap", "--name", "best"],
    ],
    "features": [
        ["{tmp}/nope", "--out", "{tmp}/f", "--vae", "v", "--text-encoder", "t"],
        ["{root}", "--out", "{tmp}/f", "--vae", "{file}", "--text-encoder", "t"],
        ["{root}", "--out", "{tmp}/f", "--vae", "v", "--text-encoder", "t", "--device", "tpu"],
        ["{root}", "--out", "{tmp}/f", "--vae", "v", "--text-encoder", "t", "--resolution", "7"],
        ["{root}", "--out", "{file}", "--vae", "v", "--text-encoder", "t"],
        ["{root}", "--out", "{tmp}/f", "--vae", "", "--text-encoder", "t"],
    ],
    "train": [["{tmp}/nope.yaml"], ["{tmp}"], ["{binary}"], ["{trainyaml}", "no_equals_sign"], ["{trainyaml}", "lr=x"]],
    "export": [["{tmp}/nope", "--out", "{tmp}/e"], ["{root}", "--out", "{tmp}/e"], ["{root}", "--out", "{file}"]],
    "eval": [
        ["{tmp}/nope", "--prompts", "{file}"],
        ["{root}", "--prompts", "{file}"],
        ["{root}", "--prompts", "{tmp}/nope.txt"],
        ["{root}", "--prompts", "{empty}"],
        ["{root}", "--prompts", "{file}", "--images", "{file}"],
        ["{root}", "--prompts", "{file}", "--steps", "many"],
    ],
    "run": [["{tmp}/nope.yaml"], ["{tagged}"], ["{deep}"], ["{binary}"], ["{file}"], ["{badname}"], [""]],
    "submit": [["{tmp}/nope.yaml"], ["{tagged}"], ["{goodspec}", "--address", DEAD_HEAD]],
    "jobs": [
        ["status"],
        ["status", ""],
        ["explode"],
        ["list", "--address", DEAD_HEAD],
        ["logs", "raysubmit_1", "--address", DEAD_HEAD],
    ],
    "models": [[], ["make-tiny"], ["make-tiny", "{file}"], ["make-tiny", ""]],
    "demo": [[], ["--out", "{file}"], ["--out", ""]],
}


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "root").mkdir()
    files = {
        "file": "a photo of a cat\n",
        "csv": "c\na red car\n",
        "empty": "\n",
        "tagged": TAGGED,
        "deep": DEEP,
        "badname": "name: ..\nroot: r\n",
        "goodspec": "name: good\nroot: r\n",
        "trainyaml": (REPO / "trainer/configs/tiny.yaml").read_text(),
    }
    paths = {"tmp": tmp, "root": tmp / "root"}
    for name, text in files.items():
        paths[name] = tmp / f"{name}.{'csv' if name == 'csv' else 'yaml'}"
        paths[name].write_text(text)
    paths["binary"] = tmp / "binary.yaml"
    paths["binary"].write_bytes(b"\xff\xfe\x00bad")
    return paths


def test_every_command_has_bad_arguments():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(BAD_ARGUMENTS)


@pytest.mark.parametrize("command", sorted(BAD_ARGUMENTS))
def test_bad_arguments_never_show_a_traceback(command, bad_inputs, capsys, monkeypatch):
    monkeypatch.delenv("DENSECURATE_DEBUG", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(bad_inputs["tmp"])
    for args in BAD_ARGUMENTS[command]:
        argv = [command, *(part.format(**bad_inputs) for part in args)]
        code, err = _run(argv, capsys)
        assert code in (1, 2), (argv, code, err)
        assert TRACEBACK not in err, (argv, err)
        assert err.strip(), argv


# --- models that do not fit where they are given ----------------------------------------------------------

TINY_TRAIN_YAML = REPO / "trainer" / "configs" / "tiny.yaml"


def _train_argv(tmp_path: Path, pipeline: Path, *overrides: str) -> list[str]:
    """``densecurate train`` of the tiny config; its checks run before the (absent) features are read."""
    base = [f"run_dir={tmp_path / 'run'}", f"pipeline={pipeline}", f"data.features={tmp_path / 'features'}"]
    return ["train", str(TINY_TRAIN_YAML), *base, "sample_every=0", *overrides]


def test_a_pretrained_transformer_for_another_text_encoder_is_one_sentence(
    tiny_dit_dir, tiny_pixart_dir, tmp_path, capsys
):
    from trainer.convert_dit import convert_dit

    converted = convert_dit(str(tiny_dit_dir), tmp_path / "pixart4096")  # --caption-channels' default, 4096
    code, err = _run(_train_argv(tmp_path, tiny_pixart_dir, f"model.pretrained={converted}"), capsys)
    assert code == 2
    line = _one_sentence(err)
    assert f"model.pretrained {converted} takes captions of 4096 channels (caption_channels)" in line
    assert f"the text encoder of pipeline {tiny_pixart_dir} has 32" in line and "--caption-channels 32" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "fixture, names",
    [("tiny_llava_dir", "LlavaForConditionalGeneration"), ("tiny_dit_dir", "DiTTransformer2DModel")],
    ids=["llava", "dit"],
)
def test_a_pretrained_model_that_is_no_pixart_transformer_is_one_sentence(
    request, tiny_pixart_dir, tmp_path, capsys, fixture, names
):
    folder = request.getfixturevalue(fixture)
    code, err = _run(_train_argv(tmp_path, tiny_pixart_dir, f"model.pretrained={folder}"), capsys)
    assert code == 2
    line = _one_sentence(err)
    assert f"model.pretrained {folder} is not a PixArt transformer (its config names {names})" in line
    assert "densecurate models convert-dit" in line


def test_caption_channels_other_than_the_text_encoders_are_one_sentence(tiny_pixart_dir, tmp_path, capsys):
    code, err = _run(_train_argv(tmp_path, tiny_pixart_dir, "model.caption_channels=64"), capsys)
    assert code == 2
    line = _one_sentence(err)
    assert "model.caption_channels is 64" in line and "set model.caption_channels to 32" in line


def test_convert_dit_of_a_cut_weights_file_is_one_sentence(tiny_dit_dir, tmp_path, capsys):
    source = tmp_path / "dit"
    source.mkdir()
    (source / "config.json").write_bytes((tiny_dit_dir / "config.json").read_bytes())
    weights = (tiny_dit_dir / "diffusion_pytorch_model.safetensors").read_bytes()
    (source / "diffusion_pytorch_model.safetensors").write_bytes(weights[: len(weights) // 2])
    out = tmp_path / "out"
    code, err = _run(["models", "convert-dit", str(source), "--out", str(out), "--caption-channels", "32"], capsys)
    assert code == 2
    line = _one_sentence(err)
    assert f"cannot read the weights of DiT {source}" in line
    assert f"{source / 'diffusion_pytorch_model.safetensors'} is damaged or cut short" in line
    assert not out.exists()


@pytest.mark.parametrize(
    "fixture, what",
    [
        ("tiny_pixart_dir", "a diffusers pipeline (PixArtAlphaPipeline)"),
        ("tiny_clip_dir", "an open_clip (CLIP) model"),
        ("tiny_dit_dir", "a diffusers model (DiTTransformer2DModel)"),
    ],
    ids=["pixart", "clip", "dit"],
)
def test_caption_with_a_model_that_is_no_captioner_is_one_sentence(request, tmp_path, capsys, fixture, what):
    folder = request.getfixturevalue(fixture)
    code, err = _run(["caption", str(tmp_path), "--model", str(folder)], capsys)
    assert code == 2
    line = _one_sentence(err)
    assert f"--model {folder} is {what}, not a captioner model densecurate runs" in line
    assert "(LLaVA, Qwen2-VL, SmolVLM / Idefics3)" in line


# --- the vLLM environment ---------------------------------------------------------------------------------


def _script(path: Path, body: str) -> str:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_a_vllm_interpreter_that_fails_is_refused_before_any_actor(tiny_llava_dir, tmp_path, capsys):
    pythons = {"/bin/false": "(exit status 1, no message)"}
    if subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True).returncode != 0:
        pythons[sys.executable] = "ModuleNotFoundError: No module named 'vllm'"
    for python, said in pythons.items():
        started = time.monotonic()
        argv = ["caption", str(tmp_path), "--model", str(tiny_llava_dir), "--engine", "vllm", "--vllm-python", python]
        code, err = _run(argv, capsys)
        assert code == 2 and time.monotonic() - started < 30
        line = _one_sentence(err)
        assert f"the vLLM environment {python} failed `import vllm, ray, pipeline.stages.caption`" in line
        assert said in line and "make setup-vllm" in line
    assert not (tmp_path / "captions").exists()


def test_a_vllm_interpreter_of_another_ray_or_that_hangs_is_one_sentence(tmp_path):
    from importlib.metadata import version

    from captioner.errors import VllmEnvironmentError
    from captioner.vllm_env import check_vllm_python

    other_ray = _script(tmp_path / "other_ray", "echo 0.0.1")
    with pytest.raises(VllmEnvironmentError) as info:
        check_vllm_python(other_ray)
    assert f"has Ray 0.0.1 but this process has Ray {version('ray')}" in str(info.value)
    assert f"ray[default]=={version('ray')}" in str(info.value)
    hangs = _script(tmp_path / "hangs", "exec sleep 30")
    started = time.monotonic()
    with pytest.raises(EnvironmentFailure, match=r"did not import vllm, ray, pipeline\.stages\.caption within 1 s"):
        check_vllm_python(hangs, timeout_s=1)
    assert time.monotonic() - started < 10
    assert explain_error(info.value)[0] == 2


# --- outputs that cannot be made, and run_dirs that are another stage's ------------------------------------

UNMAKEABLE = "/proc/densecurate-no-such/out"  # a virtual file system: no folder can be made there


@pytest.mark.parametrize("command", ["train", "convert-dit", "export", "eval"])
def test_an_output_folder_that_cannot_be_made_is_one_sentence(
    command, tiny_pixart_dir, tiny_dit_dir, tiny_clip_dir, tmp_path, capsys, monkeypatch
):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    run = tmp_path / "run"
    if command == "export":  # a run with a config and a checkpoint (its loading stubbed)
        run.mkdir()
        (run / "config.yaml").write_text(f"run_dir: {run}\npipeline: {tiny_pixart_dir}\ndata: {{features: f}}\n")
        stub = SimpleNamespace(transformer=None, transformer_ema=None)
        monkeypatch.setattr("trainer.export.load_newest_checkpoint", lambda *a, **k: stub)
    argv = {
        "train": _train_argv(tmp_path, tiny_pixart_dir, f"run_dir={UNMAKEABLE}"),
        "convert-dit": ["models", "convert-dit", str(tiny_dit_dir), "--out", UNMAKEABLE, "--caption-channels", "32"],
        "export": ["export", str(run), "--out", UNMAKEABLE],
        "eval": ["eval", str(tiny_pixart_dir), "--prompts", str(prompts), "--clip-model", f"local-dir:{tiny_clip_dir}"],
    }[command]
    if command == "eval":
        argv += ["--images", UNMAKEABLE]
    code, err = _run(argv, capsys)
    assert code == 2
    assert f"cannot make the output folder {UNMAKEABLE}" in _one_sentence(err)


def test_a_sample_grid_that_cannot_be_made_is_one_sentence(tmp_path):
    from schemas.errors import OutputPathError
    from trainer.sampling import save_sample_grid

    with pytest.raises(OutputPathError, match="cannot make the output folder /proc/densecurate-no-such"):
        save_sample_grid(None, None, Path(UNMAKEABLE) / "step-00000001.png")


@pytest.mark.parametrize("kind", ["dataset root", "curated shards"])
def test_train_refuses_a_run_dir_of_another_stages_output(kind, tiny_pixart_dir, tmp_path, capsys):
    run = tmp_path / "run"
    if kind == "dataset root":
        (run / "shards").mkdir(parents=True)
        expected = f"run_dir {run} is a dataset root; choose a folder of the training run's own"
    else:
        run.mkdir()
        (run / "_plan.json").write_text('{"stage": "curate", "shards": [0]}')
        expected = f"run_dir {run} holds the output of the curate stage (its _plan.json says so)"
    code, err = _run(_train_argv(tmp_path, tiny_pixart_dir), capsys)
    assert code == 2 and expected in _one_sentence(err)
    assert not (run / "config.yaml").exists()
