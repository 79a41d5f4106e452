"""diffusers ``UNet2DModel`` <-> :class:`jaxdiff.nn.UNet` (config and weights, both ways).

    from safetensors.numpy import load_file
    kwargs = unet_config_from_diffusers(json.load(open("unet/config.json")))
    params = unet_params_from_diffusers(load_file("unet/diffusion_pytorch_model.safetensors"),
                                        config=json.load(open("unet/config.json")))
    eps = UNet(**kwargs).apply({"params": params}, x_nhwc, t)

Weights: conv OIHW -> HWIO, linear (out, in) -> (in, out), GroupNorm weight -> scale,
embedding weight -> embedding. Both the current attention names (to_q/to_k/to_v/to_out.0) and
the legacy ones (query/key/value/proj_attn, as stored in google/ddpm-* checkpoints) are accepted.
No torch here: the state dict holds NumPy arrays (any float dtype; converted to float32).

The way back (export, :mod:`jaxdiff.interop.export` writes the folder):

    config = unet_config_to_diffusers(UNet(...), sample_size=32, in_channels=3)
    state_dict = unet_params_to_diffusers(params, config)   # current names, float32, OIHW
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np

from jaxdiff.interop._common import (LEGACY_ATTENTION, abstract_param_shapes, check_fixed_options,
                                     compare_shapes, flatten_params, mismatch_error,
                                     params_to_state_dict, set_param, torch_kernel_to_flax,
                                     torch_tensor_name)

_DOWN, _UP = "DownBlock2D", "UpBlock2D"
_ATTN_DOWN, _ATTN_UP = "AttnDownBlock2D", "AttnUpBlock2D"

# diffusers config keys we can represent only with one value: key -> accepted values.
_FIXED = {
    "center_input_sample": (False,),
    "time_embedding_type": ("positional",),
    "mid_block_type": ("UNetMidBlock2D",),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "act_fn": ("silu", "swish"),
    "mid_block_scale_factor": (1, 1.0),
    "resnet_time_scale_shift": ("default",),
    "add_attention": (True,),
    "class_embed_type": (None,),
}


def unet_config_from_diffusers(config: Mapping[str, Any]) -> dict:
    """Map a diffusers ``UNet2DModel`` config dict to :class:`~jaxdiff.nn.UNet` keyword arguments.

    Supported subset: down blocks DownBlock2D / AttnDownBlock2D mirrored by UpBlock2D /
    AttnUpBlock2D (attention at the same levels on both paths), the UNetMidBlock2D with
    attention, positional time embedding, SiLU, "default" time conditioning, conv
    up/downsampling, and ``num_class_embeds`` class conditioning. Anything else raises
    ValueError naming the setting.

    ``num_class_embeds = N`` becomes ``num_classes = N - 1``: our table has num_classes + 1 rows,
    the last being the null label used when ``y=None``.
    ``attn_resolutions`` are derived from ``sample_size`` (attention is keyed on feature-map
    height), so the converted model expects inputs of height ``sample_size``.
    """
    cfg = dict(config)
    cls = cfg.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise ValueError(f"unet_config_from_diffusers: expected a UNet2DModel config, got {cls}")
    check_fixed_options(cfg, _FIXED, "unet_config_from_diffusers")

    boc = list(cfg.get("block_out_channels", (224, 448, 672, 896)))
    down = [d[7:] if d.startswith("UNetRes") else d for d in
            cfg.get("down_block_types", ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D",
                                         "AttnDownBlock2D"))]
    up = [u[7:] if u.startswith("UNetRes") else u for u in
          cfg.get("up_block_types", ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D",
                                     "UpBlock2D"))]
    if not (len(boc) == len(down) == len(up)):
        raise ValueError("unet_config_from_diffusers: block_out_channels, down_block_types and "
                         f"up_block_types differ in length ({len(boc)}, {len(down)}, {len(up)})")
    for d in down:
        if d not in (_DOWN, _ATTN_DOWN):
            raise ValueError(f"unet_config_from_diffusers: unsupported down block type {d!r} "
                             f"(supported: {_DOWN}, {_ATTN_DOWN})")
    for u in up:
        if u not in (_UP, _ATTN_UP):
            raise ValueError(f"unet_config_from_diffusers: unsupported up block type {u!r} "
                             f"(supported: {_UP}, {_ATTN_UP})")
    n = len(boc)
    for lvl in range(n):
        if (down[lvl] == _ATTN_DOWN) != (up[n - 1 - lvl] == _ATTN_UP):
            raise ValueError(
                "unet_config_from_diffusers: attention must sit at the same resolution on both "
                f"paths; level {lvl} has down block {down[lvl]} but up block {up[n - 1 - lvl]} "
                f"(up_block_types[{n - 1 - lvl}])")

    ch = boc[0]
    if any(c % ch for c in boc):
        raise ValueError(f"unet_config_from_diffusers: block_out_channels {boc} are not integer "
                         f"multiples of the first ({ch})")
    groups = cfg.get("norm_num_groups", 32)
    if groups is None:
        raise ValueError("unet_config_from_diffusers: norm_num_groups=None is not supported")
    attn_groups = cfg.get("attn_norm_num_groups")
    if attn_groups not in (None, groups):
        raise ValueError(f"unet_config_from_diffusers: attn_norm_num_groups={attn_groups} "
                         f"differs from norm_num_groups={groups}")
    temb_dim = cfg.get("time_embedding_dim")
    if temb_dim not in (None, 4 * ch):
        raise ValueError(f"unet_config_from_diffusers: time_embedding_dim={temb_dim} "
                         f"(only 4 * block_out_channels[0] = {4 * ch} is supported)")

    attn_res = ()
    if _ATTN_DOWN in down:
        size = cfg.get("sample_size")
        if size is None:
            raise ValueError("unet_config_from_diffusers: sample_size is needed to place "
                             "attention (attn_resolutions are feature-map heights)")
        height = size if isinstance(size, int) else int(size[0])
        attn_res = tuple(height // 2 ** lvl for lvl in range(n) if down[lvl] == _ATTN_DOWN)

    num_class_embeds = cfg.get("num_class_embeds")
    head_dim = cfg.get("attention_head_dim", 8)
    return dict(
        ch=ch,
        ch_mult=tuple(c // ch for c in boc),
        num_res_blocks=int(cfg.get("layers_per_block", 2)),
        attn_resolutions=attn_res,
        dropout=float(cfg.get("dropout", 0.0)),
        num_classes=None if num_class_embeds is None else int(num_class_embeds) - 1,
        out_channels=int(cfg.get("out_channels", 3)),
        num_groups=int(groups),
        num_heads=1,
        head_dim=None if head_dim is None else int(head_dim),
        norm_eps=float(cfg.get("norm_eps", 1e-5)),
        flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
        freq_shift=int(cfg.get("freq_shift", 0)),
        downsample_padding=int(cfg.get("downsample_padding", 1)),
    )


# ---------------------------------------------------------------------------------------------
# Weights.

_NORMS = {"norm1", "norm2", "group_norm", "norm_out"}
_RES_LEAVES = {"norm1", "conv1", "time_emb_proj", "norm2", "conv2", "conv_shortcut"}
_ATTN_LEAVES = {"group_norm", "to_q", "to_k", "to_v", "to_out"}


def _module_path(module: str, num_levels: int) -> Optional[tuple]:
    """diffusers module name (without .weight/.bias) -> our module path, or None if unknown."""
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(\w+)(\.0)?", module)
    if m:
        side, i, kind, j, leaf, dot0 = m.groups()
        lvl = int(i) if side == "down" else num_levels - 1 - int(i)
        leaves = _RES_LEAVES if kind == "resnets" else _ATTN_LEAVES
        if leaf not in leaves or bool(dot0) != (leaf == "to_out"):
            return None
        return (f"{side}_{lvl}_{'res' if kind == 'resnets' else 'attn'}_{j}", leaf)
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(downsamplers|upsamplers)\.0\.conv", module)
    if m:
        side, i, kind = m.groups()
        if (side == "down") != (kind == "downsamplers"):
            return None
        lvl = int(i) if side == "down" else num_levels - 1 - int(i)
        return (f"{side}_{lvl}_{'downsample' if side == 'down' else 'upsample'}", "conv")
    m = re.fullmatch(r"mid_block\.resnets\.(\d+)\.(\w+)", module)
    if m and m.group(2) in _RES_LEAVES:
        return (f"mid_res_{m.group(1)}", m.group(2))
    m = re.fullmatch(r"mid_block\.attentions\.0\.(\w+)(\.0)?", module)
    if m and m.group(1) in _ATTN_LEAVES and bool(m.group(2)) == (m.group(1) == "to_out"):
        return ("mid_attn", m.group(1))
    simple = {"conv_in": ("conv_in",), "conv_out": ("conv_out",), "conv_norm_out": ("norm_out",),
              "time_embedding.linear_1": ("time_embedding", "linear_1"),
              "time_embedding.linear_2": ("time_embedding", "linear_2"),
              "class_embedding": ("class_embedding",)}
    return simple.get(module)


def _diffusers_name(path: tuple, num_levels: int) -> str:
    """Inverse of the mapping above, for error messages: our param path -> diffusers key."""
    *mods, leaf = path
    top = mods[0]
    rest = list(mods[1:])
    if rest == ["to_out"]:
        rest = ["to_out.0"]
    m = re.fullmatch(r"(down|up)_(\d+)_(res|attn|downsample|upsample)(?:_(\d+))?", top)
    if m:
        side, lvl, kind, j = m.groups()
        i = int(lvl) if side == "down" else num_levels - 1 - int(lvl)
        sub = {"res": f"resnets.{j}", "attn": f"attentions.{j}",
               "downsample": "downsamplers.0", "upsample": "upsamplers.0"}[kind]
        prefix = f"{side}_blocks.{i}.{sub}"
    elif top.startswith("mid_res_"):
        prefix = f"mid_block.resnets.{top[8:]}"
    elif top == "mid_attn":
        prefix = "mid_block.attentions.0"
    else:
        prefix = {"norm_out": "conv_norm_out"}.get(top, top)
    return ".".join([prefix, *rest, torch_tensor_name(leaf)])


def _convert_leaf(module_path: tuple, tname: str, w: np.ndarray, key: str):
    w = np.asarray(w, dtype=np.float32)
    mod = module_path[-1]
    if tname == "bias":
        return "bias", w
    if tname != "weight":
        raise ValueError(f"unet_params_from_diffusers: unexpected tensor {key!r}")
    if mod in _NORMS:
        return "scale", w
    if mod == "class_embedding":
        return "embedding", w
    if mod in ("to_q", "to_k", "to_v", "to_out") and w.ndim == 4:  # legacy 1x1-conv attention
        w = w.reshape(w.shape[:2])
    if w.ndim in (2, 4):
        return "kernel", torch_kernel_to_flax(w)  # OIHW -> HWIO, (out, in) -> (in, out)
    raise ValueError(f"unet_params_from_diffusers: tensor {key!r} has unexpected rank {w.ndim}")


def _expected_shapes(config: Mapping[str, Any]) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxdiff.nn.unet import UNet  # a lower room; imported lazily to keep interop light

    kwargs = unet_config_from_diffusers(config)
    size = config.get("sample_size")
    if size is None:
        size = 2 ** (len(kwargs["ch_mult"]) - 1)
    hw = (size, size) if isinstance(size, int) else tuple(size)
    b = 1
    x = jax.ShapeDtypeStruct((b, *hw, int(config.get("in_channels", 3))), jnp.float32)
    t = jax.ShapeDtypeStruct((b,), jnp.float32)
    y = None if kwargs["num_classes"] is None else jax.ShapeDtypeStruct((b,), jnp.int32)
    return abstract_param_shapes(UNet(**kwargs), x, t, y)


def unet_params_from_diffusers(state_dict: Mapping[str, np.ndarray],
                               config: Optional[Mapping[str, Any]] = None) -> dict:
    """Convert a diffusers ``UNet2DModel`` state dict (NumPy arrays) to UNet params.

    Returns the ``params`` collection as a nested dict of float32 NumPy arrays: use it as
    ``UNet(**kwargs).apply({"params": params}, ...)``.

    Every key must map to a parameter; unknown keys raise ValueError listing all of them. With
    ``config`` (the diffusers config dict) the result is also checked, by name and shape,
    against ``UNet(**unet_config_from_diffusers(config))`` (abstractly, via jax.eval_shape), and
    missing or mis-shaped parameters raise ValueError naming the diffusers keys. Without
    ``config`` only per-key checks run, so an absent block would go unnoticed until ``apply``.
    """
    keys = list(state_dict)
    levels = {int(m.group(1)) for k in keys for m in [re.match(r"down_blocks\.(\d+)\.", k)] if m}
    num_levels = max(levels) + 1 if levels else 0
    if config is not None:
        num_levels = len(config.get("block_out_channels", (224, 448, 672, 896)))

    params: dict = {}
    unexpected = []
    converted: dict = {}
    for key in keys:
        module, _, tname = key.rpartition(".")
        parts = module.split(".")
        if len(parts) >= 2 and parts[-1] in LEGACY_ATTENTION and parts[-2].isdigit():
            module = ".".join(parts[:-1] + [LEGACY_ATTENTION[parts[-1]]])
        path = _module_path(module, num_levels)
        if path is None or tname not in ("weight", "bias"):
            unexpected.append(key)
            continue
        leaf, w = _convert_leaf(path, tname, state_dict[key], key)
        full = path + (leaf,)
        if full in converted:
            raise ValueError(f"unet_params_from_diffusers: {key!r} and {converted[full]!r} both "
                             "map to the same parameter (legacy and current attention names?)")
        converted[full] = key
        set_param(params, full, w)
    if unexpected:
        raise ValueError("unet_params_from_diffusers: unexpected keys (not part of a supported "
                         f"UNet2DModel): {sorted(unexpected)}")

    if config is not None:
        want = _expected_shapes(config)
        got = {path: tuple(w.shape) for path, w in flatten_params(params).items()}
        missing, extra, shape = compare_shapes(got, want, converted,
                                               lambda p: _diffusers_name(p, num_levels))
        err = mismatch_error("unet_params_from_diffusers: state dict does not match the config:",
                             missing=missing, unexpected=extra, shape=shape)
        if err is not None:
            raise err
    return params


# ---------------------------------------------------------------------------------------------
# The way back: our UNet -> diffusers UNet2DModel.

def unet_config_to_diffusers(module: Any, sample_size, in_channels: int) -> dict:
    """The diffusers ``UNet2DModel`` config dict of a :class:`~jaxdiff.nn.UNet` (its fields).

    ``sample_size``: the input height (an int for square inputs, or ``(H, W)``): our attention
    sits where the feature-map height is in ``attn_resolutions``, diffusers' at fixed levels,
    so the levels are resolved here for that size. ``in_channels``: the input channels (the
    UNet infers them from its input).

    Class conditioning: our table has ``num_classes + 1`` rows, the last the null label of
    classifier-free guidance, so ``num_class_embeds = num_classes + 1`` and diffusers'
    ``class_labels = num_classes`` is our null label (``y=None``); diffusers has no default
    label, so callers pass it explicitly.

    Heads: one head per attention (``num_heads=1``, no ``head_dim``) is diffusers'
    ``attention_head_dim=None``; ``head_dim`` is ``attention_head_dim``; ``num_heads > 1``
    is exported when every attention level (the middle included) then has the same head
    width, else ValueError (diffusers fixes the width, not the count). Inverse of
    :func:`unet_config_from_diffusers` (the test round-trips both).
    """
    def err(msg):
        return ValueError(f"unet_config_to_diffusers: {msg}")

    hw = (int(sample_size),) * 2 if isinstance(sample_size, (int, np.integer)) else \
        tuple(int(s) for s in sample_size)
    ch, mult = int(module.ch), tuple(int(m) for m in module.ch_mult)
    n = len(mult)
    boc = [ch * m for m in mult]
    f = 2 ** (n - 1)
    if len(hw) != 2 or hw[0] % f or hw[1] % f:
        raise err(f"sample_size {sample_size} must be divisible by 2**(levels-1) = {f}")
    heights = [hw[0] // 2 ** l for l in range(n)]
    attn_res = tuple(int(r) for r in module.attn_resolutions)
    stray = [r for r in attn_res if r not in heights]
    if stray:
        raise err(f"attn_resolutions {stray} match no feature-map height for sample_size "
                  f"{sample_size} (level heights {heights})")
    attn = [h in attn_res for h in heights]
    down = [_ATTN_DOWN if a else _DOWN for a in attn]
    up = [_ATTN_UP if attn[n - 1 - i] else _UP for i in range(n)]

    if module.head_dim:
        head_dim = int(module.head_dim)
    elif int(module.num_heads) == 1:
        head_dim = None  # diffusers: one head as wide as the channels, at every level
    else:
        widths = {boc[l] // int(module.num_heads) for l in range(n) if attn[l]} | {
            boc[-1] // int(module.num_heads)}
        if len(widths) != 1 or any(boc[l] % int(module.num_heads) for l in range(n)):
            raise err(f"num_heads={module.num_heads} gives heads of widths {sorted(widths)} over "
                      f"the attention levels (channels {boc}); diffusers' UNet2DModel fixes one "
                      "head width (attention_head_dim) for every level")
        head_dim = widths.pop()
    num_classes = module.num_classes
    return dict(
        _class_name="UNet2DModel",
        sample_size=hw[0] if hw[0] == hw[1] else list(hw),
        in_channels=int(in_channels),
        out_channels=int(module.out_channels or in_channels),
        center_input_sample=False,
        time_embedding_type="positional",
        freq_shift=int(module.freq_shift),
        flip_sin_to_cos=bool(module.flip_sin_to_cos),
        down_block_types=down,
        mid_block_type="UNetMidBlock2D",
        up_block_types=up,
        block_out_channels=boc,
        layers_per_block=int(module.num_res_blocks),
        mid_block_scale_factor=1,
        downsample_padding=int(module.downsample_padding),
        downsample_type="conv",
        upsample_type="conv",
        dropout=float(module.dropout),
        act_fn="silu",
        attention_head_dim=head_dim,
        norm_num_groups=int(module.num_groups),
        attn_norm_num_groups=None,
        norm_eps=float(module.norm_eps),
        resnet_time_scale_shift="default",
        add_attention=True,
        class_embed_type=None,
        num_class_embeds=None if num_classes is None else int(num_classes) + 1,
    )


def unet_params_to_diffusers(params: Mapping, config: Mapping[str, Any]) -> dict:
    """UNet params (nested, as :func:`unet_params_from_diffusers` returns or training makes)
    -> a diffusers ``UNet2DModel`` state dict of float32 NumPy arrays in torch layout, with the
    current attention names (to_q/to_k/to_v/to_out.0, Linear weights).

    ``config``: the diffusers config (:func:`unet_config_to_diffusers`); the params are checked
    by name and shape against it first (ValueError listing every difference)."""
    num_levels = len(config["block_out_channels"])
    want = _expected_shapes(config)
    got = {p: tuple(np.shape(w)) for p, w in flatten_params(params).items()}
    names = {p: "/".join(p) for p in got}
    missing, extra, shape = compare_shapes(got, want, names, lambda p: "/".join(p))
    err = mismatch_error("unet_params_to_diffusers: params do not match the config:",
                         missing=missing, unexpected=extra, shape=shape)
    if err is not None:
        raise err
    return params_to_state_dict(params, lambda p: _diffusers_name(p, num_levels))
