"""The caption stage on a real local Ray with the tiny LLaVA: one row per key, resume, worker loss."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import torch

from captioner.errors import ModelNotAvailableError
from captioner.generation import Captioner, CaptionRequest
from captioner.loading import check_model_available, load_model
from captioner.tiny import CHAT_TEMPLATE
from densecurate.cli import main
from pipeline.sample_data import write_sample_folder
from pipeline.stages.caption import run_caption_stage, vllm_python
from pipeline.stages.shard import run_shard_stage
from pipeline.store.catalog import run_query
from schemas.caption_config import CaptionConfig, GenerationSettings, ModelSettings
from schemas.errors import OutputConflictError
from schemas.shard_config import ShardConfig
from tests import image_factory as mk


def caption_config(model_dir: Path, name: str = "tiny", **generation) -> CaptionConfig:
    settings = {"batch_size": 4, "max_new_tokens": 16, "prompt": "pixart-alt", **generation}
    return CaptionConfig.model_validate({"name": name, "model": {"model": str(model_dir)}, "generation": settings})


def caption_rows(root: Path, name: str) -> list[dict]:
    return [r for p in sorted((root / "captions" / name).glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


@pytest.fixture(scope="module")
def sharded_root(ray_local, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("cap")
    root = base / "root"
    run_shard_stage([write_sample_folder(base / "photos")], root, ShardConfig(shard_size=4))
    return root


def test_every_key_gets_exactly_one_row_and_rerun_skips(sharded_root, tiny_llava_dir):
    summary = run_caption_stage(sharded_root, caption_config(tiny_llava_dir))
    rows = caption_rows(sharded_root, "tiny")
    ok_keys = [k for (k,) in run_query(sharded_root, "SELECT key FROM samples WHERE status = 'ok' ORDER BY key")[1]]
    assert sorted(r["key"] for r in rows) == ok_keys
    assert summary.totals["count"] == summary.totals["ok"] == len(ok_keys) == 10
    assert all(r["status"] == "ok" and r["model"] == str(tiny_llava_dir) and r["revision"] == "local" for r in rows)
    by_key = {r["key"]: r for r in rows}
    assert by_key["folder-coffee"]["prompt"].startswith('Given the caption of this image "a cup of coffee')
    assert by_key["folder-coffee"]["prompt_id"] == "pixart-alt"
    again = run_caption_stage(sharded_root, caption_config(tiny_llava_dir))
    assert again.shards_reused == again.shards and again.captions_this_run == 0


def test_captions_view_joins_samples_on_key(sharded_root, tiny_llava_dir):
    run_caption_stage(sharded_root, caption_config(tiny_llava_dir))
    sql = (
        "SELECT c.captioner, count(*) FROM samples s JOIN captions c USING (key) "
        "WHERE s.status = 'ok' GROUP BY ALL ORDER BY 1"
    )
    assert run_query(sharded_root, sql)[1] == [("tiny", 10)]


@pytest.mark.slow
def test_changed_settings_recaption_with_replace(sharded_root, tiny_llava_dir):
    first = run_caption_stage(sharded_root, caption_config(tiny_llava_dir, name="redo", max_new_tokens=4))
    assert first.shards_reused == 0
    changed = caption_config(tiny_llava_dir, name="redo", max_new_tokens=6)
    with pytest.raises(OutputConflictError, match="would replace 10 captions"):
        run_caption_stage(sharded_root, changed)
    second = run_caption_stage(sharded_root, changed.model_copy(update={"replace": True}))
    assert second.shards_reused == 0
    assert max(r["num_tokens"] for r in caption_rows(sharded_root, "redo")) <= 6


def _caption_workers() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if "ray::CaptionWorker" in " ".join(p.info["cmdline"] or [])]


def _kill_first_caption_worker(out_dir: Path, record: dict) -> None:
    deadline = time.monotonic() + 60
    seen = None
    while time.monotonic() < deadline and not record.get("killed"):
        if seen is None:
            if _caption_workers():
                seen = time.monotonic()
        elif time.monotonic() - seen >= 2.5:  # the model is loaded and the first shard under way
            for worker in _caption_workers():  # listed again: a process seen before may have ended since
                with contextlib.suppress(psutil.NoSuchProcess):
                    record["outputs_at_kill"] = len(list(out_dir.glob("*.parquet")))
                    worker.kill()
                    record["killed"] = True
                    break
        time.sleep(0.05)


@pytest.mark.slow
def test_killed_worker_shard_is_redone_exactly_once(sharded_root, tiny_llava_dir):
    config = caption_config(tiny_llava_dir, name="killed", batch_size=1, max_new_tokens=96, ignore_eos=True)
    record: dict = {}
    killer = threading.Thread(target=_kill_first_caption_worker, args=(sharded_root / "captions" / "killed", record))
    killer.start()
    summary = run_caption_stage(sharded_root, config)
    killer.join()
    assert record.get("killed") and record["outputs_at_kill"] < summary.shards, "the kill must land mid-run"
    rows = caption_rows(sharded_root, "killed")
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == 10
    assert all(r["num_tokens"] == 96 for r in rows)
    assert not [p for p in (sharded_root / "captions" / "killed").iterdir() if ".tmp-" in p.name]


def test_cli_caption_and_missing_model(sharded_root, tiny_llava_dir, capsys):
    root = str(sharded_root)
    assert main(["caption", root, "--model", str(tiny_llava_dir), "--name", "cli", "--max-new-tokens", "4"]) == 0
    assert "captioned" in capsys.readouterr().out
    assert len(caption_rows(sharded_root, "cli")) == 10
    assert main(["caption", root, "--model", "llava-hf/not-here-hf"]) == 2
    assert "'llava-hf/not-here-hf' is not available" in capsys.readouterr().err


def test_make_tiny_writes_a_loadable_model(tmp_path, capsys):
    assert main(["models", "make-tiny", str(tmp_path)]) == 0
    settings = ModelSettings(model=str(tmp_path / "llava"), device="cpu")
    check_model_available(settings)  # what the caption stage runs before starting any worker
    loaded = load_model(settings)  # the workers' code path, the same as for a hub id
    assert type(loaded.model).__name__ == "LlavaForConditionalGeneration"
    assert (loaded.model_id, loaded.revision, loaded.dtype) == (settings.model, "local", torch.float32)
    assert loaded.processor.chat_template == CHAT_TEMPLATE
    assert loaded.processor.tokenizer.padding_side == "left"
    assert loaded.model.config.image_token_index == loaded.processor.tokenizer.convert_tokens_to_ids("<image>")
    generation = GenerationSettings(prompt="pixart-alt", batch_size=1, max_new_tokens=5, ignore_eos=True)
    request = CaptionRequest("k", mk.jpeg_bytes(mk.photo_image((64, 48))), "a cup of coffee")
    (result,) = Captioner(loaded, generation).caption([request])
    assert (result.status, result.error, result.num_tokens, result.finish_reason) == ("ok", None, 5, "length")
    for folder, architecture in [("qwen2_vl", "Qwen2VL"), ("idefics3", "Idefics3")]:
        other = load_model(ModelSettings(model=str(tmp_path / folder), device="cpu"))
        assert type(other.model).__name__ == f"{architecture}ForConditionalGeneration" and other.revision == "local"
        (result,) = Captioner(other, generation).caption([request])
        assert (result.status, result.num_tokens) == ("ok", 5)
    printed = capsys.readouterr().out.replace("\n", "")
    assert all(str(tmp_path / f) in printed for f in ("llava", "qwen2_vl", "idefics3", "pixart", "clip", "dit"))
    assert '"DiTTransformer2DModel"' in (tmp_path / "dit" / "config.json").read_text()
    with pytest.raises(ModelNotAvailableError, match="is not available here"):
        check_model_available(ModelSettings(model=str(tmp_path / "no-such-model")))


def test_the_vllm_interpreter_defaults_to_the_projects_environment(monkeypatch):
    """The default is found from the module's own path: it must name the folder `make setup-vllm` builds."""
    monkeypatch.delenv("DENSECURATE_VLLM_PYTHON", raising=False)
    config = CaptionConfig.model_validate({"name": "x", "engine": "vllm", "model": {"model": "m"}})
    assert vllm_python(config) == str(Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python")


@pytest.mark.slow
def test_progress_moves_inside_a_shard_with_a_rate_and_an_eta_in_a_log(ray_local, tiny_llava_dir, tmp_path):
    """Captioning 2 shards of 64 photos with its output going to a file (as a job's log does): the plain
    progress lines count captions while the first shard is still being captioned."""
    import os
    import re
    import shutil
    import subprocess
    import sys
    import tempfile

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(128):
        (photos / f"p{i:03d}.jpg").write_bytes(mk.jpeg_bytes(mk.photo_image((96 + i % 32, 80))))
    root = tmp_path / "root"
    run_shard_stage([photos], root, ShardConfig(shard_size=64))
    ray_dir = tempfile.mkdtemp(prefix="dcray")  # Ray's socket paths must stay under 108 bytes
    env = {**os.environ, "DENSECURATE_PROGRESS_EVERY_S": "0.1", "RAY_TMPDIR": ray_dir}
    argv = ["caption", str(root), "--model", str(tiny_llava_dir), "--batch-size", "1", "--max-new-tokens", "32"]
    done = subprocess.run(
        [sys.executable, "-m", "densecurate", *argv], capture_output=True, text=True, env=env, timeout=600
    )
    shutil.rmtree(ray_dir, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    log = done.stdout + done.stderr
    assert "caption: 1 cpu workers starting, each loads its model first" in log
    lines = re.findall(r"caption: (\d+)/2 shards, (\d+)/128 captions, ([\d.]+) captions/s, ETA (\S+)", log)
    assert lines, log[-2000:]
    assert any(shards == "0" and 0 < int(captions) < 64 for shards, captions, _, _ in lines), lines
    assert lines[-1][:2] == ("2", "128")
    assert any(float(rate) > 0 and eta != "-" for _, _, rate, eta in lines)
