"""An ImageNet DiT re-parameterised to adaLN-single (PixArt-α section 2.3): exact at t = 500, by the rule elsewhere."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from densecurate.cli import main
from schemas.errors import OutputConflictError
from tests.test_training import features_dir, tiny_config  # noqa: F401 (features_dir is a fixture)
from trainer.convert_dit import ADDED_COND, REPARAM_TIMESTEP, convert_dit
from trainer.diffusion import HybridLoss, linear_scheduler
from trainer.errors import IncompatibleModelError
from trainer.tiny import make_tiny_dit

NULL = 1000  # the tiny DiT's null class (num_embeds_ada_norm)
TINY_CAPTION_CHANNELS = 32  # the tiny T5's d_model
TIGHT = {"rtol": 1e-5, "atol": 1e-5}


def load_dit(folder: Path):
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel.from_pretrained(folder).eval()


def load_pixart(folder: Path):
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def converted(tiny_dit_dir, tmp_path_factory) -> dict:
    """The tiny DiT converted for the null class and for class 7."""
    base = tmp_path_factory.mktemp("converted")
    return {
        label: convert_dit(str(tiny_dit_dir), base / str(label), class_label=label, caption_channels=32)
        for label in (None, 7)
    }


def inputs(batch: int = 3, seed: int = 1):
    """Random latents, caption embeddings and an attention mask (each caption keeps its first token)."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 8, 8, generator=g)
    captions = torch.randn(batch, 120, TINY_CAPTION_CHANNELS, generator=g)
    mask = (torch.rand(batch, 120, generator=g) < 0.5).long()
    mask[:, 0] = 1
    return latents, captions, mask


def pixart_out(model, latents, captions, mask, t) -> torch.Tensor:
    with torch.no_grad():
        return model(
            latents,
            encoder_hidden_states=captions,
            encoder_attention_mask=mask,
            timestep=t,
            added_cond_kwargs=ADDED_COND,
        ).sample


def dit_out(dit, latents, t, label: int, block_shift=None, final_shift=None) -> torch.Tensor:
    """The DiT's output; ``block_shift``/``final_shift`` are added to every block's / the final layer's modulation."""
    hooks = []
    if block_shift is not None:
        for block in dit.transformer_blocks:
            hooks.append(block.norm1.linear.register_forward_hook(lambda m, i, out: out + block_shift))
    if final_shift is not None:
        hooks.append(dit.proj_out_1.register_forward_hook(lambda m, i, out: out + final_shift))
    try:
        with torch.no_grad():
            return dit(latents, timestep=t, class_labels=torch.full((latents.shape[0],), label)).sample
    finally:
        for hook in hooks:
            hook.remove()


