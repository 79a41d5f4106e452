"""The text-conditioned spatial transformer of Stable Diffusion, as diffusers'
``Transformer2DModel`` (continuous input, ``norm_type="layer_norm"``, GEGLU feed-forward).

    block = SpatialTransformer(num_heads=8, head_dim=40)                 # 320 channels
    out = block.apply({"params": p}, x, context, context_mask)          # x: [B, H, W, 320]

Layout: GroupNorm (eps 1e-6) -> proj_in (1x1 conv, or linear with ``use_linear_projection``) ->
``num_layers`` x BasicTransformerBlock -> proj_out -> + x. A BasicTransformerBlock is
  h += attn1(LayerNorm(h))                      self-attention over the H*W image tokens
  h += attn2(LayerNorm(h), context)             cross-attention: Q from h, K and V from the text
  h += ff(LayerNorm(h))                         Dense(4 * dim * 2) -> GEGLU -> Dense(dim)

Parameter names are diffusers' with "." before an index replaced by "_" (``proj_in``,
``transformer_blocks_0/attn2/to_k``, ``transformer_blocks_0/ff/net_0/proj``, ``.../ff/net_2``;
``to_out.0`` is ``to_out``), and shapes are torch's up to transposes (the 1x1-conv projections
keep their [1, 1, C_in, C_out] kernels), so :mod:`jaxdiff.interop.unet2d_cond` is a renaming.

Precision: params float32; projections and the residual stream in ``dtype`` (float32 or
bfloat16); GroupNorm, LayerNorm, softmax logits and GELU in float32.
"""
from __future__ import annotations

from typing import Any, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.nn.layers import Dropout, PointwiseConv, dot_product_attention, group_norm

Dtype = Any


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     kv_mask: Optional[jax.Array] = None,
                     implementation: Optional[str] = None) -> jax.Array:
    """Multi-head attention with an optional key mask.

    q: [B, T, N, D], k/v: [B, S, N, D], kv_mask: [B, S] bool (True = attend) or None.
    Returns [B, T, N, D]. Scale 1/sqrt(D), logits and softmax in float32. A query whose keys are
    all masked attends uniformly to all of them (as diffusers' -10000 bias does).
    """
    if kv_mask is None:
        return dot_product_attention(q, k, v, implementation)
    chex.assert_shape(kv_mask, (k.shape[0], k.shape[1]))
    mask = jnp.asarray(kv_mask, jnp.bool_)[:, None, None, :]  # [B, 1, 1, S]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


class Attention(nn.Module):
    """diffusers ``Attention`` as used by BasicTransformerBlock: to_q/to_k/to_v without bias,
    ``to_out`` (diffusers ``to_out.0``) with bias back to the query width.

    x: [B, T, C]; context: [B, S, D_ctx] (cross-attention) or None (self-attention: K, V from
    x); context_mask: [B, S] bool or None. Returns [B, T, C] in ``dtype``.
    """
    num_heads: int
    head_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    implementation: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, context: Optional[jax.Array] = None,
                 context_mask: Optional[jax.Array] = None, train: bool = False) -> jax.Array:
        chex.assert_rank(x, 3)
        b, t, c = x.shape
        src = x if context is None else context
        inner = self.num_heads * self.head_dim

        def dense(features, name, bias):
            return nn.Dense(features, use_bias=bias, dtype=self.dtype, param_dtype=jnp.float32,
                            name=name)

        x, src = x.astype(self.dtype), src.astype(self.dtype)
        q = dense(inner, "to_q", False)(x).reshape(b, t, self.num_heads, self.head_dim)
        k = dense(inner, "to_k", False)(src).reshape(b, -1, self.num_heads, self.head_dim)
        v = dense(inner, "to_v", False)(src).reshape(b, -1, self.num_heads, self.head_dim)
        o = masked_attention(q, k, v, context_mask, self.implementation).reshape(b, t, inner)
        o = dense(c, "to_out", True)(o)
        return Dropout(self.dropout, deterministic=not train)(o)


class GEGLU(nn.Module):
    """``proj`` to 2 * features, then hidden * gelu(gate) (exact GELU, in float32).
    x: [..., C] -> [..., features] in ``dtype``."""
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(2 * self.features, dtype=self.dtype, param_dtype=jnp.float32,
                     name="proj")(x)
        hidden, gate = jnp.split(h, 2, axis=-1)
        gate = jax.nn.gelu(gate.astype(jnp.float32), approximate=False)
        return (hidden.astype(jnp.float32) * gate).astype(self.dtype)


