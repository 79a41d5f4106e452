"""diffusers ``UNet2DConditionModel`` <-> :class:`jaxdiff.nn.unet_cond.UNetCondition`.

    unet, params = load_unet2d_condition("stable-diffusion-v1-5", subfolder="unet")
    eps = unet.apply({"params": params}, z_nhwc, t, text_hidden_states, text_mask)

or, from arrays already in memory:

    kwargs = unet2d_condition_config_from_diffusers(config)           # UNetCondition kwargs
    params = convert_unet2d_condition_state_dict(state_dict, config)  # nested float32 NumPy

Weights: conv OIHW -> HWIO (1x1-conv projections stay [1, 1, C_in, C_out]), linear
(out, in) -> (in, out), GroupNorm / LayerNorm weight -> scale; diffusers' ``a.N.b`` becomes
``a_N/b`` and ``to_out.0`` becomes ``to_out``. Every diffusers tensor must fill exactly one
parameter of the expected shape and every parameter must be filled, else ValueError names the
diffusers keys. Only safetensors is read; no torch here.

The way back (export; :mod:`jaxdiff.interop.export` writes the folder):

    config = unet2d_condition_config_to_diffusers(UNetCondition(...), sample_size=8)
    state_dict = unet2d_condition_params_to_diffusers(params, config)  # float32, torch layout
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import numpy as np

from jaxdiff.interop._common import (abstract_param_shapes, check_fixed_options, compare_shapes,
                                     convert_checked, diffusers_key_to_path, flatten_params,
                                     mismatch_error, params_to_state_dict, path_to_diffusers_key)
from jaxdiff.interop.safetensors_io import read_diffusers_folder

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_TYPES = ("UNetMidBlock2DCrossAttn", None)

# Options we represent with one value only: key -> accepted values (diffusers' defaults).
_FIXED = {
    "center_input_sample": (False,),
    "mid_block_scale_factor": (1, 1.0),
    "act_fn": ("silu", "swish"),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "projection_class_embeddings_input_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
}
# Read and mapped, or without effect on the function computed by the supported blocks:
# sample_size (only a default resolution); upcast_attention (torch fp16 softmax upcast: our
# softmax is always float32); resnet_skip_time_act, resnet_out_scale_factor and
# addition_embed_type_num_heads (used only by block / embedding types we refuse).
_MAPPED = {"in_channels", "out_channels", "flip_sin_to_cos", "freq_shift", "down_block_types",
           "mid_block_type", "up_block_types", "only_cross_attention", "block_out_channels",
           "layers_per_block", "downsample_padding", "dropout", "norm_num_groups", "norm_eps",
           "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim",
           "use_linear_projection", "time_embedding_dim", "sample_size", "upcast_attention",
           "resnet_skip_time_act", "resnet_out_scale_factor", "addition_embed_type_num_heads"}
_NORMS = {"norm", "norm1", "norm2", "norm3", "conv_norm_out"}
_INDEXED = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
            "transformer_blocks", "net")


def _err(msg: str) -> ValueError:
    return ValueError(f"unet2d_condition_config_from_diffusers: {msg}")


def _int_or_levels(cfg: Mapping, key: str, default, n: int):
    """An int, or a list with one int per level (returned as a tuple)."""
    v = cfg.get(key, default)
    if isinstance(v, (list, tuple)):
        if len(v) != n:
            raise _err(f"{key}={list(v)} needs one entry per level ({n})")
        if not all(isinstance(e, int) and not isinstance(e, bool) for e in v):
            raise _err(f"{key}={list(v)}: only integers per level are supported "
                       "(no nested per-layer lists)")
        return tuple(int(e) for e in v)
    if v is None or isinstance(v, bool) or not isinstance(v, int):
        raise _err(f"unsupported {key}={v!r} (an int or one int per level)")
    return int(v)


def unet2d_condition_config_from_diffusers(config: Mapping[str, Any]) -> dict:
    """Map a diffusers ``UNet2DConditionModel`` config dict to UNetCondition keyword arguments.

    Supported: CrossAttnDownBlock2D / DownBlock2D, UNetMidBlock2DCrossAttn (or no mid block),
    CrossAttnUpBlock2D / UpBlock2D; ``layers_per_block``, ``attention_head_dim`` (= heads) and
    ``transformer_layers_per_block`` as an int or one int per level; ``cross_attention_dim`` as
    an int (or a per-level list of one value); linear or 1x1-conv projections; positional time
    embedding; SiLU. Anything else (SD-XL's added embeddings, class embeddings, other block
    types, ``only_cross_attention``, unknown keys ...) raises ValueError naming the setting.
    """
    cls = config.get("_class_name", "UNet2DConditionModel")
    if cls != "UNet2DConditionModel":
        raise _err(f"expected a UNet2DConditionModel config, got {cls!r}")
    cfg = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    unknown = sorted(set(cfg) - set(_FIXED) - _MAPPED)
    if unknown:
        raise _err(f"unsupported config keys {unknown}")
    check_fixed_options(cfg, _FIXED, "unet2d_condition_config_from_diffusers")

    boc = tuple(int(c) for c in cfg.get("block_out_channels", (320, 640, 1280, 1280)))
    down = tuple(cfg.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    up = tuple(cfg.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
    n = len(boc)
    if not n or not (len(down) == len(up) == n):
        raise _err(f"block_out_channels, down_block_types and up_block_types differ in length "
                   f"({n}, {len(down)}, {len(up)})")
    bad = sorted({d for d in down if d not in _DOWN_TYPES}) + sorted(
        {u for u in up if u not in _UP_TYPES})
    if bad:
        raise _err(f"unsupported block types {bad} (supported: {list(_DOWN_TYPES)}, "
                   f"{list(_UP_TYPES)})")
    mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid not in _MID_TYPES:
        raise _err(f"unsupported mid_block_type={mid!r} (supported: {list(_MID_TYPES)})")
    oca = cfg.get("only_cross_attention", False)
    if any(oca) if isinstance(oca, (list, tuple)) else oca:
        raise _err(f"only_cross_attention={oca!r} is not supported")

    cad = cfg.get("cross_attention_dim", 1280)
    if isinstance(cad, (list, tuple)):
        if len(set(cad)) != 1:
            raise _err(f"cross_attention_dim={list(cad)}: different widths per level are not "
                       "supported (one context feeds every level)")
        cad = cad[0]
    groups = cfg.get("norm_num_groups", 32)
    if groups is None:
        raise _err("norm_num_groups=None is not supported")
    temb_dim = cfg.get("time_embedding_dim")
    if temb_dim not in (None, 4 * boc[0]):
        raise _err(f"time_embedding_dim={temb_dim} (only 4 * block_out_channels[0] = "
                   f"{4 * boc[0]} is supported)")
    heads = _int_or_levels(cfg, "attention_head_dim", 8, n)
    for l, h in enumerate(heads if isinstance(heads, tuple) else (heads,) * n):
        if h < 1 or boc[l] % h:
            raise _err(f"attention_head_dim (number of heads) {h} does not divide the "
                       f"{boc[l]} channels of level {l}")
    return dict(
        in_channels=int(cfg.get("in_channels", 4)),
        out_channels=int(cfg.get("out_channels", 4)),
        block_out_channels=boc,
        layers_per_block=_int_or_levels(cfg, "layers_per_block", 2, n),
        down_block_types=down,
        up_block_types=up,
        mid_block_type=mid,
        cross_attention_dim=int(cad),
        attention_head_dim=heads,
        transformer_layers_per_block=_int_or_levels(cfg, "transformer_layers_per_block", 1, n),
        use_linear_projection=bool(cfg.get("use_linear_projection", False)),
        flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
        freq_shift=int(cfg.get("freq_shift", 0)),
        norm_num_groups=int(groups),
        norm_eps=float(cfg.get("norm_eps", 1e-5)),
        downsample_padding=int(cfg.get("downsample_padding", 1)),
        dropout=float(cfg.get("dropout", 0.0)),
    )


# ---------------------------------------------------------------------------------------------
# Weights.

def _our_path(key: str) -> Optional[tuple]:
    """diffusers key -> our parameter path (module names..., leaf name), or None."""
    return diffusers_key_to_path(key, indexed=_INDEXED, norms=_NORMS)


def _diffusers_key(path: tuple) -> str:
    """Inverse of :func:`_our_path`, for error messages."""
    return path_to_diffusers_key(path, indexed=_INDEXED)


def expected_param_shapes(kwargs: Mapping[str, Any]) -> dict:
    """UNetCondition(**kwargs) parameter path -> shape, without allocating (jax.eval_shape)."""
    import jax
    import jax.numpy as jnp

    from jaxdiff.nn.unet_cond import UNetCondition  # a lower room; imported lazily

    f = 2 ** (len(kwargs["block_out_channels"]) - 1)
    x = jax.ShapeDtypeStruct((1, f, f, kwargs["in_channels"]), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    ctx = jax.ShapeDtypeStruct((1, 1, kwargs["cross_attention_dim"]), jnp.float32)
    return abstract_param_shapes(UNetCondition(**kwargs), x, t, ctx)


def convert_unet2d_condition_state_dict(state_dict: Mapping[str, np.ndarray],
                                        config: Mapping[str, Any]) -> dict:
    """Convert a diffusers ``UNet2DConditionModel`` state dict (NumPy arrays, any float dtype)
    to the ``params`` of ``UNetCondition(**unet2d_condition_config_from_diffusers(config))``.

    Returns a nested dict of float32 NumPy arrays. The result is checked by name and shape
    against that module (abstractly, via jax.eval_shape): unexpected, missing or mis-shaped
    tensors raise ValueError listing the diffusers keys (with both shapes for mismatches).
    """
    want = expected_param_shapes(unet2d_condition_config_from_diffusers(config))
    return convert_checked(
        state_dict, want, to_path=_our_path, to_key=_diffusers_key,
        header="convert_unet2d_condition_state_dict: state dict does not match the "
               "UNet2DConditionModel config:",
        reject_duplicates=False)  # two keys of one parameter (to_out.0 / to_out): the later wins


def load_unet2d_condition(folder: str, *, subfolder: Optional[str] = None,
                          variant: Optional[str] = None, dtype: Any = None, remat: bool = False,
                          attention_implementation: Optional[str] = None):
    """Load a diffusers ``UNet2DConditionModel`` folder (config.json + safetensors) ->
    ``(module, params)``.

    ``folder`` is a UNet folder, or a pipeline folder with ``subfolder="unet"``. ``dtype`` is the
    compute dtype (float32 by default, or jnp.bfloat16); params are float32 NumPy arrays.
    Missing folder / config / weights raise FileNotFoundError; ``.bin`` (pickle) weights are
    refused with a conversion hint; unsupported configs and mismatched tensors raise ValueError.
    """
    import jax.numpy as jnp

    from jaxdiff.nn.unet_cond import UNetCondition

    config, state_dict = read_diffusers_folder(folder, subfolder=subfolder, variant=variant)
    kwargs = unet2d_condition_config_from_diffusers(config)
    params = convert_unet2d_condition_state_dict(state_dict, config)
    module = UNetCondition(**kwargs, dtype=jnp.float32 if dtype is None else dtype, remat=remat,
                           attention_implementation=attention_implementation)
    return module, params


# ---------------------------------------------------------------------------------------------
# The way back: UNetCondition -> diffusers UNet2DConditionModel.

def _json_levels(v):
    return [int(e) for e in v] if isinstance(v, (list, tuple)) else int(v)


def unet2d_condition_config_to_diffusers(module: Any, sample_size: Optional[int] = None) -> dict:
    """The diffusers ``UNet2DConditionModel`` config dict of a
    :class:`~jaxdiff.nn.unet_cond.UNetCondition` (its fields; ``dtype``, ``remat`` and
    ``attention_implementation`` are how it computes, not what). ``sample_size``: the default
    latent height diffusers pipelines use (only a default; None leaves diffusers' 64).
    Inverse of :func:`unet2d_condition_config_from_diffusers`."""
    n = len(module.block_out_channels)
    cfg = dict(
        _class_name="UNet2DConditionModel",
        in_channels=int(module.in_channels),
        out_channels=int(module.out_channels),
        center_input_sample=False,
        flip_sin_to_cos=bool(module.flip_sin_to_cos),
        freq_shift=int(module.freq_shift),
        down_block_types=list(module.down_block_types),
        mid_block_type=module.mid_block_type,
        up_block_types=list(module.up_block_types),
        only_cross_attention=False,
        block_out_channels=[int(c) for c in module.block_out_channels],
        layers_per_block=_json_levels(module.layers_per_block),
        downsample_padding=int(module.downsample_padding),
        mid_block_scale_factor=1,
        dropout=float(module.dropout),
        act_fn="silu",
        norm_num_groups=int(module.norm_num_groups),
        norm_eps=float(module.norm_eps),
        cross_attention_dim=int(module.cross_attention_dim),
        transformer_layers_per_block=_json_levels(module.transformer_layers_per_block),
        attention_head_dim=_json_levels(module.attention_head_dim),
        use_linear_projection=bool(module.use_linear_projection),
        resnet_time_scale_shift="default",
        time_embedding_type="positional",
    )
    if sample_size is not None:
        cfg["sample_size"] = int(sample_size)
    for key in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim"):
        if isinstance(cfg[key], list) and len(cfg[key]) != n:
            raise ValueError(f"unet2d_condition_config_to_diffusers: {key}={cfg[key]} needs one "
                             f"entry per level ({n})")
    unet2d_condition_config_from_diffusers(cfg)  # what we write, we can read
    return cfg


def unet2d_condition_params_to_diffusers(params: Mapping, config: Mapping[str, Any]) -> dict:
    """UNetCondition params -> a diffusers ``UNet2DConditionModel`` state dict (float32 NumPy,
    torch layout: conv OIHW, Linear (out, in); 1x1-conv projections stay [C_out, C_in, 1, 1]).

    Checked by name and shape against ``config`` (the diffusers config dict) first: ValueError
    lists every missing, unexpected or mis-shaped parameter."""
    want = expected_param_shapes(unet2d_condition_config_from_diffusers(config))
    got = {p: tuple(np.shape(w)) for p, w in flatten_params(params).items()}
    missing, extra, shape = compare_shapes(got, want, {p: "/".join(p) for p in got},
                                           lambda p: "/".join(p))
    err = mismatch_error("unet2d_condition_params_to_diffusers: params do not match the "
                         "UNet2DConditionModel config:", missing=missing, unexpected=extra,
                         shape=shape)
    if err is not None:
        raise err
    return params_to_state_dict(params, _diffusers_key)