def timestep_path_shifts(model, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """f(t) - f(500) (blocks) and emb(t) - emb(500), twice (final layer), of the converted model's adaLN-single."""
    with torch.no_grad():
        f_t, emb_t = model.adaln_single(t, ADDED_COND, batch_size=len(t), hidden_dtype=torch.float32)
        ref = torch.full_like(t, REPARAM_TIMESTEP)
        f_500, emb_500 = model.adaln_single(ref, ADDED_COND, batch_size=len(t), hidden_dtype=torch.float32)
    return f_t - f_500, (emb_t - emb_500).repeat(1, 2)


@pytest.mark.parametrize(("label", "dit_label"), [(None, NULL), (7, 7)])
def test_at_t500_the_converted_model_computes_the_dit(converted, tiny_dit_dir, label, dit_label):
    dit, model = load_dit(tiny_dit_dir), load_pixart(converted[label])
    latents, captions, mask = inputs()
    t = torch.full((3,), REPARAM_TIMESTEP)
    expected = dit_out(dit, latents, t, dit_label)
    torch.testing.assert_close(pixart_out(model, latents, captions, mask, t), expected, **TIGHT)
    other = 3 if dit_label != 3 else 4  # the modulation is the chosen class's, not another's
    assert (dit_out(dit, latents, t, other) - expected).abs().max() > 1e-2


@pytest.mark.parametrize("t", [0, 120, 999])
def test_elsewhere_only_the_timestep_path_differs(converted, tiny_dit_dir, t):
    """At t != 500 the rule gives S(i)(t) = S_DiT(i)(500, c) + f(t) - f(500) and the final layer's
    modulation (shift, scale)_DiT(500, c) + emb(t) - emb(500): the converted model is not the DiT at t, but
    the DiT at 500 with exactly these shifts added to its modulations."""
    dit, model = load_dit(tiny_dit_dir), load_pixart(converted[None])
    latents, captions, mask = inputs(seed=2)
    timesteps = torch.full((3,), t)
    got = pixart_out(model, latents, captions, mask, timesteps)
    assert (got - dit_out(dit, latents, timesteps, NULL)).abs().max() > 1e-3
    assert (got - pixart_out(model, latents, captions, mask, torch.full((3,), REPARAM_TIMESTEP))).abs().max() > 1e-3
    block_shift, final_shift = timestep_path_shifts(model, timesteps)
    at_500 = torch.full((3,), REPARAM_TIMESTEP)
    torch.testing.assert_close(got, dit_out(dit, latents, at_500, NULL, block_shift, final_shift), **TIGHT)
    # Both shifts matter: the blocks' alone do not give the output.
    assert (got - dit_out(dit, latents, at_500, NULL, block_shift)).abs().max() > 1e-4


def test_the_zero_cross_attention_ignores_the_caption(converted):
    model = load_pixart(converted[None])
    latents, captions, mask = inputs(seed=3)
    _, other_captions, other_mask = inputs(seed=4)
    for t in (500, 37):
        timesteps = torch.full((3,), t)
        a = pixart_out(model, latents, captions, mask, timesteps)
        b = pixart_out(model, latents, 10 * other_captions, other_mask, timesteps)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for block in model.transformer_blocks:
        assert not block.attn2.to_out[0].weight.any() and not block.attn2.to_out[0].bias.any()
        assert block.attn2.to_q.weight.abs().sum() > 0 and block.attn2.to_k.weight.abs().sum() > 0
    assert model.caption_projection.linear_1.weight.abs().sum() > 0
    # The per-block embeddings differ: each holds its own block's modulation.
    tables = [block.scale_shift_table for block in model.transformer_blocks]
    assert (tables[0] - tables[1]).abs().max() > 1e-2


def test_conversion_is_seeded_and_keeps_the_global_rng(tiny_dit_dir, tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    a = convert_dit(str(tiny_dit_dir), tmp_path / "a", caption_channels=32)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = convert_dit(str(tiny_dit_dir), tmp_path / "b", caption_channels=32)
    wa, wb = (load_file(str(p / "diffusion_pytorch_model.safetensors")) for p in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    shared = load_pixart(a).adaln_single.linear  # t_block: PixArt's initialisation, N(0, 0.02^2) and bias 0
    assert not shared.bias.any() and 0.018 < shared.weight.std().item() < 0.022
    config = json.loads((a / "config.json").read_text())
    assert config["_class_name"] == "PixArtTransformer2DModel"
    assert (config["caption_channels"], config["norm_eps"], config["use_additional_conditions"]) == (32, 1e-6, False)


def test_a_pipeline_folder_converts_from_its_transformer_subfolder(tiny_dit_dir, tmp_path):
    shutil.copytree(tiny_dit_dir, tmp_path / "pipe" / "transformer")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    out = convert_dit(str(tmp_path / "pipe"), tmp_path / "out", caption_channels=32)
    latents, captions, mask = inputs()
    t = torch.full((3,), REPARAM_TIMESTEP)
    got = pixart_out(load_pixart(out), latents, captions, mask, t)
    torch.testing.assert_close(got, dit_out(load_dit(tiny_dit_dir), latents, t, NULL), **TIGHT)


def test_diffusers_feedforward_norm_eps_is_the_one_inexact_detail(tmp_path):
    """diffusers' DiT uses config.norm_eps (default 1e-5) in its feed-forward LayerNorm where the original DiT and
    PixArt use 1e-6: the converted model (1e-6) matches such a DiT closely, and exactly once that eps is 1e-6."""
    source = make_tiny_dit(tmp_path / "dit", norm_eps=1e-5)
    model = load_pixart(convert_dit(str(source), tmp_path / "out", caption_channels=32))
    dit = load_dit(source)
    latents, captions, mask = inputs()
    t = torch.full((3,), REPARAM_TIMESTEP)
    got = pixart_out(model, latents, captions, mask, t)
    torch.testing.assert_close(got, dit_out(dit, latents, t, NULL), rtol=1e-3, atol=1e-3)
    for block in dit.transformer_blocks:
        block.norm3.eps = 1e-6
    torch.testing.assert_close(got, dit_out(dit, latents, t, NULL), **TIGHT)


@pytest.mark.slow
def test_training_starts_from_the_dits_prediction(
    features_dir,  # noqa: F811
    tiny_pixart_dir,
    converted,
    tiny_dit_dir,
    tmp_path,
    monkeypatch,
):
    """The loop's step-0 loss, recomputed by hand from the DiT's prediction for the loop's own batch, noise and
    timesteps (the same generator state, replayed): the DiT at t = 500 with its modulations shifted along the
    timestep path as the rule says. And at t = 500 the loss of that batch is the plain DiT's."""
    import trainer.loop as loop

    seen = {}
    real = loop.diffusion_terms

    def record(model, latents, t5, mask, scheduler, loss_fn, generator):
        if not seen:
            seen.update(latents=latents.clone(), t5=t5, mask=mask, state=generator.get_state(), model=model)
        return real(model, latents, t5, mask, scheduler, loss_fn, generator)

    monkeypatch.setattr(loop, "diffusion_terms", record)
    config = tiny_config(
        tmp_path / "run",
        features_dir,
        tiny_pixart_dir,
        f"model.pretrained={converted[None]}",
        "steps=1",
        "caption_dropout=0",
        "checkpoint_every=1000",
        "compile=off",  # the module itself, also on a CUDA machine
    )
    result = loop.train(config)
    assert type(seen["model"]).__name__ == "PixArtTransformer2DModel"

    latents = seen["latents"]
    replay = torch.Generator().set_state(seen["state"])  # the loop's draws, in the loop's order
    noise = torch.randn(latents.shape, generator=replay)
    timesteps = torch.randint(0, config.diffusion.num_train_timesteps, (latents.shape[0],), generator=replay)
    scheduler = linear_scheduler(1000, config.diffusion.beta_start, config.diffusion.beta_end)
    loss_fn = HybridLoss(scheduler, config.diffusion.loss)
    noisy = scheduler.add_noise(latents, noise, timesteps)

    dit, model = load_dit(tiny_dit_dir), load_pixart(converted[None])
    block_shift, final_shift = timestep_path_shifts(model, timesteps)
    at_500 = torch.full_like(timesteps, REPARAM_TIMESTEP)
    prediction = dit_out(dit, noisy, at_500, NULL, block_shift, final_shift)
    by_hand = loss_fn(prediction, latents, noisy, noise, timesteps).loss.mean().item()
    assert result.losses[0] == pytest.approx(by_hand, rel=1e-5)

    # At t = 500 the unshifted DiT gives the same loss as the converted model, on the loop's batch and noise.
    noisy_500 = scheduler.add_noise(latents, noise, at_500)
    ours = loss_fn(pixart_out(model, noisy_500, seen["t5"], seen["mask"], at_500), latents, noisy_500, noise, at_500)
    dits = loss_fn(dit_out(dit, noisy_500, at_500, NULL), latents, noisy_500, noise, at_500)
    torch.testing.assert_close(ours.loss, dits.loss, **TIGHT)


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    ("sizes", "edits", "message"),
    [
        ({"in_channels": 3, "out_channels": 6}, {}, "has in_channels 3 but the trainer feeds 4-channel VAE latents"),
        ({"out_channels": 4}, {}, "has out_channels 4, no learned sigma"),
        ({"patch_size": 3}, {}, "has patch_size 3, which does not divide its sample_size 8"),
        ({}, {"attention_head_dim": 8}, "do not fit its num_attention_heads x attention_head_dim (2 x 8)"),
        ({}, {"norm_type": "ada_norm"}, "has norm_type 'ada_norm'; only an adaLN-Zero DiT"),
    ],
)
def test_sizes_that_do_not_fit_are_named(tmp_path, capsys, sizes, edits, message):
    source = make_tiny_dit(tmp_path / "dit", **sizes)
    if edits:
        _edit_config(source, **edits)
    with pytest.raises(IncompatibleModelError) as info:
        convert_dit(str(source), tmp_path / "out", caption_channels=32)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
    assert main(["models", "convert-dit", str(source), "--out", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err.replace("\n", " ") and "Traceback" not in err
    assert len(err.splitlines()) == 1, err


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ({"num_attention_heads": 16}, "has num_attention_heads 2 but the PixArt model needs 16"),
        ({"patch_size": 4}, "has patch_size 2 but the PixArt model needs 4"),
    ],
)
def test_sizes_a_training_config_needs(tiny_dit_dir, tmp_path, sizes, message):
    with pytest.raises(IncompatibleModelError, match=message):
        convert_dit(str(tiny_dit_dir), tmp_path / "out", caption_channels=32, sizes=sizes)


def test_cli_converts_and_guards_its_output(tiny_dit_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["models", "convert-dit", str(tiny_dit_dir), "--out", str(out), "--class-label", "7"]
    assert main([*argv, "--caption-channels", "32"]) == 0
    printed = capsys.readouterr().out.replace("\n", "")
    assert str(out) in printed and "class 7" in printed
    latents, captions, mask = inputs()
    t = torch.full((3,), REPARAM_TIMESTEP)
    got = pixart_out(load_pixart(out), latents, captions, mask, t)
    torch.testing.assert_close(got, dit_out(load_dit(tiny_dit_dir), latents, t, 7), **TIGHT)
    with pytest.raises(OutputConflictError, match="already exists and is not an empty folder"):
        convert_dit(str(tiny_dit_dir), out)
    for bad in (argv, [*argv[:-1], "1000"], [*argv[:-1], "cat"], ["models", "convert-dit", str(tmp_path / "no")]):
        target = bad if "--out" in bad else [*bad, "--out", str(tmp_path / "new")]
        assert main(target) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_the_tiny_dit_has_random_modulation_and_shared_embedders(tiny_dit_dir):
    dit = load_dit(tiny_dit_dir)
    assert (dit.config.num_attention_heads, dit.config.attention_head_dim, dit.config.out_channels) == (2, 16, 8)
    first, second = (block.norm1 for block in dit.transformer_blocks)
    assert first.linear.weight.abs().min() > 0 and not torch.equal(first.linear.weight, second.linear.weight)
    for a, b in zip(first.emb.state_dict().values(), second.emb.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # one timestep and class embedder, as in the hub checkpoints
