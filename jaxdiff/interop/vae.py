"""diffusers ``AutoencoderKL`` <-> :class:`jaxdiff.nn.vae.AutoencoderKL` (config and weights).

    vae, params = load_diffusers_vae("stable-diffusion-v1-5", subfolder="vae")
    post = vae.apply({"params": params}, x_nhwc, method=AutoencoderKL.encode)

or, from arrays already in memory:

    kwargs = vae_config_from_diffusers(config)                  # AutoencoderKL keyword args
    params = vae_params_from_diffusers(state_dict, config)      # nested dict of float32 NumPy

Weights: conv OIHW -> HWIO, linear (out, in) -> (in, out), GroupNorm weight -> scale; diffusers'
``a.N.b`` becomes ``a_N/b`` and ``to_out.0`` becomes ``to_out``. Legacy attention names
(query/key/value/proj_attn) are accepted. Every diffusers tensor must be consumed by exactly one
parameter and every parameter must be filled, else ValueError names the diffusers keys.
No torch here.

The way back (export; :mod:`jaxdiff.interop.export` writes the folder):

    config = vae_config_to_diffusers(AutoencoderKL(...), sample_size=32, scaling_factor=0.9)
    state_dict = vae_params_to_diffusers(params, config)   # float32, torch layout
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np

from jaxdiff.interop._common import (abstract_param_shapes, compare_shapes, convert_checked,
                                     convert_leaf, diffusers_key_to_path, flatten_params, mismatch_error,
                                     params_to_state_dict, path_to_diffusers_key)
from jaxdiff.interop.safetensors_io import read_diffusers_folder

_KNOWN = {"in_channels", "out_channels", "down_block_types", "up_block_types",
          "block_out_channels", "layers_per_block", "act_fn", "latent_channels",
          "norm_num_groups", "sample_size", "scaling_factor", "shift_factor", "latents_mean",
          "latents_std", "force_upcast", "use_quant_conv", "use_post_quant_conv",
          "mid_block_add_attention"}
_NORMS = {"norm1", "norm2", "group_norm", "conv_norm_out"}
_INDEXED = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers")


def vae_config_from_diffusers(config: Mapping[str, Any]) -> dict:
    """Map a diffusers ``AutoencoderKL`` config dict to :class:`AutoencoderKL` keyword arguments.

    Supported: DownEncoderBlock2D / UpDecoderBlock2D blocks, SiLU, any block_out_channels /
    layers_per_block / latent_channels / norm_num_groups / in/out channels, with or without
    quant_conv / post_quant_conv / mid-block attention. ``scaling_factor`` and ``shift_factor``
    are carried over (pipelines apply them). ``sample_size`` and ``force_upcast`` (tiling and
    torch fp16 settings) are ignored. Anything else (other block types or activations,
    ``latents_mean``/``latents_std`` normalisation, unknown keys) raises ValueError naming it.
    """
    cfg = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    cls = config.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise ValueError(f"vae_config_from_diffusers: expected an AutoencoderKL config, got {cls}")
    unknown = sorted(set(cfg) - _KNOWN)
    if unknown:
        raise ValueError(f"vae_config_from_diffusers: unsupported config keys {unknown}")

    def err(msg):
        return ValueError(f"vae_config_from_diffusers: {msg}")

    boc = tuple(int(c) for c in cfg.get("block_out_channels", (64,)))
    if not boc:
        raise err("block_out_channels is empty")
    down = list(cfg.get("down_block_types", ("DownEncoderBlock2D",)))
    up = list(cfg.get("up_block_types", ("UpDecoderBlock2D",)))
    if not (len(down) == len(up) == len(boc)):
        raise err(f"block_out_channels, down_block_types and up_block_types differ in length "
                  f"({len(boc)}, {len(down)}, {len(up)})")
    bad = sorted({d for d in down if d != "DownEncoderBlock2D"}
                 | {u for u in up if u != "UpDecoderBlock2D"})
    if bad:
        raise err(f"unsupported block types {bad} (supported: DownEncoderBlock2D, "
                  "UpDecoderBlock2D)")
    act = cfg.get("act_fn", "silu")
    if act not in ("silu", "swish"):
        raise err(f"unsupported act_fn={act!r} (supported: 'silu')")
    for key in ("latents_mean", "latents_std"):
        if cfg.get(key) is not None:
            raise err(f"{key} (per-channel latent normalisation) is not supported")
    groups = cfg.get("norm_num_groups", 32)
    if groups is None:
        raise err("norm_num_groups=None is not supported")
    shift = cfg.get("shift_factor")
    return dict(
        in_channels=int(cfg.get("in_channels", 3)),
        out_channels=int(cfg.get("out_channels", 3)),
        block_out_channels=boc,
        layers_per_block=int(cfg.get("layers_per_block", 1)),
        latent_channels=int(cfg.get("latent_channels", 4)),
        norm_num_groups=int(groups),
        use_quant_conv=bool(cfg.get("use_quant_conv", True)),
        use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
        mid_block_add_attention=bool(cfg.get("mid_block_add_attention", True)),
        scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
        shift_factor=None if shift is None else float(shift),
    )


# ---------------------------------------------------------------------------------------------
# Weights.

def _our_path(key: str) -> Optional[tuple]:
    """diffusers key -> our parameter path (module names..., leaf name), or None; legacy
    attention names (attentions.N.query -> attentions_N/to_q, ...) are accepted."""
    return diffusers_key_to_path(key, indexed=_INDEXED, norms=_NORMS, legacy_attention=True)


def _diffusers_key(path: tuple) -> str:
    """Inverse of :func:`_our_path` (current names), for error messages."""
    return path_to_diffusers_key(path, indexed=_INDEXED)


def _infer_config(state_dict: Mapping[str, np.ndarray]) -> dict:
    """Shape-equivalent diffusers config read off the tensors (norm_num_groups is not in them)."""
    try:
        levels = sorted({int(m.group(1)) for k in state_dict
                         for m in [re.match(r"encoder\.down_blocks\.(\d+)\.", k)] if m})
        boc = [int(state_dict[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0])
               for i in levels]
        layers = len({m.group(1) for k in state_dict
                      for m in [re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k)] if m})
        cfg = dict(block_out_channels=boc, layers_per_block=layers,
                   down_block_types=["DownEncoderBlock2D"] * len(boc),
                   up_block_types=["UpDecoderBlock2D"] * len(boc),
                   in_channels=int(state_dict["encoder.conv_in.weight"].shape[1]),
                   out_channels=int(state_dict["decoder.conv_out.weight"].shape[0]),
                   latent_channels=int(state_dict["decoder.conv_in.weight"].shape[1]),
                   use_quant_conv="quant_conv.weight" in state_dict,
                   use_post_quant_conv="post_quant_conv.weight" in state_dict,
                   mid_block_add_attention=any(k.startswith("encoder.mid_block.attentions.")
                                               for k in state_dict))
    except (KeyError, IndexError) as e:
        raise ValueError(f"vae_params_from_diffusers: cannot infer the architecture from the "
                         f"state dict (missing {e}); pass config=") from None
    if not boc:
        raise ValueError("vae_params_from_diffusers: no encoder.down_blocks.* tensors: not an "
                         "AutoencoderKL state dict")
    cfg["norm_num_groups"] = math.gcd(*boc)  # any divisor gives the same shapes
    return cfg


def _expected_shapes(kwargs: dict) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxdiff.nn.vae import AutoencoderKL  # a lower room; imported lazily

    f = 2 ** (len(kwargs["block_out_channels"]) - 1)
    x = jax.ShapeDtypeStruct((1, f, f, kwargs["in_channels"]), jnp.float32)
    return abstract_param_shapes(AutoencoderKL(**kwargs), x)


def _convert(w: np.ndarray, leaf: str, want: tuple) -> np.ndarray:
    w = np.asarray(w, dtype=np.float32)
    if leaf == "kernel" and w.ndim == 4 and len(want) == 2 and w.shape[2:] == (1, 1):
        w = w[:, :, 0, 0]  # 1x1-conv attention weights
    return convert_leaf(w, leaf)


def vae_params_from_diffusers(state_dict: Mapping[str, np.ndarray],
                              config: Optional[Mapping[str, Any]] = None) -> dict:
    """Convert a diffusers ``AutoencoderKL`` state dict (NumPy arrays, any float dtype) to params.

    Returns the ``params`` collection as a nested dict of float32 NumPy arrays for
    ``AutoencoderKL(**vae_config_from_diffusers(config))``. The result is checked by name and
    shape against that module (abstractly, via jax.eval_shape); without ``config`` the
    architecture is inferred from the tensor shapes. Unexpected, missing, doubly-mapped or
    mis-shaped tensors raise ValueError listing the diffusers keys.
    """
    cfg = _infer_config(state_dict) if config is None else config
    kwargs = vae_config_from_diffusers(cfg)
    want = _expected_shapes(kwargs)
    return convert_checked(
        state_dict, want, to_path=_our_path, to_key=_diffusers_key, convert=_convert,
        header="vae_params_from_diffusers: state dict does not match the AutoencoderKL config:",
        reject_duplicates=True)


def load_diffusers_vae(folder: str, *, subfolder: Optional[str] = None,
                       variant: Optional[str] = None, dtype: Any = None,
                       remat: bool = False):
    """Load a diffusers ``AutoencoderKL`` folder (config.json + safetensors) -> (module, params).

    ``folder`` is a VAE folder, or a pipeline folder with ``subfolder="vae"``. ``dtype`` is the
    compute dtype (float32 by default, or jnp.bfloat16); params are always float32 NumPy arrays.
    Only safetensors is read: ``.bin`` (pickle) weights are refused with a conversion hint.
    """
    import jax.numpy as jnp

    from jaxdiff.nn.vae import AutoencoderKL

    config, state_dict = read_diffusers_folder(folder, subfolder=subfolder, variant=variant)
    kwargs = vae_config_from_diffusers(config)
    params = vae_params_from_diffusers(state_dict, config)
    module = AutoencoderKL(**kwargs, dtype=jnp.float32 if dtype is None else dtype, remat=remat)
    return module, params


# ---------------------------------------------------------------------------------------------
# The way back: our AutoencoderKL -> diffusers AutoencoderKL.

def vae_config_to_diffusers(module: Any, sample_size=None,
                            scaling_factor: Optional[float] = None) -> dict:
    """The diffusers ``AutoencoderKL`` config dict of a :class:`~jaxdiff.nn.vae.AutoencoderKL`.

    ``sample_size``: the image height the VAE was trained on (diffusers uses it only to tile
    large images; None leaves diffusers' default). ``scaling_factor``: the latent scale the
    diffusion model was trained with (a jaxdiff VAE run's ``scale_factor``: diffusion latents
    are ``scaling_factor * z``, diffusers' convention too); default the module's own field.
    Inverse of :func:`vae_config_from_diffusers`."""
    n = len(module.block_out_channels)
    sf = module.scaling_factor if scaling_factor is None else scaling_factor
    cfg = dict(
        _class_name="AutoencoderKL",
        in_channels=int(module.in_channels),
        out_channels=int(module.out_channels),
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=[int(c) for c in module.block_out_channels],
        layers_per_block=int(module.layers_per_block),
        act_fn="silu",
        latent_channels=int(module.latent_channels),
        norm_num_groups=int(module.norm_num_groups),
        scaling_factor=float(sf),
        shift_factor=None if module.shift_factor is None else float(module.shift_factor),
        use_quant_conv=bool(module.use_quant_conv),
        use_post_quant_conv=bool(module.use_post_quant_conv),
        mid_block_add_attention=bool(module.mid_block_add_attention),
    )
    if sample_size is not None:
        cfg["sample_size"] = int(sample_size)
    vae_config_from_diffusers(cfg)  # what we write, we can read
    return cfg


def vae_params_to_diffusers(params: Mapping, config: Mapping[str, Any]) -> dict:
    """AutoencoderKL params -> a diffusers ``AutoencoderKL`` state dict (float32 NumPy, torch
    layout, current attention names with Linear weights). Checked by name and shape against
    ``config`` first (ValueError lists every difference)."""
    want = _expected_shapes(vae_config_from_diffusers(config))
    got = {p: tuple(np.shape(w)) for p, w in flatten_params(params).items()}
    missing, extra, shape = compare_shapes(got, want, {p: "/".join(p) for p in got},
                                           lambda p: "/".join(p))
    err = mismatch_error("vae_params_to_diffusers: params do not match the AutoencoderKL "
                         "config:", missing=missing, unexpected=extra, shape=shape)
    if err is not None:
        raise err
    return params_to_state_dict(params, _diffusers_key)
