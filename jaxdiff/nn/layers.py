"""Building blocks shared by the U-Nets (and later the VAE / text-to-image transformer blocks).

All modules are Flax Linen, NHWC, and follow one precision rule: parameters are float32
(``param_dtype``), convolutions and projections compute in ``dtype`` (float32 or bfloat16), while
GroupNorm, softmax and the timestep embedding always compute in float32.

Parameter names mirror diffusers (``norm1``, ``conv1``, ``time_emb_proj``, ``to_q`` ...) so that
weight conversion (:mod:`jaxdiff.interop.unet2d`) is a renaming plus a transpose.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.nn.kernels import bernoulli, group_norm_silu, upsample_conv3x3

Dtype = Any


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0, max_period: float = 10000) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, as diffusers' ``Timesteps``.

    freq_i = max_period ** (-i / (dim/2 - freq_shift)), i = 0..dim/2-1;
    emb = [sin(t * freq), cos(t * freq)], or [cos, sin] when ``flip_sin_to_cos``.
    (The original DDPM code is ``flip_sin_to_cos=False, freq_shift=1``.)

    t: [B] (any real dtype, the raw timestep value, e.g. 0..T-1). Returns [B, dim] float32;
    an odd ``dim`` gets one zero column at the end.
    """
    chex.assert_rank(t, 1)
    half = dim // 2
    if half < 1 or half - freq_shift == 0:
        raise ValueError(f"timestep_embedding: dim={dim} is too small for freq_shift={freq_shift}")
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def group_norm(x: jax.Array, num_groups: int, eps: float, name: str, *,
               silu: bool = False) -> jax.Array:
    """float32 GroupNorm (affine), optionally followed by SiLU, with a clear error when groups do
    not divide channels.

    Call from inside a compact method (it creates the submodule ``name``, with parameters
    ``scale`` and ``bias`` as ``flax.linen.GroupNorm``). x: [B, ..., C] any float dtype.
    Returns float32. ``silu=True`` returns ``silu(GroupNorm(x))`` from one fused function with a
    hand-written backward pass (see :func:`group_norm_silu`).
    """
    c = x.shape[-1]
    if c % num_groups:
        raise ValueError(f"GroupNorm '{name}': {c} channels are not divisible by num_groups="
                         f"{num_groups}; choose channel counts that are multiples of num_groups")
    return GroupNorm(num_groups=num_groups, epsilon=eps, silu=silu, name=name)(x)


class GroupNorm(nn.Module):
    """GroupNorm with float32 statistics and parameters, optionally fused with SiLU.

    Parameters as ``flax.linen.GroupNorm`` (``scale`` ones, ``bias`` zeros, both [C]), and the same
    forward arithmetic (two-pass variance); the backward pass is hand-written
    (:func:`group_norm_silu`). x: [B, ..., C] -> float32 [B, ..., C].
    """
    num_groups: int = 32
    epsilon: float = 1e-6
    silu: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return group_norm_silu(x, scale, bias, self.num_groups, self.epsilon, self.silu)




class Dropout(nn.Module):
    """``flax.linen.Dropout`` (same rng stream 'dropout', same masks for the same key, same
    scaling by 1 / (1 - rate)), with the mask drawn by :func:`bernoulli`: on XLA:CPU ~5x cheaper
    to run and compile than jax's while-loop threefry, identical elsewhere."""
    rate: float
    deterministic: Optional[bool] = None

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: Optional[bool] = None) -> jax.Array:
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if self.rate == 0.0 or deterministic:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        keep_prob = 1.0 - self.rate
        mask = bernoulli(self.make_rng("dropout"), keep_prob, x.shape)
        return jax.lax.select(mask, x / keep_prob, jnp.zeros_like(x))


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          implementation: Optional[str] = None) -> jax.Array:
    """Multi-head attention core. q: [B, T, N, D], k/v: [B, S, N, D] -> [B, T, N, D].

    Scale 1/sqrt(D); logits and softmax in float32 even for bf16 inputs (jax's XLA path).
    ``implementation='cudnn'`` selects the fused GPU kernel (bf16/fp16, D <= 128 or 256).
    Shared by self-attention here and, later, cross-attention (S != T).
    """
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


class TimestepMLP(nn.Module):
    """diffusers ``TimestepEmbedding``: Dense(features) -> SiLU -> Dense(features). float32.

    emb: [B, D_in] -> [B, features].
    """
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, emb: jax.Array) -> jax.Array:
        chex.assert_rank(emb, 2)
        dense = lambda name: nn.Dense(self.features, dtype=self.dtype,  # noqa: E731
                                      param_dtype=jnp.float32, name=name)
        h = dense("linear_1")(emb.astype(self.dtype))
        return dense("linear_2")(nn.silu(h))


