"""The training loop's GPU paths as settings, checked on the CPU with the tiny PixArt-α: torch.compile, fused
AdamW, TF32, SDPA attention and gradient checkpointing each match the plain path within tolerance, and a wrong
value is refused in one sentence naming the field.

The features are hand-made (see tests/test_train_bounded.py): no Ray, no encoders.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from schemas.errors import ConfigError
from schemas.train_config import TrainConfig, load_train_config
from tests.test_train_bounded import TINY_YAML, config_for, write_features
from trainer import loop
from trainer.checkpoint import STATE_FILE
from trainer.data import seeded_generator
from trainer.diffusion import HybridLoss, linear_scheduler

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
ALIGNMENT_YAML = TINY_YAML.with_name("alignment_256.yaml")


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    return write_features(tmp_path_factory.mktemp("feats") / "good")


def tiny(*overrides: str) -> TrainConfig:
    return load_train_config(TINY_YAML.read_text(), ["run_dir=unused", "pipeline=unused", *overrides], "tiny.yaml")


def run(run_dir: Path, features: Path, pipeline: Path, *overrides: str, **kwargs) -> loop.TrainResult:
    """A two-step run of the tiny model, checkpointed at the end."""
    config = config_for(run_dir, features, pipeline, "steps=2", "checkpoint_every=2", *overrides)
    return loop.train(config, **kwargs)


def assert_same_run(
    a: loop.TrainResult, b: loop.TrainResult, rtol: float, atol: float, *, key_biases: bool = True
) -> None:
    """Same losses and weights. ``key_biases=False`` leaves out the attention key biases: their gradient is zero
    in exact arithmetic (softmax ignores a shift common to all keys), so where rounding differs Adam turns the
    leftover noise into full-size steps of either sign."""
    assert a.losses == pytest.approx(b.losses, rel=rtol)
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        if key_biases or not name.endswith("to_k.bias"):
            torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=name)


def saved_optimizer_groups(run_dir: Path, step: int) -> list[dict]:
    state = torch.load(run_dir / "checkpoints" / f"step-{step:08d}" / STATE_FILE, weights_only=True)
    return state["optimizer"]["param_groups"]


def test_defaults_and_the_recipe():
    config = tiny()
    assert (config.compile, config.optim.fused, config.tf32) == ("auto", "auto", True)
    assert not config.model.gradient_checkpointing
    recipe = load_train_config(ALIGNMENT_YAML.read_text(), [], source="alignment_256.yaml")
    assert recipe.model.gradient_checkpointing and recipe.compile == "auto" and recipe.optim.fused == "auto"


@pytest.mark.parametrize(
    ("override", "value"),
    [("compile=on", "on"), ("compile=off", "off"), ("compile=true", "on"), ("compile=false", "off")],
)
def test_on_and_off_as_yaml_reads_them(override, value):
    config = tiny(override)
    assert config.compile == value
    saved = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)  # the run's config.yaml
    assert load_train_config(saved, [], "config.yaml") == config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("compile=maybe", "tiny.yaml: compile: Input should be 'auto', 'on' or 'off'"),
        ("optim.fused=2", "tiny.yaml: optim.fused: Input should be 'auto', 'on' or 'off'"),
        ("tf32=perhaps", "tiny.yaml: tf32: Input should be a valid boolean, unable to interpret input"),
        (
            "model.gradient_checkpointing=sometimes",
            "tiny.yaml: model.gradient_checkpointing: Input should be a valid boolean, unable to interpret input",
        ),
    ],
)
def test_wrong_values_are_refused_in_one_sentence(override, message):
    with pytest.raises(ConfigError) as info:
        tiny(override)
    assert str(info.value) == message


@pytest.mark.slow
def test_auto_means_on_for_cuda_only():
    model = torch.nn.Linear(2, 2)
    assert loop.forward_module(tiny(), model, CPU) is model
    compiled = loop.forward_module(tiny(), model, CUDA)  # compiles lazily: no GPU needed to build it
    assert compiled is not model and compiled._orig_mod is model
    assert loop.build_optimizer(tiny(), model, CPU).defaults["fused"] is None
    assert loop.build_optimizer(tiny(), model, CUDA).defaults["fused"] is True
    assert loop.build_optimizer(tiny("optim.fused=off"), model, CUDA).defaults["fused"] is None


def test_compile_wraps_the_ddp_module_not_the_model():
    model = torch.nn.Linear(2, 2)
    wrapper = torch.nn.Sequential(model)
    compiled = loop.forward_module(tiny("compile=on"), model, CPU, wrap=lambda m: wrapper)
    assert compiled._orig_mod is wrapper
    assert list(compiled._orig_mod.state_dict()) == ["0.weight", "0.bias"]


@pytest.mark.slow
def test_compiled_run_matches_and_saves_plain_weights(features, tiny_pixart_dir, tmp_path, monkeypatch):
    """torch.compile on the CPU (inductor, C++ kernels built with the machine's compiler): the compiled forward
    is the one trained, its per-sample loss terms equal the uncompiled module's, and the checkpoints hold the
    uncompiled module's weights under their own names."""
    real = loop.diffusion_terms
    seen: list[type] = []

    def compare(model, latents, t5, mask, scheduler, loss_fn, generator):
        replay = torch.Generator().set_state(generator.get_state())
        terms = real(model, latents, t5, mask, scheduler, loss_fn, generator)
        with torch.no_grad():
            plain = real(model._orig_mod, latents, t5, mask, scheduler, loss_fn, replay)
        for name in ("loss", "mse", "vb"):
            torch.testing.assert_close(getattr(terms, name), getattr(plain, name), rtol=1e-4, atol=1e-6)
        seen.append(type(model))
        return terms

    plain = run(tmp_path / "plain", features, tiny_pixart_dir, "model.num_layers=1", "compile=off")
    monkeypatch.setattr(loop, "diffusion_terms", compare)
    compiled = run(tmp_path / "compiled", features, tiny_pixart_dir, "model.num_layers=1", "compile=on")
    assert seen == [torch._dynamo.eval_frame.OptimizedModule] * 2
    assert_same_run(compiled, plain, rtol=1e-4, atol=1e-5, key_biases=False)

    from diffusers import PixArtTransformer2DModel

    expected = set(compiled.model.state_dict())
    checkpoint = tmp_path / "compiled" / "checkpoints" / "step-00000002"
    for part in ("transformer", "transformer_ema"):
        with safe_open(checkpoint / part / "diffusion_pytorch_model.safetensors", "pt") as saved:
            keys = set(saved.keys())
        assert keys == expected and not any("_orig_mod" in k for k in keys)
    transformer = PixArtTransformer2DModel.from_pretrained(checkpoint / "transformer")  # an uncompiled model
    for a, b in zip(transformer.parameters(), compiled.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fused_adamw_takes_the_same_steps(features, tiny_pixart_dir, tmp_path):
    plain = run(tmp_path / "plain", features, tiny_pixart_dir, "optim.fused=off")
    fused = run(tmp_path / "fused", features, tiny_pixart_dir, "optim.fused=on")
    assert [g["fused"] for g in saved_optimizer_groups(tmp_path / "plain", 2)] == [None]
    assert [g["fused"] for g in saved_optimizer_groups(tmp_path / "fused", 2)] == [True]
    assert_same_run(fused, plain, rtol=1e-5, atol=1e-6)


def test_a_resume_takes_the_fused_setting_of_its_config(features, tiny_pixart_dir, tmp_path):
    run(tmp_path / "run", features, tiny_pixart_dir, "optim.fused=off")
    config = config_for(tmp_path / "run", features, tiny_pixart_dir, "steps=3", "checkpoint_every=1", "optim.fused=on")
    result = loop.train(config, resume=True, allow_config_change=True)
    assert result.step == 3 and len(result.losses) == 1
    assert [g["fused"] for g in saved_optimizer_groups(tmp_path / "run", 3)] == [True]


@pytest.mark.parametrize("tf32", [True, False])
def test_tf32_is_set_on_cuda_and_restored(tf32):
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = matmul.fp32_precision, conv.fp32_precision
    with loop.matmul_precision(tiny(f"tf32={str(tf32).lower()}"), CUDA):
        want = "tf32" if tf32 else "ieee"
        assert (matmul.fp32_precision, conv.fp32_precision) == (want, want)
    assert (matmul.fp32_precision, conv.fp32_precision) == before
    with loop.matmul_precision(tiny("tf32=true"), CPU):
        assert (matmul.fp32_precision, conv.fp32_precision) == before


def test_attention_is_sdpa_new_and_pretrained(tiny_pixart_dir):
    from diffusers.models.attention_processor import AttnProcessor2_0

    for config in (tiny(), tiny(f"model.pretrained={tiny_pixart_dir}")):
        processors = loop.build_transformer(config).attn_processors
        assert processors and all(type(p) is AttnProcessor2_0 for p in processors.values())


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    config = tiny("model.num_layers=1")
    torch.manual_seed(0)
    plain = loop.build_transformer(config)
    checkpointed = copy.deepcopy(plain)
    checkpointed.enable_gradient_checkpointing()
    scheduler = linear_scheduler(1000, 1e-4, 0.02)
    gen = torch.Generator().manual_seed(1)
    latents, t5 = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 32, generator=gen)
    mask = torch.ones(2, 5)
    results = []
    for model in (plain, checkpointed):
        calls = []
        model.transformer_blocks[0].register_forward_pre_hook(lambda *args, calls=calls: calls.append(1))
        model.train()
        terms = loop.diffusion_terms(
            model, latents, t5, mask, scheduler, HybridLoss(scheduler, "hybrid"), seeded_generator(0, 0, 0, 3)
        )
        terms.loss.mean().backward()
        results.append((terms.loss.detach(), {n: p.grad for n, p in model.named_parameters()}, len(calls)))
    (loss, grads, plain_calls), (loss_ckpt, grads_ckpt, ckpt_calls) = results
    assert (plain_calls, ckpt_calls) == (1, 2)  # the checkpointed block runs again in the backward
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-6, atol=1e-7)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_the_loop_checkpoints_gradients_when_set(features, tiny_pixart_dir, tmp_path):
    plain = run(tmp_path / "plain", features, tiny_pixart_dir)
    checkpointed = run(tmp_path / "ckpt", features, tiny_pixart_dir, "model.gradient_checkpointing=true")
    assert checkpointed.model.is_gradient_checkpointing and not plain.model.is_gradient_checkpointing
    assert_same_run(checkpointed, plain, rtol=1e-5, atol=1e-6)
