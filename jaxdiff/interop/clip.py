"""transformers ``CLIPTextModel`` <-> :class:`jaxdiff.nn.text.CLIPTextTransformer`.

    module, params = load_transformers_clip_text("stable-diffusion-v1-5/text_encoder")
    last, pooled = module.apply({"params": params}, input_ids, attention_mask)

Weights: Linear (out, in) -> kernel (in, out); LayerNorm weight -> scale; Embedding weight ->
embedding. Keys may carry the ``text_model.`` prefix (transformers 4.x, SD folders) or not
(transformers 5.x). The ``embeddings.position_ids`` buffer is ignored. NumPy only: weights are
read with safetensors (any float dtype, bf16 included, converted to float32); pickled ``.bin``
checkpoints are refused.

The way back (export; :mod:`jaxdiff.interop.export` writes the folder): the module has
transformers' architecture exactly (pre-LN causal blocks, key-padding mask, pooling at the
first eos id, or argmax of ids for ``eos_token_id == 2``), so

    config = clip_text_config_to_transformers(module, bos_token_id=..., pad_token_id=...)
    state_dict = clip_text_params_to_transformers(params)   # "text_model."-prefixed keys
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np

from jaxdiff.interop._common import (compare_shapes, flatten_params, mismatch_error,
                                     params_to_state_dict, set_param, torch_kernel_to_flax,
                                     torch_tensor_name)

_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=8, max_position_embeddings=77, layer_norm_eps=1e-5,
                 hidden_act="quick_gelu", eos_token_id=49407)  # transformers' CLIPTextConfig
_ACTS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh")
_IGNORED = {"text_model.embeddings.position_ids", "embeddings.position_ids"}


def clip_text_config_from_transformers(config: Mapping[str, Any]) -> dict:
    """A transformers ``CLIPTextConfig`` dict (config.json) -> CLIPTextTransformer kwargs.

    Missing keys take transformers' defaults. Only the text model is supported: a full
    ``CLIPModel`` config (model_type 'clip') raises, as does an unsupported ``hidden_act``.
    Dropout settings are ignored (the module is inference-only).
    """
    cfg = dict(config)
    model_type = cfg.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
        raise ValueError(f"clip_text_config_from_transformers: expected model_type "
                         f"'clip_text_model' (a CLIPTextModel config), got {model_type!r}")
    get = lambda k: cfg.get(k) if cfg.get(k) is not None else _DEFAULTS[k]  # noqa: E731
    act = get("hidden_act")
    if act not in _ACTS:
        raise ValueError(f"clip_text_config_from_transformers: unsupported hidden_act={act!r} "
                         f"(supported: {_ACTS})")
    eos = get("eos_token_id")
    if isinstance(eos, (list, tuple)):
        if len(eos) != 1:
            raise ValueError(f"clip_text_config_from_transformers: eos_token_id={eos}: only a "
                             "single end-of-text id is supported")
        eos = eos[0]
    hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
    if hidden % heads:
        raise ValueError(f"clip_text_config_from_transformers: hidden_size={hidden} is not "
                         f"divisible by num_attention_heads={heads}")
    return dict(vocab_size=int(get("vocab_size")), hidden_size=hidden,
                intermediate_size=int(get("intermediate_size")),
                num_layers=int(get("num_hidden_layers")), num_heads=heads,
                max_position_embeddings=int(get("max_position_embeddings")),
                layer_norm_eps=float(get("layer_norm_eps")), hidden_act=act,
                eos_token_id=int(eos))


# transformers module name (no prefix, no .weight/.bias) -> our module path
_LAYER_RE = re.compile(r"encoder\.layers\.(\d+)\.(layer_norm1|layer_norm2|mlp\.fc1|mlp\.fc2|"
                       r"self_attn\.q_proj|self_attn\.k_proj|self_attn\.v_proj|"
                       r"self_attn\.out_proj)")
_TOP = {"embeddings.token_embedding": ("token_embedding",),
        "embeddings.position_embedding": ("position_embedding",),
        "final_layer_norm": ("final_layer_norm",)}


def _module_path(module: str) -> Optional[tuple]:
    if module in _TOP:
        return _TOP[module]
    m = _LAYER_RE.fullmatch(module)
    if m:
        return (f"layers_{m.group(1)}", *m.group(2).split("."))
    return None


def _torch_name(path: tuple) -> str:
    """Our param path -> transformers key (unprefixed), for error messages."""
    *mods, leaf = path
    tname = torch_tensor_name(leaf)
    if mods[0].startswith("layers_"):
        return ".".join(["encoder.layers", mods[0][7:], *mods[1:], tname])
    inv = {v[0]: k for k, v in _TOP.items()}
    return f"{inv[mods[0]]}.{tname}"


def _expected_shapes(kw: Mapping[str, Any]) -> dict:
    d, f, v, p = kw["hidden_size"], kw["intermediate_size"], kw["vocab_size"], \
        kw["max_position_embeddings"]
    out = {("token_embedding", "embedding"): (v, d), ("position_embedding", "embedding"): (p, d),
           ("final_layer_norm", "scale"): (d,), ("final_layer_norm", "bias"): (d,)}
    for i in range(kw["num_layers"]):
        lay = f"layers_{i}"
        for ln in ("layer_norm1", "layer_norm2"):
            out[(lay, ln, "scale")] = (d,)
            out[(lay, ln, "bias")] = (d,)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[(lay, "self_attn", proj, "kernel")] = (d, d)
            out[(lay, "self_attn", proj, "bias")] = (d,)
        out[(lay, "mlp", "fc1", "kernel")] = (d, f)
        out[(lay, "mlp", "fc1", "bias")] = (f,)
        out[(lay, "mlp", "fc2", "kernel")] = (f, d)
        out[(lay, "mlp", "fc2", "bias")] = (d,)
    return out


def _infer_dims(params_flat: Mapping[tuple, np.ndarray]) -> dict:
    """Sizes implied by the converted tensors (used when no config is given)."""
    def shape(path, axis, default=0):
        w = params_flat.get(path)
        return int(w.shape[axis]) if w is not None and w.ndim > axis else default
    layers = {int(p[0][7:]) for p in params_flat if p[0].startswith("layers_")}
    return dict(vocab_size=shape(("token_embedding", "embedding"), 0),
                hidden_size=shape(("token_embedding", "embedding"), 1),
                max_position_embeddings=shape(("position_embedding", "embedding"), 0),
                intermediate_size=max((shape((f"layers_{i}", "mlp", "fc1", "kernel"), 1)
                                       for i in layers), default=0),
                num_layers=max(layers) + 1 if layers else 0)


def clip_text_params_from_transformers(state_dict: Mapping[str, np.ndarray],
                                       config: Optional[Mapping[str, Any]] = None) -> dict:
    """Convert a ``CLIPTextModel`` state dict (NumPy arrays) to CLIPTextTransformer params.

    Returns the ``params`` collection as a nested dict of float32 NumPy arrays. Every key must
    map to exactly one parameter (with or without the ``text_model.`` prefix; both spellings of
    one tensor raise); ``position_ids`` buffers are skipped. The result is checked by name and
    shape against the sizes in ``config`` (the config.json dict), or, without it, against the
    sizes the tensors themselves imply (vocab, width, layers, MLP width), so missing, unexpected
    and mis-shaped tensors all raise ValueError naming the transformers keys.
    """
    params: dict = {}
    flat: dict = {}
    source: dict = {}
    unexpected = []
    for key in state_dict:
        if key in _IGNORED:
            continue
        name = key[len("text_model."):] if key.startswith("text_model.") else key
        module, _, tname = name.rpartition(".")
        path = _module_path(module)
        if path is None or tname not in ("weight", "bias"):
            unexpected.append(key)
            continue
        w = np.asarray(state_dict[key], dtype=np.float32)
        if tname == "bias":
            leaf = "bias"
        elif path[-1].startswith(("layer_norm", "final_layer_norm")):
            leaf = "scale"
        elif path[-1].endswith("embedding"):
            leaf = "embedding"
        else:
            leaf = "kernel"
            if w.ndim != 2:
                raise ValueError(f"clip_text_params_from_transformers: {key!r} has shape "
                                 f"{w.shape}, expected a 2-D Linear weight")
            w = torch_kernel_to_flax(w)  # (out, in) -> (in, out)
        full = path + (leaf,)
        if full in source:
            raise ValueError(f"clip_text_params_from_transformers: {key!r} and {source[full]!r} "
                             "map to the same parameter (prefixed and unprefixed copies?)")
        source[full] = key
        flat[full] = w
    if unexpected:
        hint = (" (text_projection: a CLIPTextModelWithProjection; vision_model: a full "
                "CLIPModel; only the CLIPTextModel weights are converted)"
                if any(k.startswith(("text_projection", "vision_model", "visual_projection",
                                     "logit_scale")) for k in unexpected) else "")
        raise ValueError("clip_text_params_from_transformers: unexpected keys (not part of a "
                         f"CLIPTextModel): {sorted(unexpected)}{hint}")

    if config is not None:
        kw = clip_text_config_from_transformers(config)
    else:
        kw = _infer_dims(flat)
    want = _expected_shapes(kw)
    got = {p: tuple(w.shape) for p, w in flat.items()}
    missing, extra, bad = compare_shapes(got, want, source, _torch_name)
    err = mismatch_error(
        "clip_text_params_from_transformers: state dict does not match "
        + ("the config:" if config is not None else "itself (sizes inferred from "
           "token_embedding / position_embedding / fc1 / layer count):"),
        missing=missing, unexpected=extra, shape=bad)
    if err is not None:
        raise err

    for path, w in flat.items():
        set_param(params, path, w)
    return params


def _read_safetensors(folder: str) -> dict:
    from safetensors.numpy import load_file

    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            shards = sorted(set(json.load(fh)["weight_map"].values()))
        out: dict = {}
        for shard in shards:
            path = os.path.join(folder, shard)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"load_transformers_clip_text: shard {path} listed in "
                                        f"{index} is missing")
            part = load_file(path)
            dup = set(part) & set(out)
            if dup:
                raise ValueError(f"load_transformers_clip_text: keys repeated across shards: "
                                 f"{sorted(dup)}")
            out.update(part)
        return out
    bins = sorted(f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
    if bins:
        raise ValueError(f"load_transformers_clip_text: {folder} holds only pickled weights "
                         f"({', '.join(bins)}); pickle is never loaded. Convert them to "
                         "model.safetensors first, e.g. in a trusted environment: "
                         "CLIPTextModel.from_pretrained(folder).save_pretrained(folder, "
                         "safe_serialization=True)")
    raise FileNotFoundError(f"load_transformers_clip_text: no model.safetensors (or "
                            f"model.safetensors.index.json) in {folder}")


def load_transformers_clip_text(folder: str, dtype: Any = None,
                                implementation: Optional[str] = None):
    """Load a transformers ``CLIPTextModel`` folder (config.json + model.safetensors, or a
    sharded index) -> ``(CLIPTextTransformer, params)``. ``dtype`` is the compute dtype
    (default float32); params are always float32."""
    import jax.numpy as jnp

    from jaxdiff.nn.text import CLIPTextTransformer  # a lower room; imported lazily

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"load_transformers_clip_text: folder {folder} not found")
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"load_transformers_clip_text: {cfg_path} not found (a "
                                "CLIPTextModel folder has config.json + model.safetensors)")
    with open(cfg_path, encoding="utf-8") as fh:
        config = json.load(fh)
    kwargs = clip_text_config_from_transformers(config)
    params = clip_text_params_from_transformers(_read_safetensors(folder), config=config)
    module = CLIPTextTransformer(**kwargs, dtype=jnp.float32 if dtype is None else dtype,
                                 implementation=implementation)
    return module, params


# ---------------------------------------------------------------------------------------------
# The way back: CLIPTextTransformer -> transformers CLIPTextModel.

def clip_text_config_to_transformers(module: Any, *, bos_token_id: int,
                                     pad_token_id: int) -> dict:
    """The transformers ``CLIPTextConfig`` dict (config.json of a ``CLIPTextModel`` folder) of
    a :class:`~jaxdiff.nn.text.CLIPTextTransformer`; the token ids come from its tokenizer
    (``eos_token_id`` is the module's own: it picks the pooled position).
    Inverse of :func:`clip_text_config_from_transformers`."""
    cfg = dict(
        architectures=["CLIPTextModel"],
        model_type="clip_text_model",
        vocab_size=int(module.vocab_size),
        hidden_size=int(module.hidden_size),
        intermediate_size=int(module.intermediate_size),
        num_hidden_layers=int(module.num_layers),
        num_attention_heads=int(module.num_heads),
        max_position_embeddings=int(module.max_position_embeddings),
        hidden_act=str(module.hidden_act),
        layer_norm_eps=float(module.layer_norm_eps),
        attention_dropout=0.0,
        bos_token_id=int(bos_token_id),
        eos_token_id=int(module.eos_token_id),
        pad_token_id=int(pad_token_id),
        torch_dtype="float32",
    )
    clip_text_config_from_transformers(cfg)  # what we write, we can read
    return cfg


def clip_text_params_to_transformers(params: Mapping, config: Optional[Mapping[str, Any]] = None,
                                     *, prefix: str = "text_model.") -> dict:
    """CLIPTextTransformer params -> a ``CLIPTextModel`` state dict (float32 NumPy, Linear
    weights (out, in)), keys with ``prefix`` (``"text_model."``: the layout of Stable Diffusion
    folders, which transformers 4.x and 5.x both load; ``""``: transformers 5's own).

    With ``config`` (the config.json dict) the params are checked by name and shape against it
    first (ValueError lists every difference)."""
    if config is not None:
        want = _expected_shapes(clip_text_config_from_transformers(config))
        got = {p: tuple(np.shape(w)) for p, w in flatten_params(params).items()}
        missing, extra, bad = compare_shapes(got, want, {p: "/".join(p) for p in got},
                                             lambda p: "/".join(p))
        err = mismatch_error("clip_text_params_to_transformers: params do not match the "
                             "config:", missing=missing, unexpected=extra, shape=bad)
        if err is not None:
            raise err
    return params_to_state_dict(params, lambda p: prefix + _torch_name(p))
