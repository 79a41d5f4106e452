"""The text-conditioned U-Net of Stable Diffusion, as diffusers' ``UNet2DConditionModel``.

    model = UNetCondition()                                   # SD 1.x: 859.5M parameters
    params = model.init(key, z, t, ctx)["params"]             # z: [B, 64, 64, 4] latents
    eps = model.apply({"params": params}, z, t, ctx, mask)    # ctx: [B, 77, 768], mask: [B, 77]

Layout (L = len(block_out_channels) levels, C_l = block_out_channels[l]):
  time: sinusoidal(C_0) -> Dense(4 C_0) -> SiLU -> Dense(4 C_0)
  conv_in -> down_blocks_l, l = 0..L-1: layers_per_block[l] x (ResBlock [+ SpatialTransformer if
  CrossAttnDownBlock2D]), then a stride-2 conv (except the last level) -> mid_block: ResBlock,
  SpatialTransformer, ResBlock -> up_blocks_i, i = 0..L-1 at level l = L-1-i:
  layers_per_block[l] + 1 x (concat skip, ResBlock [+ SpatialTransformer if CrossAttnUpBlock2D]),
  then nearest x2 + conv (except the last) -> GroupNorm, SiLU, conv_out.

Parameter names are diffusers' with "." before an index replaced by "_" (``down_blocks_0/
attentions_1/transformer_blocks_0/attn2/to_k``, ``up_blocks_1/upsamplers_0/conv``,
``mid_block/resnets_1``, ``time_embedding/linear_1``, ``conv_norm_out``), so
:mod:`jaxdiff.interop.unet2d_cond` maps every diffusers tensor onto exactly one parameter.

Precision: params float32; convolutions, projections and attention in ``dtype`` (float32 or
bfloat16); GroupNorm, LayerNorm, softmax, GELU and the time embedding in float32; the output is
float32.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Union

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.nn.layers import (Downsample, ResBlock, TimestepMLP, Upsample, group_norm,
                               timestep_embedding)
from jaxdiff.nn.transformer import SpatialTransformer

Dtype = Any
IntOrSeq = Union[int, Sequence[int]]

CROSS_DOWN, DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, UP = "CrossAttnUpBlock2D", "UpBlock2D"
CROSS_MID = "UNetMidBlock2DCrossAttn"


def _per_level(value: IntOrSeq, n: int, name: str) -> tuple:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"UNetCondition: {name}={value} must be an int or have one entry per "
                         f"level ({n})")
    return value


@dataclasses.dataclass(frozen=True)
class _Cfg:
    """The settings every block shares (a hashable module field)."""
    dropout: float
    norm_num_groups: int
    norm_eps: float
    use_linear_projection: bool
    downsample_padding: int
    dtype: Any
    remat: bool
    attention_implementation: Optional[str]


class _Blocks:
    """Constructors of ResBlocks and SpatialTransformers for one configuration."""

    def __init__(self, cfg: _Cfg):
        self.cfg = cfg
        self.res_cls = nn.remat(ResBlock, static_argnums=(3,)) if cfg.remat else ResBlock
        self.attn_cls = (nn.remat(SpatialTransformer, static_argnums=(4,)) if cfg.remat
                         else SpatialTransformer)

    def res(self, out_ch: int, name: str):
        c = self.cfg
        return self.res_cls(out_ch, dropout=c.dropout, num_groups=c.norm_num_groups,
                            eps=c.norm_eps, dtype=c.dtype, name=name)

    def attn(self, channels: int, heads: int, layers: int, name: str):
        c = self.cfg
        return self.attn_cls(num_heads=heads, head_dim=channels // heads, num_layers=layers,
                             use_linear_projection=c.use_linear_projection,
                             num_groups=c.norm_num_groups, dtype=c.dtype,
                             implementation=c.attention_implementation, name=name)


class _DownBlock(nn.Module):
    """CrossAttnDownBlock2D (``cross=True``) or DownBlock2D.
    x: [B, H, W, C_in] -> (h, skips), h [B, H/2, W/2, C] (or [B, H, W, C] without downsample)."""
    cfg: _Cfg
    out_channels: int
    num_layers: int
    cross: bool
    heads: int
    transformer_layers: int
    add_downsample: bool

    @nn.compact
    def __call__(self, h, temb, context, context_mask, train):
        blocks = _Blocks(self.cfg)
        skips = []
        for j in range(self.num_layers):
            h = blocks.res(self.out_channels, f"resnets_{j}")(h, temb, train)
            if self.cross:
                h = blocks.attn(self.out_channels, self.heads, self.transformer_layers,
                                f"attentions_{j}")(h, context, context_mask, train)
            skips.append(h)
        if self.add_downsample:
            h = Downsample(self.cfg.downsample_padding, dtype=self.cfg.dtype,
                           name="downsamplers_0")(h)
            skips.append(h)
        return h, skips


class _MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: ResBlock, SpatialTransformer, ResBlock; channels unchanged."""
    cfg: _Cfg
    heads: int
    transformer_layers: int

    @nn.compact
    def __call__(self, h, temb, context, context_mask, train):
        blocks = _Blocks(self.cfg)
        c = h.shape[-1]
        h = blocks.res(c, "resnets_0")(h, temb, train)
        h = blocks.attn(c, self.heads, self.transformer_layers, "attentions_0")(
            h, context, context_mask, train)
        return blocks.res(c, "resnets_1")(h, temb, train)


