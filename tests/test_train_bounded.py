"""Training stays bounded: non-finite data, losses, gradients, weights and settings stop it with one sentence
(after ``--nan-tolerance`` skipped steps); a damaged checkpoint is skipped by ``--resume`` and ``export``.

The features are hand-made (random posteriors and T5 states in feature shards) so that these tests need
neither Ray nor the encoders.
"""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from densecurate.cli import main
from schemas.errors import ConfigError
from schemas.train_config import load_train_config
from trainer.checkpoint import STATE_FILE, load_newest_checkpoint, nonfinite_weights
from trainer.data import FeatureDataset
from trainer.errors import CorruptFeatureError, TrainingDivergedError, UnusableCheckpointError
from trainer.features import FEATURE_EXT, NULL_CAPTION_FILE, Features
from trainer.loop import train

TINY_YAML = Path(__file__).resolve().parents[1] / "trainer" / "configs" / "tiny.yaml"
KEYS = [f"s{i:03d}" for i in range(8)]  # 4 per shard, 2 shards
BAD_KEY = "s005"  # in shard 00001.tar
BATCH = 4


def _features(seed: int, tokens: int) -> Features:
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(4, 8, 8, generator=gen)
    std = 0.05 + 0.1 * torch.rand(4, 8, 8, generator=gen)
    t5 = torch.randn(tokens, 32, generator=gen)
    return Features(vae=torch.cat([mean, std]).half(), t5=t5.half())