class ResBlock(nn.Module):
    """DDPM / diffusers ``ResnetBlock2D`` (time_embedding_norm="default", pre-norm):

    h = conv1(silu(norm1(x))) + time_emb_proj(silu(temb)); h = conv2(dropout(silu(norm2(h))));
    out = shortcut(x) + h, where shortcut is a 1x1 conv when channels change.

    x: [B, H, W, C_in]; temb: [B, D] or None (no time conditioning, e.g. in a VAE);
    returns [B, H, W, out_channels] in ``dtype``. Dropout (rng 'dropout') only when train=True.
    """
    out_channels: int
    dropout: float = 0.0
    num_groups: int = 32
    eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None,
                 train: bool = False) -> jax.Array:
        chex.assert_rank(x, 4)
        conv = lambda k, name: nn.Conv(self.out_channels, (k, k), padding="SAME",  # noqa: E731
                                       dtype=self.dtype, param_dtype=jnp.float32, name=name)
        h = group_norm(x, self.num_groups, self.eps, "norm1", silu=True).astype(self.dtype)
        h = conv(3, "conv1")(h)
        if temb is not None:
            chex.assert_rank(temb, 2)
            chex.assert_equal(temb.shape[0], x.shape[0])
            proj = nn.Dense(self.out_channels, dtype=self.dtype, param_dtype=jnp.float32,
                            name="time_emb_proj")(nn.silu(temb))
            h = h + proj[:, None, None, :]
        h = group_norm(h, self.num_groups, self.eps, "norm2", silu=True).astype(self.dtype)
        h = Dropout(self.dropout, deterministic=not train)(h)
        h = conv(3, "conv2")(h)
        skip = x.astype(self.dtype)
        if x.shape[-1] != self.out_channels:
            skip = PointwiseConv(self.out_channels, dtype=self.dtype, name="conv_shortcut")(skip)
        return skip + h


class PointwiseConv(nn.Module):
    """A 1x1 convolution with ``flax.linen.Conv``'s parameters (``kernel`` [1, 1, C_in, C_out],
    ``bias``), computed as one [B*H*W, C_in] x [C_in, C_out] matmul: on XLA:CPU its gradients
    then need no layout transposes (about 2x faster than the convolution at 32x32).

    x: [B, ..., C_in] -> [B, ..., features] in ``dtype``.
    """
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c_in = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (1, 1, c_in, self.features),
                            jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        y = jnp.dot(x.astype(self.dtype).reshape(-1, c_in),
                    kernel.reshape(c_in, self.features).astype(self.dtype))
        return y.reshape(x.shape[:-1] + (self.features,)) + bias.astype(self.dtype)


class AttentionBlock(nn.Module):
    """Spatial self-attention with residual: x + to_out(attn(to_q(n), to_k(n), to_v(n))),
    n = GroupNorm(x).

    As diffusers' ``Attention(residual_connection=True, bias=True)`` used by AttnDown/UpBlock2D
    and UNetMidBlock2D. Heads: ``C // head_dim`` if ``head_dim`` is set (diffusers'
    ``attention_head_dim``), else ``num_heads`` (DDPM: one head of width C).

    x: [B, H, W, C] -> [B, H, W, C] in ``dtype``.
    """
    num_heads: int = 1
    head_dim: Optional[int] = None
    num_groups: int = 32
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    implementation: Optional[str] = None  # passed to jax.nn.dot_product_attention

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        chex.assert_rank(x, 4)
        b, hgt, wid, c = x.shape
        heads = c // self.head_dim if self.head_dim else self.num_heads
        if heads < 1 or c % heads or (self.head_dim and c % self.head_dim):
            raise ValueError(f"AttentionBlock: {c} channels cannot be split into heads "
                             f"(num_heads={self.num_heads}, head_dim={self.head_dim})")
        dense = lambda name: nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32,  # noqa: E731
                                      name=name)
        n = group_norm(x, self.num_groups, self.eps, "group_norm").astype(self.dtype)
        n = n.reshape(b, hgt * wid, c)
        q, k, v = (dense(name)(n).reshape(b, hgt * wid, heads, c // heads)
                   for name in ("to_q", "to_k", "to_v"))
        o = dot_product_attention(q, k, v, self.implementation).reshape(b, hgt * wid, c)
        o = dense("to_out")(o).reshape(b, hgt, wid, c)
        return x.astype(self.dtype) + o


class Downsample(nn.Module):
    """Strided 3x3 conv halving H and W. x: [B, H, W, C] (H, W even) -> [B, H/2, W/2, C].

    ``padding=0`` pads (0, 1) on each spatial axis (DDPM / diffusers ``downsample_padding=0``;
    identical to Flax 'SAME' for stride 2 on even sizes); ``padding=p>0`` pads (p, p)
    (diffusers' default ``downsample_padding=1``).
    """
    padding: int = 0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        chex.assert_rank(x, 4)
        pad = ((0, 1), (0, 1)) if self.padding == 0 else ((self.padding,) * 2,) * 2
        return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), padding=pad, dtype=self.dtype,
                       param_dtype=jnp.float32, name="conv")(x.astype(self.dtype))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 'SAME' conv. x: [B, H, W, C] -> [B, 2H, 2W, C].

    Computed in sub-pixel form (:func:`upsample_conv3x3`): the same function, 2.25x fewer
    FLOPs, no 4x-sized intermediate. Parameters ``conv/kernel`` [3, 3, C, C] and ``conv/bias``
    as ``flax.linen.Conv``.
    """
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        chex.assert_rank(x, 4)
        return _UpsampleConv(x.shape[-1], dtype=self.dtype, name="conv")(x)


class _UpsampleConv(nn.Module):
    """The parameters of ``nn.Conv(features, (3, 3))`` applied by :func:`upsample_conv3x3`."""
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (3, 3, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        y = upsample_conv3x3(x.astype(self.dtype), kernel, self.dtype)
        return y + bias.astype(self.dtype)
