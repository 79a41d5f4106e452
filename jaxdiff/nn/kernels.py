"""The CPU-speed kernels of jaxdiff's layers: the same functions as the plain JAX/Flax versions,
written so that XLA:CPU runs (and compiles) them faster. Each has an exactness test beside the
others in ``tests/test_kernels.py`` against the function it replaces; :mod:`jaxdiff.xla` holds the
compiler options that go with them.

- :func:`group_norm_silu`: GroupNorm (+ SiLU) with a closed-form backward pass.
- :func:`bernoulli`: ``jax.random.bernoulli``'s bits as fusible elementwise threefry (the dropout
  masks of :class:`jaxdiff.nn.layers.Dropout`).
- :func:`upsample_conv3x3`: nearest x2 upsampling + 3x3 conv in sub-pixel form.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp

Dtype = Any


def _gn_view(x: jax.Array, num_groups: int) -> jax.Array:
    """[B, ..., C] -> [B, N, G, C/G] (a free reshape: NHWC keeps each group contiguous)."""
    return x.reshape(x.shape[0], -1, num_groups, x.shape[-1] // num_groups)


def _gn_forward(x, scale, bias, num_groups, eps, silu):
    xg = _gn_view(x.astype(jnp.float32), num_groups)
    mean = jnp.mean(xg, axis=(1, 3), keepdims=True)  # [B, 1, G, 1]
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(xg - mean), axis=(1, 3), keepdims=True) + eps)
    g, cg = num_groups, x.shape[-1] // num_groups
    y = (xg - mean) * (rstd * scale.reshape(g, cg)) + bias.reshape(g, cg)  # as flax's _normalize
    if silu:
        y = y * jax.nn.sigmoid(y)
    return y.reshape(x.shape), (mean, rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm_silu(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int,
                    eps: float, silu: bool) -> jax.Array:
    """``[silu](GroupNorm(x) * scale + bias)`` in float32 with a hand-written VJP.

    x: [B, ..., C] (any float dtype; statistics over all non-batch axes and the C/G channels of
    each group), scale/bias: [C] float32. Returns float32 [B, ..., C].

    Why not autodiff: differentiating the two-pass mean/variance graph gives ~8 reductions and as
    many elementwise passes per norm; the closed form needs two per-(batch, channel) sums, and
    the residuals are x and two [B, G] statistics (y and sigmoid(y) are recomputed), not the
    normalised activations. On XLA:CPU this is most of the non-convolution time of a U-Net.
    """
    return _gn_forward(x, scale, bias, num_groups, eps, silu)[0]


def _gn_fwd(x, scale, bias, num_groups, eps, silu):
    out, (mean, rstd) = _gn_forward(x, scale, bias, num_groups, eps, silu)
    return out, (x, scale, bias, mean, rstd)


def _gn_bwd(num_groups, eps, silu, res, d_out):
    x, scale, bias, mean, rstd = res
    xg = _gn_view(x.astype(jnp.float32), num_groups)
    g, cg = num_groups, x.shape[-1] // num_groups
    sc = scale.reshape(g, cg)
    xhat = (xg - mean) * rstd
    dy = _gn_view(d_out.astype(jnp.float32), num_groups)
    if silu:  # d silu(y) / dy = s (1 + y (1 - s)), s = sigmoid(y)
        y = xhat * sc + bias.reshape(g, cg)
        s = jax.nn.sigmoid(y)
        dy = dy * (s * (1.0 + y * (1.0 - s)))
    s1 = jnp.sum(dy, axis=1)  # [B, G, C/G]
    s2 = jnp.sum(dy * xhat, axis=1)
    n = xg.shape[1] * cg
    m1 = (jnp.sum(s1 * sc, axis=-1) / n)[:, None, :, None]  # mean over the group of dy * scale
    m2 = (jnp.sum(s2 * sc, axis=-1) / n)[:, None, :, None]  # ... of dy * scale * xhat
    dx = rstd * (dy * sc - m1 - xhat * m2)
    return (dx.reshape(x.shape).astype(x.dtype), jnp.sum(s2, axis=0).reshape(-1),
            jnp.sum(s1, axis=0).reshape(-1))


group_norm_silu.defvjp(_gn_fwd, _gn_bwd)


def _threefry2x32(k1: jax.Array, k2: jax.Array, x1: jax.Array, x2: jax.Array):
    """Threefry-2x32 with 20 rounds (Salmon et al. 2011), as ``jax.random``'s, written out as
    plain elementwise ops so that XLA fuses it (jax lowers it on CPU as a 5-trip while loop
    that materialises every intermediate array)."""
    rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
    ks = (k1, k2, k1 ^ k2 ^ jnp.uint32(0x1BD11BDA))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in rotations[i % 2]:
            x1 = x1 + x2
            x2 = x1 ^ ((x2 << jnp.uint32(r)) | (x2 >> jnp.uint32(32 - r)))
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
    return x1, x2


def bernoulli(key: jax.Array, p: float, shape: tuple[int, ...]) -> jax.Array:
    """``jax.random.bernoulli(key, p, shape)``, bit for bit, computed as fusible elementwise ops.

    For threefry keys (jax's default, with ``jax_threefry_partitionable``, on by default) this
    recomputes exactly jax's bits: threefry of the (hi, lo) words of each element's row-major
    index, xor-ed, turned into a uniform in [0, 1) from the top 23 bits, compared with ``p``.
    Any other key (rbg, custom) or configuration falls back to ``jax.random.bernoulli``.
    Returns bool ``shape``.
    """
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    n = math.prod(shape)
    if (str(jax.random.key_impl(key)) != "threefry2x32" or key.shape != ()
            or not jax.config.jax_threefry_partitionable or n >= 2 ** 32):
        return jax.random.bernoulli(key, p, shape)
    k = jax.random.key_data(key)
    lo = jnp.zeros(shape, jnp.uint32)  # row-major index (< 2**32, so the hi word is 0)
    stride = 1
    for d in reversed(range(len(shape))):
        lo = lo + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(stride)
        stride *= shape[d]
    b1, b2 = _threefry2x32(k[0], k[1], jnp.zeros(shape, jnp.uint32), lo)
    mantissa = ((b1 ^ b2) >> jnp.uint32(9)) | jnp.uint32(0x3F800000)  # float in [1, 2)
    u = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - jnp.float32(1.0)
    return u < jnp.float32(p)


def upsample_conv3x3(x: jax.Array, kernel: jax.Array, dtype: Dtype = None) -> jax.Array:
    """``conv3x3_same(nearest_upsample_x2(x), kernel)`` without building the upsampled image.

    x: [B, H, W, C_in], kernel: [3, 3, C_in, C_out] (HWIO) -> [B, 2H, 2W, C_out].
    Output row 2i+a sees upsampled rows 2i+a-1 .. 2i+a+1, i.e. input rows i-1, i, i (a = 0) or
    i, i, i+1 (a = 1): so each of the four output phases (a, b) is a 2x2 conv of x with kernel
    taps summed accordingly (rows: [k0, k1+k2] or [k0+k1, k2]; columns likewise), and zero
    padding on the side it reaches out of the image -- exactly the upsampled image's padding.
    16 instead of 36 multiply-adds per input pixel and channel pair; the sums of taps are formed
    in the kernel's dtype before the cast to ``dtype``.
    """
    chex.assert_rank(x, 4)
    chex.assert_rank(kernel, 4)
    b, h, w, _ = x.shape
    dtype = dtype or x.dtype

    def fold(k, axis):  # the phase-0 and phase-1 two-tap kernels along one spatial axis
        k0, k1, k2 = jnp.split(k, 3, axis=axis)
        return jnp.concatenate([k0, k1 + k2], axis), jnp.concatenate([k0 + k1, k2], axis)

    rows = []
    for a, k_a in enumerate(fold(kernel, 0)):
        cols = []
        for c, k_ab in enumerate(fold(k_a, 1)):
            pad = ((1, 0) if a == 0 else (0, 1), (1, 0) if c == 0 else (0, 1))
            cols.append(jax.lax.conv_general_dilated(
                x.astype(dtype), k_ab.astype(dtype), (1, 1), pad,
                dimension_numbers=("NHWC", "HWIO", "NHWC")))
        rows.append(jnp.stack(cols, axis=3))  # [B, H, W, 2 (b), C_out]
    return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, -1)  # [B, H, 2 (a), W, 2 (b), C]
