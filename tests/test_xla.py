"""jaxdiff.xla: the compiler options of jaxdiff's own jits, and ``xla.jit``.

The claim behind them (YNNPACK convolutions slower than XLA's own on this CPU) is a speed
measurement and lives in BENCHMARKS.md; here: which options are chosen when, that they reach the
compiled programs, and that the numbers stay right (a float64 NumPy convolution as reference)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import sampling, xla
from jaxdiff.schedules import make_schedule

OPT = "xla_cpu_experimental_ynn_fusion_type"


def _conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _conv_ref(x, w):
    """float64 NumPy 3x3 'SAME' convolution (cross-correlation), NHWC x HWIO."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    B, H, W, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((B, H, W, w.shape[-1]))
    for i in range(3):
        for j in range(3):
            out += np.einsum("bhwc,co->bhwo", xp[:, i:i + H, j:j + W], w[i, j])
    return out


def _inputs(seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    return (jax.random.normal(kx, (4, 16, 16, 32), jnp.float32),
            jax.random.normal(kw, (3, 3, 32, 32), jnp.float32) / 17.0)


def test_options_per_platform(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_llvm_disable_expensive_passes=true")
    assert xla.compiler_options("cpu") == xla.CPU_OPTIONS == {OPT: ""}
    assert xla.compiler_options("gpu") == {} and xla.compiler_options("tpu") == {}
    assert xla.compiler_options() == xla.compiler_options(jax.default_backend())
    xla.compiler_options("cpu")[OPT] = "changed"  # a copy: callers cannot change the defaults
    assert xla.compiler_options("cpu") == {OPT: ""}


def test_user_xla_flags_win(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", f"--{OPT}=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")
    assert xla.compiler_options("cpu") == {}


def test_unknown_option_is_dropped():
    assert xla._known(OPT, "")
    assert not xla._known("xla_cpu_no_such_option_in_any_jaxlib", "")


def test_jaxlib_default_uses_ynn_fusions_and_ours_do_not():
    """The premise: this jaxlib puts the convolution in a YNNPACK fusion unless told not to."""
    x, w = _inputs()
    default = jax.jit(_conv).lower(x, w).compile().as_text()
    ours = xla.jit(_conv).lower(x, w).compile().as_text()
    assert "__ynn_fusion" in default
    assert "__ynn_fusion" not in ours and "convolution(" in ours


def test_jit_matches_reference_and_jax_jit():
    x, w = _inputs(1)
    ref = _conv_ref(x, w)
    ours, default = xla.jit(_conv)(x, w), jax.jit(_conv)(x, w)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(default), rtol=0, atol=2e-5)
    # the filter gradient (the train step's costliest convolution), against float64:
    # d/dw sum(conv(x, w)^2) = sum over positions of patch(x) * 2 conv(x, w)
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    H, W = x.shape[1:3]
    g_ref = np.stack([np.stack([np.einsum("bhwc,bhwo->co", xp[:, i:i + H, j:j + W], 2 * ref)
                                for j in range(3)]) for i in range(3)])
    for jit in (xla.jit, jax.jit):
        g = jit(jax.grad(lambda w: jnp.sum(_conv(x, w) ** 2)))(w)
        assert np.max(np.abs(np.asarray(g) - g_ref)) / np.max(np.abs(g_ref)) < 5e-6  # 1024-term fp32 sums


def test_jit_decorator_forms_and_static_args():
    @functools.partial(xla.jit, static_argnames=("scale",))
    def f(x, *, scale):
        return x * scale

    @xla.jit
    def g(x):
        return x + 1

    assert float(f(jnp.float32(2.0), scale=3)) == 6.0 and float(g(jnp.float32(1.0))) == 2.0
    assert f.__name__ == "f" and g.__wrapped__(1) == 2
    n = f._cache_size()
    f(jnp.float32(5.0), scale=3)  # same shapes and statics: no new program
    assert f._cache_size() == n
    f(jnp.float32(5.0), scale=4)
    assert f._cache_size() == n + 1
    with pytest.raises(TypeError, match="compiler_options"):
        xla.jit(g, compiler_options={})
    # inside an outer trace it is a plain jax.jit (JAX refuses options on a nested jit)
    assert float(jax.jit(lambda x: g(x) * 2)(jnp.float32(1.0))) == 4.0
    assert float(jax.grad(lambda x: f(x, scale=3.0))(jnp.float32(1.0))) == 3.0
    np.testing.assert_array_equal(jax.vmap(g)(jnp.arange(3.0)), [1.0, 2.0, 3.0])


def test_sampler_loop_compiles_with_the_options(monkeypatch):
    """The samplers' one compiled loop is an ``xla.jit``: no YNNPACK fusion in its program."""
    x_T = jax.random.normal(jax.random.key(0), (4, 16, 16, 32))
    w = _inputs()[1]

    def model_fn(x, t, *, w):
        return _conv(x, w)

    calls = []
    get = xla._Jit._get

    def recording_get(self):
        f = get(self)

        def call(*args, **kwargs):
            calls.append((f, args, kwargs))
            return f(*args, **kwargs)
        return call

    monkeypatch.setattr(xla._Jit, "_get", recording_get)
    out = sampling.sample(model_fn, make_schedule("linear", 100), x_T, method="ddim", num_steps=3,
                          extra_args={"w": w})
    assert np.isfinite(np.asarray(out)).all() and len(calls) == 1
    f, args, kwargs = calls[0]
    text = f.lower(*args, **kwargs).compile().as_text()
    assert "convolution(" in text and "__ynn_fusion" not in text
