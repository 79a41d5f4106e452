"""State-dict helpers shared by the converters in :mod:`jaxdiff.interop`.

PyTorch state dicts name tensors ``"down_blocks.0.resnets.1.conv1.weight"``; our params are nested
dicts whose flattened paths are tuples such as ``("down_blocks_0", "resnets_1", "conv1",
"kernel")``. Here: flattening / filling nested params, the generic diffusers key <-> path mapping
(``a.N.b`` <-> ``a_N/b``, ``to_out.0`` <-> ``to_out``, legacy attention names), torch <-> Flax
kernel layouts (and :func:`params_to_state_dict`, the way back used by the exporters), the expected parameter shapes of a module (abstractly, via ``jax.eval_shape``),
and the checks that every tensor fills exactly one parameter of the right shape, with one
ValueError listing every missing, unexpected, doubly-mapped or mis-shaped key.

NumPy only at import time; jax is imported lazily.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional

import numpy as np

# diffusers' legacy attention tensor names (google/ddpm-* UNets, old VAEs) -> the current ones.
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


# ------------------------------------------------------------------------------ nested params
def flatten_params(tree: Mapping, prefix: tuple = ()) -> dict:
    """Nested dict -> {(k1, k2, ..., leaf): value}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten_params(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def set_param(tree: dict, path: tuple, value: Any) -> None:
    """``tree[path[0]][path[1]]...[path[-1]] = value``, creating the intermediate dicts."""
    node = tree
    for p in path[:-1]:
        node = node.setdefault(p, {})
    node[path[-1]] = value


def abstract_param_shapes(module: Any, *inputs: Any) -> dict:
    """{param path: shape} of ``module.init(key, *inputs)["params"]``, without allocating
    (``jax.eval_shape``; ``inputs`` may be ``jax.ShapeDtypeStruct``s)."""
    import jax

    tree = jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]
    return {p: tuple(v.shape) for p, v in flatten_params(tree).items()}


# ------------------------------------------------------------------------------ tensors
def torch_kernel_to_flax(w: np.ndarray) -> np.ndarray:
    """Conv OIHW -> HWIO (4-D), linear (out, in) -> (in, out) (2-D), as contiguous arrays;
    other ranks are returned unchanged."""
    if w.ndim == 4:
        return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))
    if w.ndim == 2:
        return np.ascontiguousarray(w.T)
    return w


def flax_kernel_to_torch(w: np.ndarray) -> np.ndarray:
    """Inverse of :func:`torch_kernel_to_flax`: conv HWIO -> OIHW (4-D), (in, out) -> (out, in)
    (2-D), as contiguous arrays; other ranks are returned unchanged."""
    w = np.asarray(w)
    if w.ndim == 4:
        return np.ascontiguousarray(np.transpose(w, (3, 2, 0, 1)))
    if w.ndim == 2:
        return np.ascontiguousarray(w.T)
    return np.ascontiguousarray(w)


def convert_leaf(w: np.ndarray, leaf: str) -> np.ndarray:
    """A torch tensor -> our float32 leaf: kernels re-laid out (:func:`torch_kernel_to_flax`),
    biases / scales / embeddings only cast."""
    w = np.asarray(w, dtype=np.float32)
    return torch_kernel_to_flax(w) if leaf == "kernel" else w


def torch_tensor_name(leaf: str) -> str:
    """Our leaf name -> the torch tensor name (kernel / scale / embedding -> weight)."""
    return {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)


def params_to_state_dict(params: Mapping, to_key: Callable[[tuple], str], *,
                         convert: Optional[Callable[[np.ndarray, tuple], np.ndarray]] = None,
                         dtype: Any = np.float32) -> dict:
    """Nested params -> a torch-layout state dict ``{key: contiguous np.ndarray}`` (the way back
    of :func:`convert_checked`).

    ``to_key(path)`` names each parameter (e.g. :func:`path_to_diffusers_key`); ``convert(w,
    path)`` makes the tensor (default: ``kernel`` leaves re-laid out by
    :func:`flax_kernel_to_torch`, every other leaf as is). Arrays are cast to ``dtype``
    (jax arrays are fetched to the host). Two paths naming one key raise ValueError.
    """
    out: dict = {}
    source: dict = {}
    for path, w in sorted(flatten_params(params).items()):
        key = to_key(path)
        if key in out:
            raise ValueError(f"params_to_state_dict: {'/'.join(source[key])} and {'/'.join(path)} "
                             f"both map to {key!r}")
        w = np.asarray(w)
        t = (convert(w, path) if convert is not None
             else flax_kernel_to_torch(w) if path[-1] == "kernel" else w)
        out[key] = np.ascontiguousarray(t, dtype=dtype)
        source[key] = path
    return out


