"""The XLA compiler options jaxdiff compiles its programs with, and a ``jit`` that applies them.

One option, for the CPU only: jaxlib 0.10 sends CPU dots, convolutions and reductions to YNNPACK
library fusions by default (``xla_cpu_experimental_ynn_fusion_type=INDIVIDUAL_DOT,
INDIVIDUAL_CONVOLUTION,REDUCE``). For a diffusion U-Net's 3x3 convolutions that path is
1.2-1.7x slower than XLA's own (Eigen) convolutions on the AVX2 CPU we measured (2-core AMD EPYC,
BENCHMARKS.md, jaxlib's default -> these options, interleaved in one run: the small U-Net's
train step at batch 4 139.8 -> 113.9 ms, its forward 47.1 -> 28.1 ms; at batch 16 678.9 -> 390.1
ms and 181.6 -> 112.0 ms; the cross-attention U-Net's train step 277.5 -> 263.7 ms). So jaxdiff's own ``jax.jit`` calls (the train loop's step, the samplers' loop, the
the VAE's encode/decode, the evaluation networks, the Stable Diffusion pipeline) compile with
the YNNPACK fusions off on the CPU::

    >>> jaxdiff.xla.compiler_options("cpu")
    {'xla_cpu_experimental_ynn_fusion_type': ''}

and with nothing changed on GPU/TPU (``{}``). The fp32 numerics are the usual XLA:CPU ones (the
same float32 arithmetic, another summation order: outputs differ in the last bits).

Your own ``jax.jit`` of a jaxdiff function (``make_train_step``, a model's ``apply``) gets the
same speed with ``jax.jit(fn, compiler_options=jaxdiff.xla.compiler_options())`` or
``jaxdiff.xla.jit(fn)``. To keep jaxlib's defaults (or choose other fusions), set the option
yourself: any ``xla_cpu_experimental_ynn_fusion_type`` in ``XLA_FLAGS`` wins, and jaxdiff then
passes no option, e.g.::

    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,\
LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,LIBRARY_FUSION_TYPE_REDUCE python -m experiments.train

A jaxlib that does not know the option (older or newer than 0.10) gets no option either (probed
once by compiling a one-op program).
"""
from __future__ import annotations

import functools
import os
import types
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

# Read-only: compiler_options() caches what it derives from it.
CPU_OPTIONS: Mapping[str, Any] = types.MappingProxyType({"xla_cpu_experimental_ynn_fusion_type": ""})

__all__ = ["CPU_OPTIONS", "compiler_options", "jit"]


def compiler_options(platform: str | None = None) -> dict[str, Any]:
    """The options for programs compiled for ``platform`` ("cpu", "gpu", "tpu"; default: JAX's
    default backend): :data:`CPU_OPTIONS` on the CPU unless ``XLA_FLAGS`` sets them or the
    installed jaxlib does not know them, else ``{}``. A new dict each call."""
    platform = platform or jax.default_backend()
    return dict(_options(platform, os.environ.get("XLA_FLAGS", "")))


@functools.lru_cache(maxsize=None)
def _options(platform: str, xla_flags: str) -> tuple:
    if platform != "cpu":
        return ()
    return tuple((k, v) for k, v in CPU_OPTIONS.items()
                 if f"--{k}" not in xla_flags and _known(k, v))


@functools.lru_cache(maxsize=None)
def _known(name: str, value: Any) -> bool:
    try:
        x = jax.device_put(jnp.float32(0), jax.devices("cpu")[0])
        jax.jit(lambda x: x + 1).lower(x).compile({name: value})
    except Exception:  # "No such compile option" (or a value this jaxlib rejects)
        return False
    return True


try:  # whether we are outside any JAX trace (jit, grad, vmap, ...): JAX accepts compiler options
    # only on a top-level jax.jit; a nested call runs inside the outer program instead
    from jax._src.core import trace_state_clean as _top_level
except ImportError:  # pragma: no cover - a JAX without it: assume top level
    def _top_level() -> bool:
        return True


class _Jit:
    """``jax.jit(fun, **jit_kwargs)`` compiled with ``compiler_options()`` of the backend in use
    at call time (resolved per call; the jitted function is built once per option set). Called
    inside another trace (an outer jit, grad, vmap) it is a plain ``jax.jit``: the outer
    program's options apply."""

    def __init__(self, fun: Callable, jit_kwargs: dict):
        if "compiler_options" in jit_kwargs:
            raise TypeError("jaxdiff.xla.jit chooses compiler_options itself; use jax.jit to pass your own.")
        self._fun, self._kwargs, self._jitted = fun, jit_kwargs, {}
        functools.update_wrapper(self, fun)

    def _get(self):
        key = _options(jax.default_backend(), os.environ.get("XLA_FLAGS", "")) if _top_level() else ()
        f = self._jitted.get(key)
        if f is None:
            f = self._jitted[key] = jax.jit(self._fun, compiler_options=dict(key) or None, **self._kwargs)
        return f

    def __call__(self, *args, **kwargs):
        return self._get()(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self._get().lower(*args, **kwargs)

    def eval_shape(self, *args, **kwargs):
        return self._get().eval_shape(*args, **kwargs)

    def _cache_size(self) -> int:
        """Compiled-program cache entries over all option sets (as ``jax.jit``'s; for retrace tests)."""
        return sum(f._cache_size() for f in self._jitted.values())

    def clear_cache(self) -> None:
        for f in self._jitted.values():
            f.clear_cache()


def jit(fun: Callable | None = None, **jit_kwargs):
    """``jax.jit`` with jaxdiff's :func:`compiler_options`; usable as ``@jit`` or
    ``@functools.partial(jit, static_argnames=...)``. Inside an outer ``jax.jit`` it traces like
    any jitted function (the outer program's options apply)."""
    if fun is None:
        return functools.partial(jit, **jit_kwargs)
    return _Jit(fun, jit_kwargs)