def write_features(folder: Path, *, bad: dict[str, tuple[str, float]] | None = None) -> Path:
    """Two feature shards of 4 samples (``KEY.feat.safetensors``) and the null caption; ``bad`` maps a key to
    ``(tensor, value)`` written into one element of that sample's tensor (NaN, inf)."""
    folder.mkdir(parents=True)
    for shard in range(2):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i, key in enumerate(KEYS[shard * 4 : shard * 4 + 4]):
                feats = _features(shard * 4 + i, tokens=3 + i)
                if bad and key in bad:
                    name, value = bad[key]
                    getattr(feats, name).view(-1)[7] = value
                data = feats.to_bytes()
                info = tarfile.TarInfo(f"{key}.{FEATURE_EXT}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    save_file({"t5": torch.randn(1, 32).half()}, str(folder / NULL_CAPTION_FILE))
    return folder


@pytest.fixture(scope="module")
def good_features(tmp_path_factory) -> Path:
    return write_features(tmp_path_factory.mktemp("feats") / "good")


@pytest.fixture(scope="module")
def nan_features(tmp_path_factory) -> Path:
    """One sample's VAE posterior holds a NaN: the corrupt feature file of the bug report."""
    return write_features(tmp_path_factory.mktemp("feats") / "nan", bad={BAD_KEY: ("vae", float("nan"))})


def config_for(run_dir: Path, features: Path, pipeline: Path, *overrides: str):
    base = [
        f"run_dir={run_dir}",
        f"pipeline={pipeline}",
        f"data.features={features}",
        f"data.batch_size={BATCH}",
        "sample_every=0",
        "caption_dropout=0",
    ]
    return load_train_config(TINY_YAML.read_text(), [*base, *overrides], source="tiny.yaml")


def cli_args(run_dir: Path, features: Path, pipeline: Path, *overrides: str) -> list[str]:
    base = [f"run_dir={run_dir}", f"pipeline={pipeline}", f"data.features={features}", f"data.batch_size={BATCH}"]
    return ["train", str(TINY_YAML), *base, "sample_every=0", "caption_dropout=0", *overrides]


def bad_steps(features: Path, steps: int) -> list[int]:
    """The steps (1-based, as logged and checkpointed) whose batch holds BAD_KEY."""
    dataset = FeatureDataset(features, seed=0, max_tokens=120, scaling_factor=0.18, caption_dropout=0)
    return [
        s + 1 for s in range(steps) if any(dataset.ref_at(p).key == BAD_KEY for p in range(s * BATCH, (s + 1) * BATCH))
    ]


def one_sentence(message: str) -> None:
    assert "\n" not in message and message.count(": ") <= 2 and not message.rstrip(".").count(". "), message


def checkpoint_names(run_dir: Path) -> list[str]:
    folder = run_dir / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def assert_checkpoints_finite(run_dir: Path) -> None:
    from diffusers import PixArtTransformer2DModel

    for name in checkpoint_names(run_dir):
        for part in ("transformer", "transformer_ema"):
            model = PixArtTransformer2DModel.from_pretrained(run_dir / "checkpoints" / name / part)
            assert nonfinite_weights(model) == [], (name, part)


@pytest.fixture(scope="module", autouse=True)
def warm_training(good_features, tiny_pixart_dir, tmp_path_factory) -> None:
    """One step of training before the tests: the first run in a process pays the one-time costs (imports and
    their compiled caches, the first forward), which belong to set-up, not to whichever test runs first."""
    train(config_for(tmp_path_factory.mktemp("warm") / "run", good_features, tiny_pixart_dir, "steps=1"))


@pytest.fixture
def no_feature_check(monkeypatch):
    """Let non-finite features through the loader, as before the fix, to reach the loop's own guard."""
    monkeypatch.setattr(Features, "nonfinite", lambda self: [])


# Defect 4: non-finite features, losses, gradients, weights and settings.


def test_feature_dataset_names_the_key_and_shard_of_a_non_finite_file(tmp_path):
    folder = write_features(tmp_path / "inf", bad={"s002": ("t5", float("inf"))})
    dataset = FeatureDataset(folder, seed=0, max_tokens=120, scaling_factor=0.18, caption_dropout=0)
    positions = {dataset.ref_at(p).key: p for p in range(len(KEYS))}
    sample = dataset[positions["s001"]]
    assert (sample["key"], sample["shard"]) == ("s001", "00000.tar")
    with pytest.raises(CorruptFeatureError) as info:
        dataset[positions["s002"]]
    message = str(info.value)
    assert "s002.feat.safetensors" in message and "00000.tar" in message and "t5" in message
    assert "densecurate features" in message
    one_sentence(message)


def test_truncated_feature_file_is_named(tmp_path):
    folder = write_features(tmp_path / "trunc")
    with tarfile.open(folder / "00000.tar") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for member, data in members:
            data = data[:40] if member.name.startswith("s003.") else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    dataset = FeatureDataset(folder, seed=0, max_tokens=120, scaling_factor=0.18, caption_dropout=0)
    position = next(p for p in range(len(KEYS)) if dataset.ref_at(p).key == "s003")
    with pytest.raises(CorruptFeatureError, match=r"s003\.feat\.safetensors in shard .*00000\.tar does not load"):
        dataset[position]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_feature_file_stops_training_naming_it(nan_features, tiny_pixart_dir, tmp_path, num_workers):
    run_dir = tmp_path / "run"
    config = config_for(run_dir, nan_features, tiny_pixart_dir, "steps=6", "checkpoint_every=1")
    config = config.model_copy(update={"data": config.data.model_copy(update={"num_workers": num_workers})})
    with pytest.raises(CorruptFeatureError) as info:
        train(config)
    message = str(info.value)  # from a DataLoader worker too: the message, not the worker's traceback
    assert f"{BAD_KEY}.feat.safetensors" in message and "00001.tar" in message and "vae" in message
    one_sentence(message)
    first_bad = bad_steps(nan_features, 6)[0]
    assert checkpoint_names(run_dir) == [f"step-{s:08d}" for s in range(1, first_bad)]


@pytest.mark.slow
def test_corrupt_feature_file_on_the_command_line_and_export(nan_features, tiny_pixart_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(cli_args(run_dir, nan_features, tiny_pixart_dir, "steps=6", "checkpoint_every=6")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and BAD_KEY in err
    assert main(["export", str(run_dir), "--out", str(tmp_path / "export")]) == 2, "nothing was trained to export"
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_non_finite_loss_stops_at_the_first_such_step(nan_features, tiny_pixart_dir, tmp_path, no_feature_check):
    run_dir = tmp_path / "run"
    first_bad = bad_steps(nan_features, 6)[0]
    with pytest.raises(TrainingDivergedError) as info:
        train(config_for(run_dir, nan_features, tiny_pixart_dir, "steps=6", "checkpoint_every=1"))
    message = str(info.value)
    assert f"stopped at step {first_bad} because the loss is nan on samples {BAD_KEY} (00001.tar)" in message
    assert "--nan-tolerance 0" in message
    one_sentence(message)
    assert checkpoint_names(run_dir) == [f"step-{s:08d}" for s in range(1, first_bad)]
    assert_checkpoints_finite(run_dir)


def test_nan_tolerance_skips_steps_without_updating_then_stops(
    nan_features, tiny_pixart_dir, tmp_path, no_feature_check, capsys
):
    steps = 6  # 24 samples: 3 epochs of the 8, so BAD_KEY's loss is NaN in 3 steps
    bad = bad_steps(nan_features, steps)
    assert len(bad) == 3

    run_dir = tmp_path / "tolerant"
    result = train(config_for(run_dir, nan_features, tiny_pixart_dir, f"steps={steps}", "nan_tolerance=3"))
    assert result.step == steps and result.skipped_steps == bad and result.nonfinite_steps == 3
    assert len(result.losses) == steps - 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert nonfinite_weights(result.model) == []
    loaded = load_newest_checkpoint(run_dir)
    assert loaded.step == steps and loaded.state["nonfinite_steps"] == 3
    assert int(loaded.state["ema_n_averaged"]) == steps - 3, "the EMA skipped those steps"
    assert {int(s["step"]) for s in loaded.state["optimizer"]["state"].values()} == {steps - 3}, "so did AdamW"
    assert_checkpoints_finite(run_dir)
    err = capsys.readouterr().err
    assert f"warning: step {bad[0]} skipped (no update) because the loss is nan on samples {BAD_KEY}" in err

    # One fewer allowed: the third such step stops the run; the count survives a resume.
    run_dir = tmp_path / "strict"
    strict = (f"steps={steps}", "nan_tolerance=2", "checkpoint_every=1")
    with pytest.raises(TrainingDivergedError, match=rf"stopped at step {bad[2]} because .*non-finite step 3 of the"):
        train(config_for(run_dir, nan_features, tiny_pixart_dir, *strict))
    assert checkpoint_names(run_dir)[-1] == f"step-{bad[2] - 1:08d}"
    assert_checkpoints_finite(run_dir)
    with pytest.raises(TrainingDivergedError, match=rf"stopped at step {bad[2]} because"):
        train(config_for(run_dir, nan_features, tiny_pixart_dir, *strict), resume=True)
    resumed = train(config_for(run_dir, nan_features, tiny_pixart_dir, *strict[:2], "nan_tolerance=3"), resume=True)
    assert resumed.step == steps and resumed.nonfinite_steps == 3 and resumed.skipped_steps == [bad[2]]
    assert_checkpoints_finite(run_dir)


def test_nan_tolerance_on_the_command_line(nan_features, tiny_pixart_dir, tmp_path, capsys, no_feature_check):
    argv = cli_args(tmp_path / "run", nan_features, tiny_pixart_dir, "steps=6", "checkpoint_every=6")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: training stopped at step ") and BAD_KEY in err
    assert main([*argv, "--overwrite", "--nan-tolerance", "3"]) == 0
    assert capsys.readouterr().err.count("skipped (no update)") == 3


def test_non_finite_gradients_stop_naming_the_batch(good_features, tiny_pixart_dir, tmp_path, monkeypatch):
    import trainer.loop

    build = trainer.loop.build_transformer

    def exploding(config):
        model = build(config)
        next(model.parameters()).register_hook(lambda grad: grad * float("inf"))
        return model

    monkeypatch.setattr(trainer.loop, "build_transformer", exploding)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingDivergedError) as info:
        train(config_for(run_dir, good_features, tiny_pixart_dir, "steps=3", "checkpoint_every=1"))
    message = str(info.value)
    assert message.startswith("training stopped at step 1 because the gradient norm is ")
    assert "on the batch of samples s" in message and "(0000" in message
    one_sentence(message)
    assert checkpoint_names(run_dir) == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=inf", "tiny.yaml: optim.lr: Input should be a finite number"),
        ("optim.lr=.nan", "tiny.yaml: optim.lr: Input should be a finite number"),
        ("optim.lr=2", "tiny.yaml: optim.lr: Input should be less than or equal to 1"),
        ("optim.lr=0", "tiny.yaml: optim.lr: Input should be greater than 0"),
        ("optim.weight_decay=.inf", "tiny.yaml: optim.weight_decay: Input should be a finite number"),
        ("optim.eps=.nan", "tiny.yaml: optim.eps: Input should be a finite number"),
        ("optim.grad_clip=.inf", "tiny.yaml: optim.grad_clip: Input should be a finite number"),
        ("optim.ema_decay=1", "tiny.yaml: optim.ema_decay: Input should be less than 1"),
        ("optim.ema_decay=.nan", "tiny.yaml: optim.ema_decay: Input should be a finite number"),
        ("caption_dropout=1.5", "tiny.yaml: caption_dropout: Input should be less than or equal to 1"),
        ("caption_dropout=.nan", "tiny.yaml: caption_dropout: Input should be a finite number"),
        ("diffusion.beta_end=1", "tiny.yaml: diffusion.beta_end: Input should be less than 1"),
        ("diffusion.beta_start=.inf", "tiny.yaml: diffusion.beta_start: Input should be a finite number"),
        ("nan_tolerance=-1", "tiny.yaml: nan_tolerance: Input should be greater than or equal to 0"),
    ],
)
def test_non_finite_or_out_of_range_settings_are_refused(override, message):
    with pytest.raises(ConfigError) as info:
        load_train_config(TINY_YAML.read_text(), [override], source="tiny.yaml")
    assert str(info.value).startswith(message)