class _UpBlock(nn.Module):
    """CrossAttnUpBlock2D (``cross=True``) or UpBlock2D; consumes the ``num_layers`` skips
    (the last one first). h: [B, H, W, C'] -> [B, 2H, 2W, C] ([B, H, W, C] without upsample)."""
    cfg: _Cfg
    out_channels: int
    num_layers: int
    cross: bool
    heads: int
    transformer_layers: int
    add_upsample: bool

    @nn.compact
    def __call__(self, h, skips, temb, context, context_mask, train):
        blocks = _Blocks(self.cfg)
        chex.assert_equal(len(skips), self.num_layers)
        for j in range(self.num_layers):
            h = jnp.concatenate([h, skips[-1 - j].astype(h.dtype)], axis=-1)
            h = blocks.res(self.out_channels, f"resnets_{j}")(h, temb, train)
            if self.cross:
                h = blocks.attn(self.out_channels, self.heads, self.transformer_layers,
                                f"attentions_{j}")(h, context, context_mask, train)
        if self.add_upsample:
            h = Upsample(dtype=self.cfg.dtype, name="upsamplers_0")(h)
        return h


class UNetCondition(nn.Module):
    """diffusers ``UNet2DConditionModel`` (standard SD 1.x / 2.x block types) in Flax.

    The defaults are Stable Diffusion 1.x's UNet (859,520,964 parameters). Fields mirror the
    diffusers config (:func:`jaxdiff.interop.unet2d_cond.unet2d_condition_config_from_diffusers`
    maps one onto them):

      in_channels, out_channels: latent channels in / out.
      block_out_channels: C_l per level.
      layers_per_block: ResBlocks per down level (up levels get one more); int or per level.
      down_block_types: per level "CrossAttnDownBlock2D" or "DownBlock2D".
      up_block_types: per up block (coarsest first) "CrossAttnUpBlock2D" or "UpBlock2D".
      mid_block_type: "UNetMidBlock2DCrossAttn" or None (no middle block).
      cross_attention_dim: width D_ctx of the context tokens.
      attention_head_dim: as in diffusers this is the NUMBER OF HEADS (per level, or one int),
        each of width C_l // heads (a historical misnomer kept for config compatibility:
        SD 1.x has 8 heads everywhere, SD 2.x has (5, 10, 20, 20), i.e. 64-wide heads).
      transformer_layers_per_block: BasicTransformerBlocks per SpatialTransformer; int or per
        level (the up path uses the same per-level value).
      use_linear_projection: Dense proj_in/proj_out (SD 2.x) instead of 1x1 convs.
      flip_sin_to_cos, freq_shift: the sinusoidal time embedding (diffusers' defaults).
      norm_num_groups, norm_eps: GroupNorm of the ResBlocks and of the output (the transformers'
        GroupNorm uses eps 1e-6 and the LayerNorms 1e-5, as diffusers hard-codes).
      downsample_padding: 1 pads (1, 1) (diffusers); 0 pads (0, 1).
      dropout: in the ResBlocks when train=True (rng 'dropout').
      dtype: compute dtype (float32 or bfloat16); params stay float32.
      remat: rematerialise each ResBlock and SpatialTransformer in the backward pass.
      attention_implementation: passed to ``jax.nn.dot_product_attention`` ('cudnn' on GPU).
    """
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
    layers_per_block: IntOrSeq = 2
    down_block_types: Sequence[str] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, DOWN)
    up_block_types: Sequence[str] = (UP, CROSS_UP, CROSS_UP, CROSS_UP)
    mid_block_type: Optional[str] = CROSS_MID
    cross_attention_dim: int = 768
    attention_head_dim: IntOrSeq = 8
    transformer_layers_per_block: IntOrSeq = 1
    use_linear_projection: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    downsample_padding: int = 1
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    remat: bool = False
    attention_implementation: Optional[str] = None

    def _check_config(self) -> int:
        n = len(self.block_out_channels)
        if not (len(self.down_block_types) == len(self.up_block_types) == n) or n == 0:
            raise ValueError("UNetCondition: block_out_channels, down_block_types and "
                             f"up_block_types must have the same non-zero length (got {n}, "
                             f"{len(self.down_block_types)}, {len(self.up_block_types)})")
        for d in self.down_block_types:
            if d not in (CROSS_DOWN, DOWN):
                raise ValueError(f"UNetCondition: unsupported down block type {d!r} "
                                 f"(supported: {CROSS_DOWN}, {DOWN})")
        for u in self.up_block_types:
            if u not in (CROSS_UP, UP):
                raise ValueError(f"UNetCondition: unsupported up block type {u!r} "
                                 f"(supported: {CROSS_UP}, {UP})")
        if self.mid_block_type not in (CROSS_MID, None):
            raise ValueError(f"UNetCondition: unsupported mid_block_type "
                             f"{self.mid_block_type!r} (supported: {CROSS_MID}, None)")
        for l, (c, heads) in enumerate(zip(self.block_out_channels, self._heads())):
            if heads < 1 or c % heads:
                raise ValueError(f"UNetCondition: level {l} has {c} channels, not divisible by "
                                 f"attention_head_dim (number of heads) {heads}")
        return n

    def _heads(self) -> tuple:
        return _per_level(self.attention_head_dim, len(self.block_out_channels),
                          "attention_head_dim")

    def _check_inputs(self, x, t, context, context_mask, n):
        if x.ndim != 4:
            raise ValueError(f"UNetCondition: x must be [B, H, W, C], got shape {x.shape}")
        b, h, w, c = x.shape
        if c != self.in_channels:
            raise ValueError(f"UNetCondition: x has {c} channels, the model takes "
                             f"in_channels={self.in_channels}")
        f = 2 ** (n - 1)
        if h % f or w % f:
            raise ValueError(f"UNetCondition: H and W must be divisible by 2**(levels-1) = {f}, "
                             f"got {h}x{w}")
        if t.shape != (b,):
            raise ValueError(f"UNetCondition: t must have shape [B] = ({b},), got {t.shape} "
                             "(broadcast a scalar with jnp.full((B,), t))")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != \
                self.cross_attention_dim:
            raise ValueError(f"UNetCondition: context must be [B, L, cross_attention_dim] = "
                             f"[{b}, L, {self.cross_attention_dim}], got {context.shape}")
        if context_mask is not None and context_mask.shape != context.shape[:2]:
            raise ValueError(f"UNetCondition: context_mask must be [B, L] = {context.shape[:2]}, "
                             f"got {context_mask.shape}")

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array,
                 context_mask: Optional[jax.Array] = None, *, train: bool = False) -> jax.Array:
        """x: [B, H, W, in_channels] (H, W divisible by 2**(levels-1)); t: [B] timesteps (any
        real dtype, may be fractional); context: [B, L, cross_attention_dim] text hidden
        states; context_mask: [B, L] bool (True = real token; nonzero numbers count as True) or
        None (attend to every token). Returns [B, H, W, out_channels] float32."""
        x, t, context = jnp.asarray(x), jnp.asarray(t), jnp.asarray(context)
        n = self._check_config()
        if context_mask is not None:
            context_mask = jnp.asarray(context_mask)
            if context_mask.dtype != jnp.bool_:
                context_mask = context_mask != 0
        self._check_inputs(x, t, context, context_mask, n)
        dt = self.dtype
        boc = tuple(self.block_out_channels)
        layers = _per_level(self.layers_per_block, n, "layers_per_block")
        heads = self._heads()
        tlayers = _per_level(self.transformer_layers_per_block, n, "transformer_layers_per_block")
        context = context.astype(dt)
        args = (context, context_mask, train)
        cfg = _Cfg(self.dropout, self.norm_num_groups, self.norm_eps, self.use_linear_projection,
                   self.downsample_padding, dt, self.remat, self.attention_implementation)

        emb = timestep_embedding(t, boc[0], self.flip_sin_to_cos, self.freq_shift)
        temb = TimestepMLP(4 * boc[0], name="time_embedding")(emb)

        h = nn.Conv(boc[0], (3, 3), padding="SAME", dtype=dt, param_dtype=jnp.float32,
                    name="conv_in")(x.astype(dt))
        skips = [h]
        for l in range(n):
            h, s = _DownBlock(cfg, boc[l], layers[l], self.down_block_types[l] == CROSS_DOWN,
                              heads[l], tlayers[l], add_downsample=l < n - 1,
                              name=f"down_blocks_{l}")(h, temb, *args)
            skips += s

        if self.mid_block_type is not None:
            h = _MidBlock(cfg, heads[-1], tlayers[-1], name="mid_block")(h, temb, *args)

        for i in range(n):
            l = n - 1 - i
            k = layers[l] + 1
            mine, skips = skips[-k:], skips[:-k]
            h = _UpBlock(cfg, boc[l], k, self.up_block_types[i] == CROSS_UP, heads[l],
                         tlayers[l], add_upsample=i < n - 1,
                         name=f"up_blocks_{i}")(h, tuple(mine), temb, *args)
        assert not skips

        h = nn.silu(group_norm(h, self.norm_num_groups, self.norm_eps, "conv_norm_out"))
        out = nn.Conv(self.out_channels, (3, 3), padding="SAME", dtype=dt,
                      param_dtype=jnp.float32, name="conv_out")(h.astype(dt))
        out = out.astype(jnp.float32)
        chex.assert_shape(out, x.shape[:3] + (self.out_channels,))
        return out