# ------------------------------------------------------------------------------ names
def diffusers_key_to_path(key: str, *, indexed: Iterable[str], norms: Iterable[str],
                          legacy_attention: bool = False) -> Optional[tuple]:
    """diffusers key -> our parameter path (module names..., leaf name), or None.

    ``a.N`` becomes ``a_N`` for the module lists named in ``indexed`` (any other number makes
    the key unknown); ``to_out.0`` becomes ``to_out``. The leaf is ``bias``, ``scale`` for the
    modules named in ``norms``, else ``kernel``. With ``legacy_attention``, the legacy names of
    :data:`LEGACY_ATTENTION` directly under ``attentions.N`` are renamed (query -> to_q, ...).
    """
    *mods, tname = key.split(".")
    if tname not in ("weight", "bias") or not mods:
        return None
    out: list = []
    for i, part in enumerate(mods):
        if part.isdigit():
            if not out:
                return None
            if out[-1] == "to_out" and part == "0":
                continue
            if out[-1] not in indexed:
                return None
            out[-1] = f"{out[-1]}_{part}"
        elif (legacy_attention and part in LEGACY_ATTENTION and i >= 2
              and mods[i - 2] == "attentions"):  # attentions.N.query -> attentions_N/to_q
            out.append(LEGACY_ATTENTION[part].split(".")[0])
        else:
            out.append(part)
    leaf = "bias" if tname == "bias" else ("scale" if out[-1] in norms else "kernel")
    return tuple(out) + (leaf,)


def path_to_diffusers_key(path: tuple, *, indexed: Iterable[str]) -> str:
    """Inverse of :func:`diffusers_key_to_path` (current names): error messages and export."""
    *mods, leaf = path
    pattern = re.compile(r"(%s)_(\d+)" % "|".join(indexed))
    parts = []
    for m in mods:
        hit = pattern.fullmatch(m)
        parts.append(f"{hit.group(1)}.{hit.group(2)}" if hit else
                     ("to_out.0" if m == "to_out" else m))
    return ".".join(parts + [torch_tensor_name(leaf)])


# ------------------------------------------------------------------------------ checks
def check_fixed_options(cfg: Mapping[str, Any], fixed: Mapping[str, tuple], who: str) -> None:
    """Config keys we represent with one value only (``fixed``: key -> accepted values): any
    other value raises ValueError ``"<who>: unsupported key=value (supported: ...)"``."""
    for key, ok in fixed.items():
        if key in cfg and cfg[key] not in ok:
            raise ValueError(f"{who}: unsupported {key}={cfg[key]!r} (supported: {ok})")


def mismatch_error(header: str, *, missing: list = (), unexpected: list = (),
                   duplicates: list = (), shape: list = ()) -> Optional[ValueError]:
    """One ValueError listing every problem (lists used as given), or None if there is none."""
    if not (missing or unexpected or duplicates or shape):
        return None
    msg = [header]
    if missing:
        msg.append(f"missing keys: {missing}")
    if unexpected:
        msg.append(f"unexpected keys: {unexpected}")
    if duplicates:
        msg.append("keys mapping to the same parameter (legacy and current names?): "
                   f"{duplicates}")
    if shape:
        msg.append(f"shape mismatches: {shape}")
    return ValueError("\n".join(msg))


def compare_shapes(got: Mapping[tuple, tuple], want: Mapping[tuple, tuple],
                   source: Mapping[tuple, str],
                   to_key: Callable[[tuple], str]) -> tuple[list, list, list]:
    """Converted shapes ``got`` vs expected ``want`` (both path -> shape) -> sorted
    ``(missing, unexpected, shape mismatches)``, named by source keys (``source``: path -> key;
    ``to_key`` names the missing ones)."""
    missing = sorted(to_key(p) for p in want if p not in got)
    extra = sorted(source[p] for p in got if p not in want)
    bad = sorted(f"{source[p]}: converted {got[p]}, expected {want[p]}"
                 for p in got if p in want and got[p] != want[p])
    return missing, extra, bad


def convert_checked(state_dict: Mapping[str, np.ndarray], want: Mapping[tuple, tuple], *,
                    to_path: Callable[[str], Optional[tuple]],
                    to_key: Callable[[tuple], str], header: str, reject_duplicates: bool,
                    convert: Optional[Callable[[np.ndarray, str, tuple], np.ndarray]] = None
                    ) -> dict:
    """State dict -> nested params, every tensor checked against ``want`` (path -> shape).

    ``to_path`` maps a key to our path (None: unknown); ``convert(w, leaf, wanted_shape)``
    makes the leaf (default :func:`convert_leaf`). Keys that map nowhere or to a path not in
    ``want``, paths no key fills (named by ``to_key``), converted shapes differing from
    ``want`` and, with ``reject_duplicates``, two keys mapping to one path (otherwise the later
    one wins) raise one ValueError starting with ``header`` and listing them all.
    """
    params: dict = {}
    source: dict = {}
    unexpected, dup, shape = [], [], []
    for key in state_dict:
        path = to_path(key)
        if path is None or path not in want:
            unexpected.append(key)
            continue
        if reject_duplicates and path in source:
            dup.append(f"{source[path]!r} and {key!r}")
            continue
        source[path] = key
        w = (convert(state_dict[key], path[-1], want[path]) if convert is not None
             else convert_leaf(state_dict[key], path[-1]))
        if tuple(w.shape) != want[path]:
            shape.append(f"{key}: {tuple(np.shape(state_dict[key]))} converts to "
                         f"{tuple(w.shape)}, expected {want[path]}")
            continue
        set_param(params, path, w)
    missing = sorted(to_key(p) for p in want if p not in source)
    err = mismatch_error(header, missing=missing, unexpected=sorted(unexpected),
                         duplicates=dup, shape=shape)
    if err is not None:
        raise err
    return params