def test_lr_inf_on_the_command_line_is_refused(good_features, tiny_pixart_dir, tmp_path, capsys):
    assert main(cli_args(tmp_path / "run", good_features, tiny_pixart_dir, "optim.lr=inf")) == 2
    assert "optim.lr: Input should be a finite number" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("checkpoint_every", [1, 5])
def test_diverging_weights_never_reach_a_checkpoint(good_features, tiny_pixart_dir, tmp_path, checkpoint_every):
    """``optim.lr=inf`` got past validation (as it did before): the weights are NaN after step 1."""
    run_dir = tmp_path / "run"
    config = config_for(run_dir, good_features, tiny_pixart_dir, "steps=5", f"checkpoint_every={checkpoint_every}")
    config = config.model_copy(update={"optim": config.optim.model_copy(update={"lr": float("inf")})})
    with pytest.raises(TrainingDivergedError) as info:
        train(config)
    message = str(info.value)
    if checkpoint_every == 1:  # caught before step 1's checkpoint
        assert message.startswith("training stopped at step 1 because its update made the weights NaN or infinite")
    else:  # caught by step 2's loss
        assert message.startswith("training stopped at step 2 because the loss is nan")
        assert "the weights themselves are NaN or infinite" in message
    one_sentence(message)
    assert checkpoint_names(run_dir) == []


