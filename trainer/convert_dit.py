"""Start the PixArt-α alignment stage from a class-conditional ImageNet DiT: re-parameterise it to adaLN-single.

PixArt-α (Chen et al., arXiv 2310.00426, section 2.3, "Re-parameterization") replaces DiT's per-block adaLN
MLPs S(i) = f(i)(t + c) by one shared MLP f (``t_block``; diffusers: ``adaln_single.linear``) and per-block
trainable embeddings E(i) (diffusers: each block's ``scale_shift_table``), S(i) = f(t) + E(i), and initialises
the E(i) so that S(i) equals the DiT's at a chosen t (t = 500), so that the DiT's weights load directly.

The rule this converter applies, with f(t) = ``adaln_single.linear(silu(emb(t)))``, emb = adaLN-single's
timestep embedding and c the chosen class (default: the null class, index ``num_embeds_ada_norm``, the DiT's
classifier-free "drop" class):

* ``transformer_blocks.i.scale_shift_table`` E(i) = S_DiT(i)(t=500, c) - f(500), the 6 rows in DiT's order
  (shift, scale, gate of the attention; shift, scale, gate of the feed-forward), exactly the order in which
  diffusers' ``BasicTransformerBlock`` (``ada_norm_single``) and PixArt's ``PixArtBlock.forward``
  (diffusion/model/nets/PixArt.py) split ``scale_shift_table[None] + t.reshape(B, 6, -1)``.
* the final layer's 2-row ``scale_shift_table`` = (shift, scale)_DiT(t=500, c) - emb(500) in each row: PixArt's
  ``T2IFinalLayer.forward`` (diffusion/model/nets/PixArt_blocks.py) adds the timestep *embedding* ``t`` (not
  ``t_block``'s output) to its table, ``(self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)``, as does
  diffusers' ``PixArtTransformer2DModel`` with ``embedded_timestep``.
* the shared MLP ``adaln_single.linear`` (``t_block``) is initialised as PixArt's ``initialize_weights`` does
  (``nn.init.normal_(self.t_block[1].weight, std=0.02)``, bias 0 from ``_basic_init``; seeded): the DiT has no
  such layer, and PixArt's ``load_checkpoint`` (diffusion/utils/checkpoint.py, ``load_state_dict(...,
  strict=False)``) of a DiT checkpoint leaves ``t_block`` at that initialisation.
* the timestep embedder (``adaln_single.emb.timestep_embedder``) is the DiT's, of block 0 (diffusers' DiT gives
  every block its own copy; the hub checkpoints hold the same weights in each, and DiT's final layer uses
  block 0's); the patch embedding, self-attention (``attn1``), feed-forward (``ff``) and output projection
  (``proj_out_2`` -> ``proj_out``) are copied.
* the new cross-attention (``attn2``) has its output projection zero (weight and bias), as PixArt's
  ``initialize_weights`` zeroes ``cross_attn.proj``; its q/k/v and the caption projection are initialised as a
  fresh diffusers model would (seeded).

What is exact: at t = 500 every block's modulation equals the DiT's for class c, whatever f is, and so does the
final layer's; the zero cross-attention adds nothing, so the converted model computes the DiT's output for class
c, for any caption, up to fp32 rounding. At another t the blocks' modulation differs from the DiT's at (500, c)
by exactly f(t) - f(500) and the final layer's by emb(t) - emb(500): the model differs from the DiT only
through the timestep path (and is not the DiT at t: the class and timestep no longer pass through a per-block
MLP). Two details of diffusers' DiT port are not carried over: its sinusoidal timestep projection uses
``downscale_freq_shift=1`` where PixArt's uses 0 (so emb(t) is the DiT's MLP on PixArt's sinusoid; at t = 500
the E(i) absorb it), and its feed-forward LayerNorm uses the config's ``norm_eps`` (diffusers' default 1e-5)
where the original DiT and PixArt use 1e-6 in every LayerNorm; the converted model has ``norm_eps`` 1e-6, so a
source with another ``norm_eps`` is matched up to that epsilon's effect (tiny next to fp32 rounding of large
activations, but not bit-exact).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from schemas.atomic import make_folder
from schemas.errors import MissingInputError, OutputConflictError
from trainer.errors import IncompatibleModelError
from trainer.weights import load_weights

REPARAM_TIMESTEP = 500  # PixArt-α's t for the re-parameterisation
PIXART_NORM_EPS = 1e-6
LATENT_CHANNELS = 4  # the SD VAE's latents that the trainer feeds
ADDED_COND = {"resolution": None, "aspect_ratio": None}
# Which PixArt config fields a caller may require of the source (``sizes``), by their name in the DiT config.
SIZE_FIELDS = ("num_attention_heads", "attention_head_dim", "patch_size", "sample_size", "num_layers")


def _from_source(load: Any, source: str, **kwargs: Any) -> Any:
    """``load(source, subfolder="transformer")`` for a pipeline folder or repo, else ``load(source)``."""
    local = Path(source)
    if local.is_dir():
        sub = "transformer" if (local / "transformer").is_dir() else None
        return load(source, subfolder=sub, **kwargs)
    try:
        return load(source, subfolder="transformer", **kwargs)
    except OSError:
        return load(source, **kwargs)


def check_dit_config(config: Mapping[str, Any], source: str, sizes: Mapping[str, int] | None = None) -> None:
    """Refuse a DiT whose type or sizes do not fit the PixArt alignment stage (and ``sizes``, when given)."""
    what = f"DiT {source}"
    norm_type = config.get("norm_type", "ada_norm_zero")
    if norm_type != "ada_norm_zero":
        raise IncompatibleModelError(
            f"{what} has norm_type {norm_type!r}; only an adaLN-Zero DiT (ada_norm_zero) converts"
        )
    if config.get("num_embeds_ada_norm") is None:
        raise IncompatibleModelError(
            f"{what} has no num_embeds_ada_norm (classes); only a class-conditional DiT converts"
        )
    if config.get("norm_elementwise_affine", False):
        raise IncompatibleModelError(
            f"{what} has norm_elementwise_affine true; DiT's and PixArt's LayerNorms have none"
        )
    in_channels = config.get("in_channels", LATENT_CHANNELS)
    if in_channels != LATENT_CHANNELS:
        raise IncompatibleModelError(
            f"{what} has in_channels {in_channels} but the trainer feeds {LATENT_CHANNELS}-channel VAE latents"
        )
    out_channels = config.get("out_channels") or in_channels
    if out_channels != 2 * in_channels:
        raise IncompatibleModelError(
            f"{what} has out_channels {out_channels}, no learned sigma: the hybrid loss needs {2 * in_channels} "
            f"(epsilon and the variance of {in_channels} latent channels)"
        )
    patch, sample = config.get("patch_size", 2), config.get("sample_size", 32)
    if patch is None or patch < 1 or sample % patch:
        raise IncompatibleModelError(f"{what} has patch_size {patch}, which does not divide its sample_size {sample}")
    for name, wanted in (sizes or {}).items():
        if name not in SIZE_FIELDS:
            raise ValueError(f"unknown size {name!r}: use one of {', '.join(SIZE_FIELDS)}")
        if config.get(name) != wanted:
            raise IncompatibleModelError(f"{what} has {name} {config.get(name)} but the PixArt model needs {wanted}")


def _null_or_class(dit: Any, class_label: int | None, source: str) -> int:
    """The class index to convert for: ``class_label`` (checked against the config already), or the null class."""
    if class_label is not None:
        return class_label
    num_classes = dit.config.num_embeds_ada_norm
    table = dit.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    if table.num_embeddings <= num_classes:
        raise IncompatibleModelError(f"DiT {source} has no null class (no class dropout); pass --class-label N")
    return num_classes


def _load_dit_config(source: str) -> Any:
    from diffusers import DiTTransformer2DModel

    try:
        config = _from_source(DiTTransformer2DModel.load_config, source)
    except (OSError, ValueError) as exc:
        raise MissingInputError(
            f"cannot load the DiT {source}: not a DiT folder (or pipeline folder with transformer/) here nor a hub "
            f"id in the Hugging Face cache or hub ({type(exc).__name__})"
        ) from None
    return config


@torch.no_grad()
def convert_dit(
    source: str,
    out: Path,
    *,
    class_label: int | None = None,
    caption_channels: int = 4096,
    sizes: Mapping[str, int] | None = None,
    seed: int = 0,
) -> Path:
    """Write ``out``: a ``PixArtTransformer2DModel`` folder (safetensors) re-parameterised from the DiT ``source``.

    ``source``: hub id or folder of a ``DiTTransformer2DModel`` or of a DiT pipeline (subfolder ``transformer``).
    ``class_label``: the class whose modulation the blocks keep at t = 500 (None: the null class).
    ``caption_channels``: the text encoder's hidden size (4096: T5 v1.1 XXL). ``sizes``: PixArt sizes the source
    must have (e.g. a training config's ``num_attention_heads``), else an ``IncompatibleModelError`` names the
    field. ``seed`` seeds the fresh parts (cross-attention q/k/v, caption projection, ``adaln_single.linear``).
    The rule is in the module docstring. ``out`` must not be a non-empty folder. Returns ``out``.
    """
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputConflictError(f"--out {out} already exists and is not an empty folder; choose a new folder")
    if caption_channels < 1:
        raise IncompatibleModelError(f"--caption-channels {caption_channels} must be at least 1")
    config = _load_dit_config(source)
    check_dit_config(config, source, sizes)
    num_classes = config["num_embeds_ada_norm"]
    if class_label is not None and not 0 <= class_label < num_classes:
        raise IncompatibleModelError(
            f"--class-label {class_label} is not a class of DiT {source} (0 to {num_classes - 1})"
        )
    try:
        dit = load_weights(
            lambda: _from_source(DiTTransformer2DModel.from_pretrained, source, torch_dtype=torch.float32),
            f"DiT {source}",
            "download or copy the DiT again",
        )
    except (RuntimeError, ValueError) as exc:
        if "size mismatch" in str(exc) or "shape" in str(exc):
            raise IncompatibleModelError(
                f"the weights of DiT {source} do not fit its num_attention_heads x attention_head_dim "
                f"({config.get('num_attention_heads')} x {config.get('attention_head_dim')}); fix its config.json"
            ) from None
        raise
    dit = dit.eval()
    label = _null_or_class(dit, class_label, source)
    c = dit.config
    inner = c.num_attention_heads * c.attention_head_dim

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pixart = PixArtTransformer2DModel(
            num_attention_heads=c.num_attention_heads,
            attention_head_dim=c.attention_head_dim,
            in_channels=c.in_channels,
            out_channels=c.out_channels,
            num_layers=c.num_layers,
            dropout=c.dropout,
            norm_num_groups=c.norm_num_groups,
            cross_attention_dim=inner,
            attention_bias=c.attention_bias,
            sample_size=c.sample_size,
            patch_size=c.patch_size,
            activation_fn=c.activation_fn,
            num_embeds_ada_norm=c.num_embeds_ada_norm,
            upcast_attention=c.upcast_attention,
            norm_elementwise_affine=False,
            norm_eps=PIXART_NORM_EPS,
            interpolation_scale=1,  # DiT's PatchEmbed: sin-cos positions of its own grid
            use_additional_conditions=False,
            caption_channels=caption_channels,
        )
        torch.nn.init.normal_(pixart.adaln_single.linear.weight, std=0.02)  # PixArt's t_block initialisation
    torch.nn.init.zeros_(pixart.adaln_single.linear.bias)

    dit_state = dit.state_dict()
    state = pixart.state_dict()
    copied = {
        k: dit_state[k]
        for k in state
        if k in dit_state and (".attn1." in k or ".ff." in k or k.startswith("pos_embed."))
    }
    copied["proj_out.weight"], copied["proj_out.bias"] = dit_state["proj_out_2.weight"], dit_state["proj_out_2.bias"]
    for part in ("linear_1", "linear_2"):
        for p in ("weight", "bias"):
            dit_key = f"transformer_blocks.0.norm1.emb.timestep_embedder.{part}.{p}"
            copied[f"adaln_single.emb.timestep_embedder.{part}.{p}"] = dit_state[dit_key]
    known = (".norm1.emb.", ".norm1.linear.", "proj_out_1.", "proj_out_2.")
    unknown = [k for k in dit_state if k not in copied and not any(part in k for part in known)]
    if unknown:
        raise IncompatibleModelError(f"DiT {source} has weights this converter does not map: {', '.join(unknown[:3])}")
    for key, value in copied.items():
        if state[key].shape != value.shape:
            raise IncompatibleModelError(
                f"DiT {source}: {key} has shape {tuple(value.shape)}, PixArt needs {tuple(state[key].shape)}"
            )
        state[key].copy_(value)
    for block in pixart.transformer_blocks:
        block.attn2.to_out[0].weight.zero_()
        block.attn2.to_out[0].bias.zero_()

    # The modulations at t = 500, in float64 (the fp32 sums at run time then round once).
    t = torch.tensor([REPARAM_TIMESTEP])
    labels = torch.tensor([label])
    f500, emb500 = copy.deepcopy(pixart.adaln_single).double()(t, ADDED_COND, batch_size=1, hidden_dtype=torch.float64)
    for dit_block, block in zip(dit.transformer_blocks, pixart.transformer_blocks, strict=True):
        norm1 = copy.deepcopy(dit_block.norm1).double()
        s_dit = norm1.linear(norm1.silu(norm1.emb(t, labels, hidden_dtype=torch.float64)))
        block.scale_shift_table.copy_((s_dit - f500).view(6, inner))
    emb0 = copy.deepcopy(dit.transformer_blocks[0].norm1.emb).double()
    final = copy.deepcopy(dit.proj_out_1).double()(
        torch.nn.functional.silu(emb0(t, labels, hidden_dtype=torch.float64))
    )
    pixart.scale_shift_table.copy_(final.view(2, inner) - emb500)

    make_folder(out)
    pixart.save_pretrained(out, safe_serialization=True)
    return out
