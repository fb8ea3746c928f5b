"""Training the tiny PixArt-α: config errors, loss falls, exact resume, Ray Train DDP, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from densecurate.cli import main
from pipeline.sample_data import write_sample_folder
from pipeline.stages.features import run_features_stage
from pipeline.stages.shard import run_shard_stage
from schemas.errors import ConfigError, OutputConflictError
from schemas.features_config import FeaturesConfig
from schemas.shard_config import ShardConfig
from schemas.train_config import load_train_config
from trainer.loop import train

TINY_YAML = Path(__file__).resolve().parents[1] / "trainer" / "configs" / "tiny.yaml"
ALIGNMENT_YAML = TINY_YAML.with_name("alignment_256.yaml")


@pytest.fixture(scope="module")
def features_dir(ray_local, tiny_pixart_dir, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("train")
    root = base / "root"
    run_shard_stage([write_sample_folder(base / "photos", with_bad_files=False)], root, ShardConfig(shard_size=5))
    config = FeaturesConfig(vae=str(tiny_pixart_dir), text_encoder=str(tiny_pixart_dir), resolution=64)
    run_features_stage(root / "shards", base / "features", config)
    return base / "features"


@pytest.fixture(scope="module")
def shards_dir(features_dir) -> Path:
    """The shards the features were made from (same layout as curated shards)."""
    return features_dir.parent / "root" / "shards"


def tiny_config(run_dir: Path, features: Path, pipeline: Path, *overrides: str):
    base = [f"run_dir={run_dir}", f"pipeline={pipeline}", f"data.features={features}", "sample_every=0"]
    return load_train_config(TINY_YAML.read_text(), [*base, *overrides], source="tiny.yaml")


def test_shipped_configs_validate():
    recipe = load_train_config(ALIGNMENT_YAML.read_text(), [], source="alignment_256.yaml")
    assert (recipe.optim.lr, recipe.optim.weight_decay, recipe.optim.eps) == (2e-5, 0.03, 1e-10)
    assert (recipe.optim.warmup_steps, recipe.optim.grad_clip, recipe.optim.ema_decay) == (1000, 0.01, 0.9999)
    assert (recipe.caption_dropout, recipe.data.max_tokens, recipe.resolution, recipe.steps) == (0.1, 120, 256, 150_000)
    assert recipe.diffusion.loss == "hybrid" and recipe.model.preset == "xl-2"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=-1", "tiny.yaml: optim.lr: Input should be greater than 0"),
        ("diffusion.loss=l1", "tiny.yaml: diffusion.loss: Input should be 'hybrid' or 'mse'"),
        ("data.batchsize=3", "tiny.yaml: data.batchsize: Extra inputs are not permitted"),
        ("resolution=100", "tiny.yaml: resolution: Input should be a multiple of 8"),
    ],
)
def test_bad_config_names_the_field(override, message):
    with pytest.raises(ConfigError) as info:
        load_train_config(TINY_YAML.read_text(), [override], source="tiny.yaml")
    assert str(info.value).startswith(message)


def test_bad_config_on_the_command_line(capsys):
    assert main(["train", str(TINY_YAML), "model.preset=xl-2"]) == 2
    assert "preset xl-2 fixes" in capsys.readouterr().err


def test_loss_falls_when_overfitting(features_dir, tiny_pixart_dir, tmp_path):
    config = tiny_config(
        tmp_path / "run",
        features_dir,
        tiny_pixart_dir,
        "steps=120",
        "caption_dropout=0",
        "diffusion.loss=mse",
        "checkpoint_every=1000",
        "log_every=1000",
    )
    losses = train(config).losses
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.7 * first, (first, last)


def test_resume_equals_an_uninterrupted_run(features_dir, tiny_pixart_dir, tmp_path):
    whole = train(tiny_config(tmp_path / "whole", features_dir, tiny_pixart_dir, "steps=6", "checkpoint_every=3"))
    tiny_config_half = tiny_config(tmp_path / "split", features_dir, tiny_pixart_dir, "steps=3", "checkpoint_every=3")
    train(tiny_config_half)
    resumed = train(
        tiny_config(tmp_path / "split", features_dir, tiny_pixart_dir, "steps=6", "checkpoint_every=3"), resume=True
    )
    assert resumed.step == 6 and len(resumed.losses) == 3
    assert resumed.losses == pytest.approx(whole.losses[3:], rel=1e-5)
    for a, b in zip(whole.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]


def test_online_encoding_matches_precomputed_features(features_dir, shards_dir, tiny_pixart_dir, tmp_path):
    common = ("steps=3", "caption_dropout=0", "checkpoint_every=1000")
    pre = train(tiny_config(tmp_path / "pre", features_dir, tiny_pixart_dir, *common))
    online = train(
        tiny_config(
            tmp_path / "online",
            features_dir,
            tiny_pixart_dir,
            *common,
            "data.source=curated",
            f"data.curated={shards_dir}",
        )
    )
    # Same samples, same draws; only the fp16 rounding of stored features differs.
    assert online.losses == pytest.approx(pre.losses, rel=2e-2)


def test_data_source_needs_its_folder():
    with pytest.raises(ConfigError, match=r"set data\.curated to its folder"):
        load_train_config(TINY_YAML.read_text(), ["data.source=curated"], source="tiny.yaml")


@pytest.mark.slow
def test_two_ray_train_workers_keep_identical_weights(features_dir, tiny_pixart_dir, tmp_path):
    from trainer.launch import launch_training

    config = tiny_config(tmp_path / "ddp", features_dir, tiny_pixart_dir, "steps=3", "workers=2", "use_gpu=false")
    result = launch_training(config)
    assert result.step == 3
    sums = [json.loads((tmp_path / "ddp" / "workers" / f"rank-{r}.json").read_text()) for r in range(2)]
    assert sums[0]["weights_checksum"] == pytest.approx(sums[1]["weights_checksum"], rel=1e-9)
    assert (tmp_path / "ddp" / "checkpoints" / "step-00000003").is_dir()


def test_export_loads_in_pixart_pipeline_and_generates_as_its_output_says(
    features_dir, tiny_pixart_dir, tmp_path, capsys
):
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    run_dir = tmp_path / "run"
    train(tiny_config(run_dir, features_dir, tiny_pixart_dir, "steps=2", "checkpoint_every=2"))
    capsys.readouterr()
    assert main(["export", str(run_dir), "--out", str(tmp_path / "export"), "--ema"]) == 0
    out = capsys.readouterr().out
    assert "resolution bins only for 256, 512 and 1024 px" in out
    assert "64 px one with use_resolution_binning=False: pipe(prompt, use_resolution_binning=False)" in out
    pipe = PixArtAlphaPipeline.from_pretrained(tmp_path / "export")
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    with pytest.raises(ValueError, match="Invalid sample size"):  # why the output says how to call it
        pipe("a photo of a cat", num_inference_steps=1)
    torch.manual_seed(0)
    image = pipe("a photo of a cat", use_resolution_binning=False).images[0]  # the call the output gives
    assert image.size == (64, 64)
    assert list((run_dir / "tensorboard").iterdir()), "TensorBoard scalars are written"


def test_export_of_a_binned_size_generates_with_a_default_call(shards_dir, tiny_pixart_dir, tmp_path, capsys):
    from diffusers import PixArtAlphaPipeline

    run_dir = tmp_path / "run"
    online = ("data.source=curated", f"data.curated={shards_dir}", "resolution=256", "steps=1", "checkpoint_every=1")
    train(tiny_config(run_dir, tmp_path / "unused", tiny_pixart_dir, *online))
    capsys.readouterr()
    assert main(["export", str(run_dir), "--out", str(tmp_path / "export")]) == 0
    assert "use_resolution_binning" not in capsys.readouterr().out
    torch.manual_seed(0)
    image = PixArtAlphaPipeline.from_pretrained(tmp_path / "export")("a photo of a cat").images[0]
    assert image.size == (256, 256)


def test_sample_grid_is_saved(features_dir, tiny_pixart_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_config(run_dir, features_dir, tiny_pixart_dir, "steps=2", "sample_every=2", "checkpoint_every=2"))
    from PIL import Image

    grid = Image.open(run_dir / "samples" / "step-00000002.png")
    assert grid.size == (128, 64)  # the two prompts of tiny.yaml, 64 px each


def test_eval_reports_clip_scores(features_dir, tiny_pixart_dir, tmp_path, capsys):
    from trainer.tiny import make_tiny_clip

    run_dir = tmp_path / "run"
    train(tiny_config(run_dir, features_dir, tiny_pixart_dir, "steps=2", "checkpoint_every=2"))
    assert main(["export", str(run_dir), "--out", str(tmp_path / "export")]) == 0
    clip = make_tiny_clip(tmp_path / "clip")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n\na rocket on the launch pad\n")
    argv = ["eval", str(tmp_path / "export"), "--prompts", str(prompts), "--clip-model", f"local-dir:{clip}"]
    capsys.readouterr()
    assert (
        main([*argv, "--resolution", "64", "--steps", "2", "--images", str(tmp_path / "imgs"), "--format", "json"]) == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert [p["prompt"] for p in report["prompts"]] == ["a photo of a cat", "a rocket on the launch pad"]
    assert all(0 <= p["clip_score"] <= 100 for p in report["prompts"])
    assert report["clip_score"] == pytest.approx(sum(p["clip_score"] for p in report["prompts"]) / 2)
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == ["0000.png", "0001.png"]


def test_latest_checkpoint_ignores_unfinished_folders(tmp_path):
    from trainer.checkpoint import latest_checkpoint

    done = tmp_path / "checkpoints" / "step-00000004"
    done.mkdir(parents=True)
    (done / "state.json").write_text('{"step": 4}')
    (tmp_path / "checkpoints" / "step-00000008.tmp-1234").mkdir()  # killed while saving
    (tmp_path / "checkpoints" / "step-00000009").mkdir()  # no state.json: incomplete
    assert latest_checkpoint(tmp_path) == done


# One run per run_dir: no mixing of an old run's checkpoints with a new one, no silent config change on resume.


def _steps(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def _one_sentence(message: str) -> None:
    assert "\n" not in message and message.count(": ") <= 2 and not message.rstrip(".").count(". ")


def test_second_train_without_resume_refuses_and_keeps_the_first_run(features_dir, tiny_pixart_dir, tmp_path):
    from trainer.launch import launch_training

    run_dir = tmp_path / "run"
    launch_training(tiny_config(run_dir, features_dir, tiny_pixart_dir, "steps=4", "checkpoint_every=2"))
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and "tensorboard" not in p.parts}
    with pytest.raises(OutputConflictError) as info:
        launch_training(tiny_config(run_dir, features_dir, tiny_pixart_dir, "steps=3", "checkpoint_every=1"))
    message = str(info.value)
    assert str(run_dir) in message and "step 4" in message and "--resume" in message and "--overwrite" in message
    _one_sentence(message)
    assert _steps(run_dir) == ["step-00000002", "step-00000004"]
    assert {p: p.read_bytes() for p in before} == before, "nothing of the first run was touched"


def test_overwrite_leaves_only_the_new_run(features_dir, tiny_pixart_dir, tmp_path):
    from trainer.launch import launch_training

    run_dir = tmp_path / "run"
    launch_training(tiny_config(run_dir, features_dir, tiny_pixart_dir, "steps=4", "checkpoint_every=2"))
    (run_dir / "samples").mkdir()
    (run_dir / "samples" / "step-00000004.png").write_bytes(b"old grid")
    (run_dir / "config_changes.jsonl").write_text("{}\n")
    (run_dir / "notes.txt").write_text("not written by training")
    old_events = set((run_dir / "tensorboard").iterdir())
    config = tiny_config(run_dir, features_dir, tiny_pixart_dir, "steps=2", "checkpoint_every=1", "optim.lr=2e-3")
    assert launch_training(config, overwrite=True).step == 2
    assert _steps(run_dir) == ["step-00000001", "step-00000002"]
    assert not (run_dir / "samples").exists() and not (run_dir / "config_changes.jsonl").exists()
    assert not old_events & set((run_dir / "tensorboard").iterdir()), "the old run's TensorBoard logs are gone"
    assert (run_dir / "notes.txt").read_text() == "not written by training"
    saved = load_train_config((run_dir / "config.yaml").read_text(), [])
    assert (saved.steps, saved.optim.lr) == (2, 2e-3)


def test_resume_with_a_changed_config_refuses_naming_the_field(features_dir, tiny_pixart_dir, tmp_path):
    from trainer.launch import launch_training

    run_dir = tmp_path / "run"
    launch_training(tiny_config(run_dir, features_dir, tiny_pixart_dir, "steps=2", "checkpoint_every=2"))
    changed = tiny_config(run_dir, features_dir, tiny_pixart_dir, "steps=4", "checkpoint_every=2", "optim.lr=2e-3")
    with pytest.raises(OutputConflictError) as info:
        launch_training(changed, resume=True)
    message = str(info.value)
    assert "optim.lr (0.001 -> 0.002)" in message and "--allow-config-change" in message
    assert "steps (" not in message, "a longer run is no config change"
    _one_sentence(message)
    assert _steps(run_dir) == ["step-00000002"] and not (run_dir / "config_changes.jsonl").exists()

    result = launch_training(changed, resume=True, allow_config_change=True)
    assert result.step == 4 and _steps(run_dir) == ["step-00000002", "step-00000004"]
    records = [json.loads(line) for line in (run_dir / "config_changes.jsonl").read_text().splitlines()]
    assert [(r["step"], r["field"], r["old"], r["new"]) for r in records] == [
        (2, "optim.lr", 1e-3, 2e-3),
        (2, "steps", 2, 4),
    ]
    assert all(r["time"] for r in records)
    assert load_train_config((run_dir / "config.yaml").read_text(), []).optim.lr == 2e-3  # what export uses


def test_resume_with_more_steps_and_other_logging_needs_no_flag(features_dir, tiny_pixart_dir, tmp_path):
    from trainer.launch import launch_training

    run_dir = tmp_path / "run"
    launch_training(tiny_config(run_dir, features_dir, tiny_pixart_dir, "steps=2", "checkpoint_every=2"))
    longer = tiny_config(run_dir, features_dir, tiny_pixart_dir, "steps=3", "checkpoint_every=3", "log_every=1")
    assert launch_training(longer, resume=True).step == 3
    assert _steps(run_dir) == ["step-00000002", "step-00000003"]
    assert load_train_config((run_dir / "config.yaml").read_text(), []).steps == 3
    fields = [json.loads(line)["field"] for line in (run_dir / "config_changes.jsonl").read_text().splitlines()]
    assert fields == ["checkpoint_every", "log_every", "steps"]


def test_ray_train_run_dir_is_checked_in_the_driver(monkeypatch, features_dir, tiny_pixart_dir, tmp_path):
    import trainer.launch

    run_dir = tmp_path / "run"
    trainer.launch.launch_training(tiny_config(run_dir, features_dir, tiny_pixart_dir, "steps=2"))
    started = []

    def fake_ray_train(config, *, resume):
        started.append((resume, load_train_config((run_dir / "config.yaml").read_text(), []).optim.lr))
        return trainer.launch.TrainResult(step=config.steps, run_dir=run_dir)

    monkeypatch.setattr(trainer.launch, "_ray_train", fake_ray_train)
    ddp = ("steps=4", "workers=2", "use_gpu=false")
    with pytest.raises(OutputConflictError, match="--overwrite"):
        trainer.launch.launch_training(tiny_config(run_dir, features_dir, tiny_pixart_dir, *ddp))
    with pytest.raises(OutputConflictError, match="workers"):
        trainer.launch.launch_training(tiny_config(run_dir, features_dir, tiny_pixart_dir, *ddp), resume=True)
    assert started == [], "no worker starts when run_dir is refused"
    changed = tiny_config(run_dir, features_dir, tiny_pixart_dir, *ddp, "optim.lr=2e-3")
    trainer.launch.launch_training(changed, resume=True, allow_config_change=True)
    assert started == [(True, 2e-3)], "the driver recorded the change before the workers started"


def test_train_refusal_on_the_command_line(features_dir, tiny_pixart_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = [
        "train",
        str(TINY_YAML),
        f"run_dir={run_dir}",
        f"pipeline={tiny_pixart_dir}",
        f"data.features={features_dir}",
        "sample_every=0",
        "steps=2",
        "checkpoint_every=2",
    ]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: run_dir ")
    assert "step 2" in err and "--resume" in err and "--overwrite" in err
    assert main([*argv, "--resume", "--overwrite"]) == 2
    assert main([*argv, "optim.lr=2e-3", "--resume"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    assert _steps(run_dir) == ["step-00000002"]


def test_train_step_of_a_spec_takes_overwrite_only_without_resume():
    from schemas.pipeline_spec import TrainStep

    with pytest.raises(ValueError, match="set resume: false"):
        TrainStep(config="train.yaml", overwrite=True)
    step = TrainStep(config="train.yaml", overwrite=True, resume=False, allow_config_change=True)
    assert (step.overwrite, step.allow_config_change) == (True, True)


# Training refuses features made with other settings than its config.


def test_features_of_another_resolution_are_refused_naming_both(features_dir, tiny_pixart_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["train", str(TINY_YAML), f"run_dir={run_dir}", f"pipeline={tiny_pixart_dir}"]
    argv += [f"data.features={features_dir}", "sample_every=0", "steps=1", "checkpoint_every=1"]
    assert main([*argv, "resolution=256"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: the feature shard {features_dir / '00000.tar'} was made with resolution 64 but the training "
        "config has resolution 256; make the features again with --resolution 256 (densecurate features, into "
        "another folder) or change resolution in the training config"
    )
    _one_sentence(err)
    assert not run_dir.exists(), "refused before anything is written"
    assert main(argv) == 0, "features made at the config's resolution train"
    assert _steps(run_dir) == ["step-00000001"]


@pytest.mark.parametrize("setting", ["vae", "max_tokens"])
def test_features_of_another_vae_or_t5_length_are_refused(features_dir, tiny_pixart_dir, tmp_path, setting):
    import shutil

    from trainer.errors import FeatureMismatchError
    from trainer.launch import launch_training

    pipeline, override = tiny_pixart_dir, "data.max_tokens=16"
    if setting == "vae":
        pipeline, override = shutil.copytree(tiny_pixart_dir, tmp_path / "other_pixart"), "steps=1"
    with pytest.raises(FeatureMismatchError) as info:
        launch_training(tiny_config(tmp_path / "run", features_dir, pipeline, override))
    message = str(info.value)
    made, wanted = tiny_pixart_dir.resolve(), pipeline.resolve()
    expected = {
        "vae": f"VAE {made / 'vae'} and text encoder {made / 'text_encoder'} but the training config has VAE "
        f"{wanted / 'vae'} and text encoder {wanted / 'text_encoder'}; make the features again with --vae {pipeline} "
        f"--text-encoder {pipeline} (densecurate features, into another folder) or change pipeline in",
        "max_tokens": "T5 max length 120 but the training config has T5 max length 16; make the features again with "
        "--max-tokens 16 (densecurate features, into another folder) or change data.max_tokens in",
    }
    assert f"was made with {expected[setting]} the training config" in message
    _one_sentence(message)


def test_features_whose_stats_predate_the_record_are_checked_by_their_samples(features_dir, tiny_pixart_dir, tmp_path):
    import shutil

    from trainer.errors import FeatureMismatchError
    from trainer.launch import launch_training

    older = shutil.copytree(features_dir, tmp_path / "features")
    for stats_file in older.glob("*_stats.json"):
        stats = json.loads(stats_file.read_text())
        del stats["features"]
        stats_file.write_text(json.dumps(stats))
    with pytest.raises(
        FeatureMismatchError, match="made with resolution 64 but the training config has resolution 256"
    ):
        launch_training(tiny_config(tmp_path / "run", older, tiny_pixart_dir, "resolution=256"))