class TextConditionedUNet(nn.Module):
    """A text encoder and a :class:`UNetCondition` trained together (text-to-image from scratch).

    Params: ``{"text_encoder": ..., "unet": ...}``, the two halves of a Stable Diffusion folder.
    The U-Net cross-attends to the encoder's ``last_hidden_state``, masked by ``attention_mask``
    (padding tokens are never attended to). ``text_encoder.hidden_size`` must equal
    ``unet.cross_attention_dim``.

        net = TextConditionedUNet(CLIPTextTransformer(...), UNetCondition(...))
        params = net.init(key, z, t, ids, mask)["params"]
        pred = net.apply({"params": params}, z, t, ids, mask)                  # [B, H, W, C]
        ctx = net.apply({"params": params}, ids, mask, method="encode_text")   # once per prompt
        pred = net.apply({"params": params}, z, t, ctx, mask, method="denoise")
    """
    text_encoder: nn.Module
    unet: UNetCondition

    def encode_text(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """input_ids, attention_mask: int [B, L] -> context float32 [B, L, D]."""
        return self.text_encoder(input_ids, attention_mask)[0]

    def denoise(self, x: jax.Array, t: jax.Array, context: jax.Array, context_mask: jax.Array,
                train: bool = False) -> jax.Array:
        """The U-Net alone on an already encoded ``context`` [B, L, D] (sampling encodes once)."""
        return self.unet(x, t, context, context_mask, train=train)

    def __call__(self, x: jax.Array, t: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
                 *, train: bool = False) -> jax.Array:
        if self.text_encoder.hidden_size != self.unet.cross_attention_dim:
            raise ValueError(
                f"TextConditionedUNet: the text encoder's hidden_size ({self.text_encoder.hidden_size}) must "
                f"equal the U-Net's cross_attention_dim ({self.unet.cross_attention_dim}).")
        return self.denoise(x, t, self.encode_text(input_ids, attention_mask), attention_mask, train)