# Defect 5: a damaged newest checkpoint.


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def four_steps(good_features, tiny_pixart_dir, tmp_path_factory):
    """A run with checkpoints at steps 2 and 4, and the losses of an uninterrupted 6-step run."""
    base = tmp_path_factory.mktemp("ckpt")
    train(config_for(base / "run", good_features, tiny_pixart_dir, "steps=4", "checkpoint_every=2"))
    whole = train(config_for(base / "whole", good_features, tiny_pixart_dir, "steps=6", "checkpoint_every=2"))
    return base / "run", whole.losses


@pytest.mark.parametrize(
    ("damaged", "reason"),
    [
        ("transformer/diffusion_pytorch_model.safetensors", "transformer does not load"),
        ("transformer_ema/diffusion_pytorch_model.safetensors", "transformer_ema does not load"),
        (STATE_FILE, f"{STATE_FILE} does not load"),
        ("state.json", "state.json does not load"),
    ],
)
def test_resume_falls_back_to_the_newest_checkpoint_that_loads(
    four_steps, good_features, tiny_pixart_dir, tmp_path, capsys, damaged, reason
):
    source, whole_losses = four_steps
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    _truncate(run_dir / "checkpoints" / "step-00000004" / damaged)
    capsys.readouterr()
    resumed = train(config_for(run_dir, good_features, tiny_pixart_dir, "steps=6", "checkpoint_every=2"), resume=True)
    err = capsys.readouterr().err
    newest = run_dir / "checkpoints" / "step-00000004"
    assert f"warning: skipping checkpoint {newest} because {reason}" in err
    assert f"resuming from checkpoint {run_dir / 'checkpoints' / 'step-00000002'} (step 2)" in err
    assert resumed.step == 6 and resumed.losses == pytest.approx(whole_losses[2:], rel=1e-5)
    assert load_newest_checkpoint(run_dir, warn=None).step == 6
    assert read_step_4(run_dir) == 4, "the damaged checkpoint was written again"


