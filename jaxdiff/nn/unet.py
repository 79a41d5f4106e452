"""The DDPM U-Net (Ho et al. 2020), laid out as diffusers' ``UNet2DModel``.

    model = UNet()                                   # DDPM CIFAR-10: 35.7M parameters
    params = model.init(key, x, t)["params"]         # x: [B, 32, 32, 3], t: [B]
    eps = model.apply({"params": params}, x, t)      # [B, 32, 32, 3] float32

Layout (L = len(ch_mult) levels, feature-map height H_l = H / 2**l):
  conv_in -> per level l: num_res_blocks x (ResBlock [+ attention if H_l in attn_resolutions]),
  then Downsample (except the last level) -> mid: ResBlock, attention, ResBlock ->
  per level l from L-1 down to 0: (num_res_blocks + 1) x (concat skip, ResBlock [+ attention]),
  then Upsample (except level 0) -> GroupNorm, SiLU, conv_out.

Parameter names: ``down_{l}_res_{j}``, ``down_{l}_attn_{j}``, ``down_{l}_downsample``,
``mid_res_0``, ``mid_attn``, ``mid_res_1``, ``up_{l}_res_{j}``, ``up_{l}_attn_{j}``,
``up_{l}_upsample``, where l is the resolution level (up_1 runs at the same size as down_1).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.nn.layers import (AttentionBlock, Downsample, ResBlock, TimestepMLP, Upsample,
                               group_norm, timestep_embedding)


class UNet(nn.Module):
    """DDPM U-Net, optionally class-conditional (with a null label for classifier-free guidance).

    The defaults are the DDPM CIFAR-10 model (google/ddpm-cifar10-32): 35.7M parameters,
    sinusoidal embedding with ``flip_sin_to_cos=False, freq_shift=1``, GroupNorm eps 1e-6,
    downsampling pad (0, 1).

    Attributes beyond the core ones exist for diffusers interop
    (:func:`jaxdiff.interop.unet2d.unet_config_from_diffusers`):
      head_dim: attention head width (diffusers ``attention_head_dim``); overrides num_heads.
      norm_eps, flip_sin_to_cos, freq_shift: as diffusers ``norm_eps``, ``flip_sin_to_cos``,
        ``freq_shift``.
      downsample_padding: 0 pads (0, 1) (DDPM); p > 0 pads (p, p) (diffusers default 1).

    Conditioning: with ``num_classes`` set, the label table has ``num_classes + 1`` rows and
    label ``num_classes`` is the null label; ``y=None`` means "null label for every example".
    Labels outside [0, num_classes] get a zero class embedding (one-hot of an out-of-range index).
    ``y`` given to an unconditional model raises.

    Attention placement is keyed on the feature-map height, as in DDPM: ``attn_resolutions=(16,)``
    puts attention at the level where H_l == 16 on both paths; a value that matches no level of
    the given input raises.
    """
    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.1
    num_classes: Optional[int] = None
    out_channels: Optional[int] = None
    num_groups: int = 32
    num_heads: int = 1
    dtype: Any = jnp.float32
    remat: bool = False
    # diffusers-interop conventions (defaults = DDPM).
    head_dim: Optional[int] = None
    norm_eps: float = 1e-6
    flip_sin_to_cos: bool = False
    freq_shift: int = 1
    downsample_padding: int = 0

    def _check_inputs(self, x, t, y):
        if x.ndim != 4:
            raise ValueError(f"UNet: x must be [B, H, W, C], got shape {x.shape}")
        b, h, w, _ = x.shape
        f = 2 ** (len(self.ch_mult) - 1)
        if h % f or w % f:
            raise ValueError(f"UNet: H and W must be divisible by 2**(len(ch_mult)-1) = {f}, "
                             f"got {h}x{w}")
        if t.shape != (b,):
            raise ValueError(f"UNet: t must have shape [B] = ({b},), got {t.shape} "
                             "(broadcast a scalar with jnp.full((B,), t))")
        if self.num_classes is None and y is not None:
            raise ValueError("UNet: labels y were given but the model is unconditional "
                             "(num_classes=None)")
        if y is not None:
            if y.shape != (b,):
                raise ValueError(f"UNet: y must have shape [B] = ({b},), got {y.shape}")
            if not jnp.issubdtype(y.dtype, jnp.integer):
                raise ValueError(f"UNet: y must be integer labels, got dtype {y.dtype}")
        for m in self.ch_mult:
            if (self.ch * m) % self.num_groups:
                raise ValueError(f"UNet: channels ch*mult = {self.ch * m} are not divisible by "
                                 f"num_groups={self.num_groups}")
        sizes = [h // 2 ** l for l in range(len(self.ch_mult))]
        for r in self.attn_resolutions:
            if r not in sizes:
                raise ValueError(f"UNet: attn_resolutions entry {r} matches no feature-map height "
                                 f"for this input (level heights {sizes})")

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: Optional[jax.Array] = None, *,
                 train: bool = False) -> jax.Array:
        """x: [B, H, W, C] float; t: [B] timesteps on the training scale (e.g. 0..T-1, may be
        fractional); y: [B] int labels or None. Returns [B, H, W, out_channels] float32."""
        x, t = jnp.asarray(x), jnp.asarray(t)
        y = None if y is None else jnp.asarray(y)
        self._check_inputs(x, t, y)
        b, _, _, c_in = x.shape
        dt = self.dtype
        res_cls = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock
        attn_cls = nn.remat(AttentionBlock) if self.remat else AttentionBlock

        def res(out_ch, name):
            return res_cls(out_ch, dropout=self.dropout, num_groups=self.num_groups,
                           eps=self.norm_eps, dtype=dt, name=name)

        def attn(name):
            return attn_cls(num_heads=self.num_heads, head_dim=self.head_dim,
                            num_groups=self.num_groups, eps=self.norm_eps, dtype=dt, name=name)

        # Time (and class) embedding, float32.
        temb_dim = 4 * self.ch
        emb = timestep_embedding(t, self.ch, self.flip_sin_to_cos, self.freq_shift)
        emb = TimestepMLP(temb_dim, name="time_embedding")(emb)
        if self.num_classes is not None:
            if y is None:
                y = jnp.full((b,), self.num_classes, jnp.int32)
            table = nn.Embed(self.num_classes + 1, temb_dim, param_dtype=jnp.float32,
                             name="class_embedding").embedding
            # A one-hot matmul, not a gather: its gradient is a dot instead of a scatter-add, whose
            # accumulation order XLA:CPU does not fix (bit-exact resume across processes needs this).
            emb = emb + jax.nn.one_hot(y, self.num_classes + 1, dtype=jnp.float32) @ table

        # Down.
        h = nn.Conv(self.ch, (3, 3), padding="SAME", dtype=dt, param_dtype=jnp.float32,
                    name="conv_in")(x.astype(dt))
        hs = [h]
        last = len(self.ch_mult) - 1
        for l, mult in enumerate(self.ch_mult):
            for j in range(self.num_res_blocks):
                h = res(self.ch * mult, f"down_{l}_res_{j}")(h, emb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = attn(f"down_{l}_attn_{j}")(h)
                hs.append(h)
            if l != last:
                h = Downsample(self.downsample_padding, dtype=dt, name=f"down_{l}_downsample")(h)
                hs.append(h)

        # Middle.
        h = res(h.shape[-1], "mid_res_0")(h, emb, train)
        h = attn("mid_attn")(h)
        h = res(h.shape[-1], "mid_res_1")(h, emb, train)

        # Up.
        for l in reversed(range(len(self.ch_mult))):
            for j in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop().astype(h.dtype)], axis=-1)
                h = res(self.ch * self.ch_mult[l], f"up_{l}_res_{j}")(h, emb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = attn(f"up_{l}_attn_{j}")(h)
            if l != 0:
                h = Upsample(dtype=dt, name=f"up_{l}_upsample")(h)
        assert not hs

        h = group_norm(h, self.num_groups, self.norm_eps, "norm_out", silu=True).astype(dt)
        out_ch = self.out_channels or c_in
        out = nn.Conv(out_ch, (3, 3), padding="SAME", dtype=dt, param_dtype=jnp.float32,
                      name="conv_out")(h).astype(jnp.float32)
        chex.assert_shape(out, x.shape[:3] + (out_ch,))
        return out
