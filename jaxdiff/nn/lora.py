"""LoRA (low-rank adapters) as pure functions over a params tree; no module changes.

    lora = init_lora(key, params, rank=4)                       # params: UNetCondition params
    eps = unet.apply({"params": merge(params, lora, alpha=4.0, rank=4)}, z, t, ctx, mask)
    grads = jax.grad(lambda l: loss(merge(base, l, alpha=4.0, rank=4)))(lora)   # base frozen

A target is a Dense layer named as diffusers / peft name modules (``to_q``, ``to_out.0``,
``ff.net.0.proj``): a module matches a target when its diffusers name equals the target or ends
with ``"." + target`` (peft's rule). Its kernel W [in, out] (our layout, torch's weight is
[out, in]) becomes

    W' = W + (alpha / rank) * down @ up          down: [in, rank], up: [rank, out]

``down`` is peft's ``lora_A.weight`` transposed, ``up`` is ``lora_B.weight`` transposed.

lora_params mirrors the params tree down to each target module, with ``{"down", "up"}`` in
place of the module's ``{"kernel", "bias"}``; e.g. for SD's U-Net

    {"down_blocks_0": {"attentions_0": {"transformer_blocks_0": {"attn1": {
        "to_q": {"down": f32[320, r], "up": f32[r, 320]}, "to_k": ..., "to_v": ...,
        "to_out": {"down": f32[320, r], "up": f32[r, 320]}}, "attn2": ...}}}, ...}

(``to_out`` is diffusers' ``to_out.0``). It is a plain pytree: optax, Orbax and jax.tree work
on it. Initialisation as peft's: ``down`` kaiming-uniform with a = sqrt(5), i.e.
U(-1/sqrt(in), 1/sqrt(in)), and ``up`` zeros, so step 0 computes the base model.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# diffusers' examples/text_to_image/train_text_to_image_lora.py: LoraConfig(target_modules=...).
DEFAULT_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


def _target_parts(target: str) -> tuple:
    """A diffusers / peft module name -> our module path components (``a.N`` -> ``a_N``,
    ``to_out.0`` -> ``to_out``): ``"ff.net.0.proj"`` -> ``("ff", "net_0", "proj")``."""
    out: list = []
    for part in target.split("."):
        if part.isdigit() and out:
            if not (out[-1] == "to_out" and part == "0"):
                out[-1] = f"{out[-1]}_{part}"
        elif part:
            out.append(part)
        else:
            raise ValueError(f"LoRA target {target!r} is not a module name")
    if not out or out[0].isdigit():
        raise ValueError(f"LoRA target {target!r} is not a module name")
    return tuple(out)


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def lora_targets(params: Mapping, targets: Sequence[str] = DEFAULT_TARGETS) -> list[tuple]:
    """Paths (in ``params``) of the kernels of the Dense layers named by ``targets``, sorted.

    params: a nested params dict (arrays or ``jax.ShapeDtypeStruct``s). Each path ends in
    ``"kernel"``, e.g. ``("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn1",
    "to_q", "kernel")``. A target that matches no module, or matches a kernel that is not 2-D (a
    1x1-conv ``proj_in``), raises ValueError.
    """
    if isinstance(targets, str):
        targets = (targets,)
    wanted = {t: _target_parts(t) for t in targets}
    found: dict = {t: [] for t in wanted}
    for path, leaf in _flatten(params).items():
        if path[-1] != "kernel":
            continue
        module = path[:-1]
        for t, parts in wanted.items():
            if module[-len(parts):] == parts:
                if len(np.shape(leaf)) != 2:
                    raise ValueError(f"LoRA target {t!r} matches {'/'.join(path)} of shape "
                                     f"{tuple(np.shape(leaf))}: only Dense ([in, out]) kernels "
                                     "are supported")
                found[t].append(path)
    missing = [t for t, paths in found.items() if not paths]
    if missing:
        raise ValueError(f"LoRA targets {missing} match no Dense layer of the params")
    return sorted({p for paths in found.values() for p in paths})


def lora_scale(alpha: float, rank: int) -> float:
    """The factor alpha / rank applied to ``down @ up`` (peft's ``lora_alpha / r``)."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    return alpha / rank


def _set(tree: dict, path: tuple, value: Any) -> None:
    node = tree
    for p in path[:-1]:
        node = node.setdefault(p, {})
    node[path[-1]] = value


def init_lora(key: jax.Array, params: Mapping, *, rank: int,
              targets: Sequence[str] = DEFAULT_TARGETS, dtype: Any = jnp.float32) -> dict:
    """Fresh adapters for the ``targets`` of ``params`` (see :func:`lora_targets`).

    Per target module with kernel [in, out]: ``down`` [in, rank] ~ U(-1/sqrt(in), 1/sqrt(in))
    (peft's kaiming_uniform_(a=sqrt(5)) of lora_A [rank, in]), ``up`` [rank, out] zeros. Target
    i (in sorted path order) draws from ``jax.random.split(key, n)[i]``; nothing else is random.
    Returns the nested lora_params dict (module docstring) of ``dtype`` arrays.
    """
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    paths = lora_targets(params, targets)
    flat = _flatten(params)
    keys = jax.random.split(key, len(paths))
    out: dict = {}
    for k, path in zip(keys, paths):
        d_in, d_out = np.shape(flat[path])
        bound = 1.0 / np.sqrt(d_in)
        down = jax.random.uniform(k, (d_in, rank), dtype, -bound, bound)
        _set(out, path[:-1], {"down": down, "up": jnp.zeros((rank, d_out), dtype)})
    return out


def _is_adapter(node: Any) -> bool:
    return isinstance(node, Mapping) and set(node) == {"down", "up"}


def lora_paths(lora_params: Mapping) -> list[tuple]:
    """The module paths (without ``"kernel"``) that ``lora_params`` adapts, sorted."""
    out = []

    def walk(node, prefix):
        for k, v in node.items():
            if _is_adapter(v):
                out.append(prefix + (k,))
            elif isinstance(v, Mapping):
                walk(v, prefix + (k,))
            else:
                raise ValueError(f"lora_params: unexpected leaf {'/'.join(prefix + (k,))} "
                                 "(adapters are {'down', 'up'} dicts)")

    walk(lora_params, ())
    return sorted(out)


def delta(down: jax.Array, up: jax.Array, scale: Any) -> jax.Array:
    """scale * down @ up: [in, rank] x [rank, out] -> [in, out], float32 at full precision."""
    d = jnp.matmul(down.astype(jnp.float32), up.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
    return scale * d


def merge(params: Mapping, lora_params: Mapping, *, alpha: float, rank: int) -> dict:
    """params with every adapted kernel replaced by W + (alpha / rank) * down @ up.

    Pure and jit-able; differentiable w.r.t. ``lora_params`` (and ``params``). The result is a
    new nested dict; every leaf that is not an adapted kernel is the same object as in
    ``params``. The kernel keeps its dtype (the update is computed in float32). Each adapter's
    shapes are checked against its kernel and ``rank`` (ValueError naming the module).
    """
    scale = lora_scale(alpha, rank)

    def walk(p, l, prefix):
        if not isinstance(p, Mapping):
            raise ValueError(f"merge: {'/'.join(prefix)} is not a module of params")
        out = dict(p)
        for k, v in l.items():
            where = prefix + (k,)
            if k not in p:
                raise ValueError(f"merge: lora_params has {'/'.join(where)}, params does not")
            if _is_adapter(v):
                w = p[k].get("kernel") if isinstance(p[k], Mapping) else None
                if w is None or np.ndim(w) != 2:
                    raise ValueError(f"merge: {'/'.join(where)} has no Dense kernel to adapt")
                want = ((w.shape[0], rank), (rank, w.shape[1]))
                got = (tuple(np.shape(v["down"])), tuple(np.shape(v["up"])))
                if got != want:
                    raise ValueError(f"merge: {'/'.join(where)}: down/up shapes {got}, expected "
                                     f"{want} for kernel {tuple(w.shape)} and rank {rank}")
                out[k] = dict(p[k], kernel=(w + delta(v["down"], v["up"], scale)).astype(w.dtype))
            elif isinstance(v, Mapping):
                out[k] = walk(p[k], v, where)
            else:
                raise ValueError(f"merge: unexpected lora_params leaf {'/'.join(where)}")
        return out

    return walk(params, lora_params, ())


def count_lora_params(lora_params: Mapping) -> int:
    """Number of scalars in the adapters (sum over targets of rank * (in + out))."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(lora_params)))


def lora_nbytes(lora_params: Mapping) -> int:
    """Bytes of the adapter arrays (works on ``jax.ShapeDtypeStruct`` trees too)."""
    return int(sum(np.prod(np.shape(x)) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(lora_params)))