def read_step_4(run_dir: Path) -> int:
    from trainer.checkpoint import read_checkpoint

    return read_checkpoint(run_dir / "checkpoints" / "step-00000004").step


def test_resume_refuses_in_one_sentence_when_no_checkpoint_loads(
    four_steps, good_features, tiny_pixart_dir, tmp_path, capsys
):
    source, _ = four_steps
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    _truncate(run_dir / "checkpoints" / "step-00000004" / STATE_FILE)
    _truncate(run_dir / "checkpoints" / "step-00000002" / "transformer" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(UnusableCheckpointError) as info:
        train(config_for(run_dir, good_features, tiny_pixart_dir, "steps=6", "checkpoint_every=2"), resume=True)
    message = str(info.value)
    assert "none of the 2 checkpoints" in message and "step-00000004" in message and "--overwrite" in message
    one_sentence(message)
    capsys.readouterr()
    argv = cli_args(run_dir, good_features, tiny_pixart_dir, "steps=6", "checkpoint_every=2")
    assert main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: none of the 2 checkpoints") and "Traceback" not in "\n".join(err)


def test_export_uses_the_newest_checkpoint_that_loads(four_steps, tmp_path, capsys):
    from diffusers import PixArtTransformer2DModel

    source, _ = four_steps
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    ema_file = "transformer_ema/diffusion_pytorch_model.safetensors"
    _truncate(run_dir / "checkpoints" / "step-00000004" / ema_file)
    capsys.readouterr()
    assert main(["export", str(run_dir), "--out", str(tmp_path / "ema"), "--ema"]) == 0
    err = capsys.readouterr().err
    assert f"skipping checkpoint {run_dir / 'checkpoints' / 'step-00000004'} because transformer_ema" in err
    exported = PixArtTransformer2DModel.from_pretrained(tmp_path / "ema" / "transformer")
    older = PixArtTransformer2DModel.from_pretrained(run_dir / "checkpoints" / "step-00000002" / "transformer_ema")
    for a, b in zip(exported.parameters(), older.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert main(["export", str(run_dir), "--out", str(tmp_path / "plain"), "--no-ema"]) == 0, "the raw weights load"
    assert "skipping" not in capsys.readouterr().err

    _truncate(run_dir / "checkpoints" / "step-00000002" / ema_file)
    assert main(["export", str(run_dir), "--out", str(tmp_path / "none")]) == 2  # the EMA weights, by default
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: none of the 2 checkpoints") and not (tmp_path / "none").exists()
    one_sentence(err[-1])


def test_job_spec_train_step_takes_a_nan_tolerance():
    from schemas.pipeline_spec import TrainStep

    assert TrainStep(config="train.yaml", nan_tolerance=2).nan_tolerance == 2
    assert TrainStep(config="train.yaml").nan_tolerance is None, "the config's nan_tolerance applies"
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        TrainStep(config="train.yaml", nan_tolerance=-1)
