"""Exactness of the CPU-speed kernels (``jaxdiff.nn.kernels``) against the functions they replace:
jax's bernoulli and flax's Dropout, flax's GroupNorm (+ SiLU) and autodiff, and nearest x2
upsampling followed by a 3x3 convolution."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.nn.kernels import bernoulli, group_norm_silu, upsample_conv3x3
from jaxdiff.nn.layers import Dropout

FAST_COMPILE = {"xla_llvm_disable_expensive_passes": True, "xla_backend_optimization_level": 0}


def _compile(fn, *args):
    return jax.jit(fn).lower(*args).compile(FAST_COMPILE)


def test_dropout_masks_equal_jax_and_flax():
    for shape in [(2, 8, 8, 16), (3, 5, 7)]:
        key = jax.random.key(0)
        ours = _compile(lambda k: bernoulli(k, 0.9, shape), key)
        ref = _compile(lambda k: jax.random.bernoulli(k, 0.9, shape), key)
        for seed in range(3):
            key = jax.random.key(seed)
            np.testing.assert_array_equal(ours(key), ref(key))
    for key in (jax.random.key(0, impl="rbg"), jax.random.PRNGKey(3)):  # fallback / raw keys
        got = _compile(lambda k: bernoulli(k, 0.7, (5, 6)), key)(key)
        np.testing.assert_array_equal(got, jax.random.bernoulli(key, 0.7, (5, 6)))

    class Net(nn.Module):
        cls: type

        @nn.compact
        def __call__(self, x):
            return self.cls(0.3, deterministic=False)(x)

    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 16))
    key = jax.random.key(5)
    apply = lambda cls: _compile(lambda x, k: Net(cls).apply({}, x, rngs={"dropout": k}), x, key)  # noqa: E731
    np.testing.assert_array_equal(apply(Dropout)(x, key), apply(nn.Dropout)(x, key))
    assert Dropout(0.3, deterministic=True).apply({}, x) is x


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_group_norm_silu_matches_flax_and_autodiff(silu, dtype):
    x = (2.0 * jax.random.normal(jax.random.key(2), (3, 4, 4, 16)) + 0.5).astype(dtype)
    scale = jax.random.normal(jax.random.key(3), (16,))
    bias = jax.random.normal(jax.random.key(4), (16,))

    def ref(x, scale, bias):
        y = nn.GroupNorm(num_groups=4, epsilon=1e-6, use_fast_variance=False,
                         dtype=jnp.float32).apply({"params": {"scale": scale, "bias": bias}},
                                                  x.astype(jnp.float32))
        return nn.silu(y) if silu else y

    def ours(x, scale, bias):
        return group_norm_silu(x, scale, bias, 4, 1e-6, silu)

    w = jax.random.normal(jax.random.key(5), x.shape)

    def value_and_grads(f):
        return _compile(lambda *a: (f(*a), jax.grad(lambda *b: jnp.sum(f(*b) * w),
                                                    argnums=(0, 1, 2))(*a)),
                        x, scale, bias)(x, scale, bias)

    (y_ours, g_ours), (y_ref, g_ref) = value_and_grads(ours), value_and_grads(ref)
    np.testing.assert_allclose(y_ours, y_ref, rtol=1e-6, atol=1e-6)
    tol = 2e-5 if dtype == jnp.float32 else 2e-2
    for a, b in zip(g_ours, g_ref):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_upsample_conv3x3_equals_nearest_upsample_then_conv(dtype):
    x = jax.random.normal(jax.random.key(0), (2, 5, 7, 3)).astype(dtype)
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))

    def ref(x, kernel):  # the plain definition: upsample (4x the pixels), then a SAME 3x3 conv
        up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return jax.lax.conv_general_dilated(up.astype(dtype), kernel.astype(dtype), (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    got = _compile(lambda x, k: upsample_conv3x3(x, k, dtype), x, kernel)(x, kernel)
    want = _compile(ref, x, kernel)(x, kernel)
    assert got.shape == want.shape == (2, 10, 14, 4) and got.dtype == dtype
    # float32: the same products, summed in another order (taps folded first); bf16: the folded
    # taps are rounded to bf16 once, the reference's individually.
    tol = 1e-5 if dtype == jnp.float32 else 5e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)