class FeedForward(nn.Module):
    """diffusers ``FeedForward(activation_fn="geglu")``: net_0 = GEGLU(mult * C), dropout,
    net_2 = Dense(C). x: [..., C] -> [..., C] in ``dtype``."""
    mult: int = 4
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = x.shape[-1]
        h = GEGLU(self.mult * c, dtype=self.dtype, name="net_0")(x.astype(self.dtype))
        h = Dropout(self.dropout, deterministic=not train)(h)
        return nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32, name="net_2")(h)


def _layer_norm(name: str) -> nn.LayerNorm:
    # torch.nn.LayerNorm: eps 1e-5, biased variance from (x - mean)^2 (not E[x^2] - E[x]^2).
    return nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32,
                        use_fast_variance=False, name=name)


class BasicTransformerBlock(nn.Module):
    """diffusers ``BasicTransformerBlock`` (layer_norm, self- then cross-attention, GEGLU).

    x: [B, T, C]; context: [B, S, D_ctx]; context_mask: [B, S] bool or None.
    Returns [B, T, C] in ``dtype``.
    """
    num_heads: int
    head_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    implementation: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array,
                 context_mask: Optional[jax.Array] = None, train: bool = False) -> jax.Array:
        dt = self.dtype

        def attn(name):
            return Attention(self.num_heads, self.head_dim, self.dropout, dt,
                             self.implementation, name=name)

        h = x.astype(dt)
        h = h + attn("attn1")(_layer_norm("norm1")(h).astype(dt), None, None, train)
        h = h + attn("attn2")(_layer_norm("norm2")(h).astype(dt), context, context_mask, train)
        h = h + FeedForward(dropout=self.dropout, dtype=dt, name="ff")(
            _layer_norm("norm3")(h).astype(dt), train)
        return h


class SpatialTransformer(nn.Module):
    """diffusers ``Transformer2DModel`` on continuous (image) input, with residual.

    Attributes:
      num_heads, head_dim: attention heads and their width; inner width num_heads * head_dim
        (in the U-Net, diffusers' ``attention_head_dim`` is the number of heads and
        head_dim = C // num_heads).
      num_layers: BasicTransformerBlocks (diffusers ``transformer_layers_per_block``).
      use_linear_projection: proj_in / proj_out are Dense layers (SD 2.x) instead of 1x1 convs
        (SD 1.x). The same function either way; only the parameter shapes differ.
      num_groups: GroupNorm groups (eps 1e-6, as diffusers hard-codes).
      dropout: on attention outputs and inside the feed-forward (train=True only; rng
        'dropout'). The diffusers U-Net never sets it.
      implementation: passed to ``jax.nn.dot_product_attention`` (None/'xla' or 'cudnn').

    x: [B, H, W, C]; context: [B, L, D_ctx] (text encoder hidden states); context_mask: [B, L]
    bool, True for real tokens (diffusers' ``encoder_attention_mask``), or None.
    Returns [B, H, W, C] in ``dtype``.
    """
    num_heads: int
    head_dim: int
    num_layers: int = 1
    use_linear_projection: bool = False
    num_groups: int = 32
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    implementation: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array,
                 context_mask: Optional[jax.Array] = None, train: bool = False) -> jax.Array:
        chex.assert_rank(x, 4)
        chex.assert_rank(context, 3)
        b, hgt, wid, c = x.shape
        chex.assert_equal(context.shape[0], b)
        dt = self.dtype
        inner = self.num_heads * self.head_dim
        if self.use_linear_projection:
            proj = lambda f, name: nn.Dense(f, dtype=dt, param_dtype=jnp.float32,  # noqa: E731
                                            name=name)
        else:
            proj = lambda f, name: PointwiseConv(f, dtype=dt, name=name)  # noqa: E731

        h = group_norm(x, self.num_groups, 1e-6, "norm").astype(dt).reshape(b, hgt * wid, c)
        h = proj(inner, "proj_in")(h)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(self.num_heads, self.head_dim, self.dropout, dt,
                                      self.implementation, name=f"transformer_blocks_{i}")(
                                          h, context, context_mask, train)
        h = proj(c, "proj_out")(h).reshape(b, hgt, wid, c)
        return h + x.astype(dt)
