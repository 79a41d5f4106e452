"""The KL autoencoder of latent diffusion / Stable Diffusion, as diffusers' ``AutoencoderKL``.

    vae = AutoencoderKL()                                    # SD 1.x VAE: 83.65M params, f = 8
    params = vae.init(key, x)["params"]                      # x: [B, H, W, 3] in [-1, 1]
    post = vae.apply({"params": params}, x, method=AutoencoderKL.encode)
    z = post.sample(key) * vae.scaling_factor                # [B, H/8, W/8, 4] diffusion latents
    x_rec = vae.apply({"params": params}, z / vae.scaling_factor, method=AutoencoderKL.decode)

Layout (L = len(block_out_channels) levels, f = 2**(L-1)):
  encoder: conv_in -> per level l: layers_per_block ResBlocks (-> block_out_channels[l]), then a
    stride-2 conv padded (0, 1) (except the last level) -> mid_block: ResBlock, attention (one
    head), ResBlock -> GroupNorm, SiLU, conv_out to 2 * latent_channels -> quant_conv (1x1).
  decoder: post_quant_conv (1x1) -> conv_in -> mid_block -> per level from L-1 down to 0:
    layers_per_block + 1 ResBlocks, then nearest x2 + conv (except level 0) -> GroupNorm, SiLU,
    conv_out.
ResBlocks have no time input; every GroupNorm uses eps 1e-6.

Parameter names are diffusers' with "." before an index replaced by "_" (``encoder/down_blocks_0/
resnets_1/conv1``, ``decoder/up_blocks_0/upsamplers_0/conv``, ``encoder/mid_block/attentions_0/
to_out``), so :mod:`jaxdiff.interop.vae` maps every diffusers tensor onto exactly one parameter.
As in diffusers, ``decoder/up_blocks_i`` runs at level L-1-i (up_blocks_0 is the coarsest).

Precision: params float32; convolutions and attention projections compute in ``dtype``
(float32 or bfloat16); GroupNorm and softmax in float32; the posterior moments and the decoded
image are returned in float32.

``scaling_factor`` / ``shift_factor`` are carried for pipelines (diffusion latents are
``(z - shift_factor) * scaling_factor``); like diffusers, encode/decode do not apply them.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jaxdiff.nn.layers import AttentionBlock, Downsample, ResBlock, Upsample, group_norm

Dtype = Any
_EPS = 1e-6  # diffusers' Encoder/Decoder hard-code resnet_eps = 1e-6 and GroupNorm eps = 1e-6


# ---------------------------------------------------------------------------------------------
# The posterior.

@struct.dataclass
class DiagonalGaussian:
    """Diagonal Gaussian posterior q(z|x) = N(mean, exp(logvar)), a pytree (jit/vmap friendly).

    mean, logvar: [B, h, w, C_lat] float32. Build from the encoder output with
    :meth:`from_moments`, which clips logvar to [-30, 20] as diffusers/latent-diffusion do;
    the constructor itself does not clip.
    """
    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        """moments: [..., 2 * C_lat], the first half the mean, the second the log-variance."""
        if moments.shape[-1] % 2:
            raise ValueError(f"DiagonalGaussian.from_moments: last axis must be even "
                             f"(mean and logvar halves), got shape {moments.shape}")
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """z = mean + std * eps, eps ~ N(0, I) drawn with ``key``. Same shape as ``mean``."""
        eps = jax.random.normal(key, self.mean.shape, self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self, other: Optional["DiagonalGaussian"] = None) -> jax.Array:
        """KL(self || other) summed over all non-batch axes -> [B]; ``other=None`` is N(0, I).

        0.5 * sum(mean^2 + var - 1 - logvar) against N(0, I), as latent-diffusion's
        ``DiagonalGaussianDistribution.kl``.
        """
        axes = tuple(range(1, self.mean.ndim))
        if other is None:
            return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=axes)
        return 0.5 * jnp.sum(jnp.square(self.mean - other.mean) / other.var
                             + self.var / other.var - 1.0 - self.logvar + other.logvar, axis=axes)

    def nll(self, z: jax.Array) -> jax.Array:
        """-log q(z) summed over all non-batch axes -> [B]."""
        axes = tuple(range(1, self.mean.ndim))
        return 0.5 * jnp.sum(jnp.log(2.0 * jnp.pi) + self.logvar
                             + jnp.square(z - self.mean) / self.var, axis=axes)


# ---------------------------------------------------------------------------------------------
# Blocks (names mirror diffusers' DownEncoderBlock2D / UpDecoderBlock2D / UNetMidBlock2D).

class _MidBlock(nn.Module):
    """ResBlock -> single-head self-attention (optional) -> ResBlock, channel count unchanged."""
    num_groups: int
    add_attention: bool = True
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        res_cls = nn.remat(ResBlock) if self.remat else ResBlock
        attn_cls = nn.remat(AttentionBlock) if self.remat else AttentionBlock
        res = lambda name: res_cls(c, num_groups=self.num_groups, eps=_EPS,  # noqa: E731
                                   dtype=self.dtype, name=name)
        x = res("resnets_0")(x)
        if self.add_attention:
            x = attn_cls(num_heads=1, num_groups=self.num_groups, eps=_EPS, dtype=self.dtype,
                         name="attentions_0")(x)
        return res("resnets_1")(x)


class _ResampleBlock(nn.Module):
    """diffusers' ``DownEncoderBlock2D`` (``resample="down"``) / ``UpDecoderBlock2D`` ("up"):
    ``num_layers`` ResBlocks, then the resampler if any (``downsamplers_0`` / ``upsamplers_0``)."""
    out_channels: int
    num_layers: int
    num_groups: int
    resample: Optional[str]  # "down", "up" or None
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        res_cls = nn.remat(ResBlock) if self.remat else ResBlock
        for j in range(self.num_layers):
            x = res_cls(self.out_channels, num_groups=self.num_groups, eps=_EPS,
                        dtype=self.dtype, name=f"resnets_{j}")(x)
        if self.resample == "down":
            x = Downsample(padding=0, dtype=self.dtype, name="downsamplers_0")(x)
        elif self.resample == "up":
            x = Upsample(dtype=self.dtype, name="upsamplers_0")(x)
        return x


def _conv(features: int, k: int, dtype: Dtype, name: str) -> nn.Conv:
    return nn.Conv(features, (k, k), padding="SAME" if k > 1 else "VALID", dtype=dtype,
                   param_dtype=jnp.float32, name=name)


class Encoder(nn.Module):
    """x: [B, H, W, C_in] -> moments [B, H/f, W/f, 2 * latent_channels] (before quant_conv)."""
    block_out_channels: Sequence[int]
    layers_per_block: int
    latent_channels: int
    norm_num_groups: int
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        boc, n = self.block_out_channels, len(self.block_out_channels)
        h = _conv(boc[0], 3, self.dtype, "conv_in")(x.astype(self.dtype))
        for i, ch in enumerate(boc):
            h = _ResampleBlock(ch, self.layers_per_block, self.norm_num_groups,
                               resample="down" if i < n - 1 else None, dtype=self.dtype,
                               remat=self.remat, name=f"down_blocks_{i}")(h)
        h = _MidBlock(self.norm_num_groups, self.mid_block_add_attention, self.dtype,
                      self.remat, name="mid_block")(h)
        h = nn.silu(group_norm(h, self.norm_num_groups, _EPS, "conv_norm_out"))
        return _conv(2 * self.latent_channels, 3, self.dtype, "conv_out")(h.astype(self.dtype))


class Decoder(nn.Module):
    """z: [B, h, w, latent_channels] -> [B, h*f, w*f, out_channels] (after post_quant_conv)."""
    block_out_channels: Sequence[int]
    layers_per_block: int
    out_channels: int
    norm_num_groups: int
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        rev = list(reversed(self.block_out_channels))
        h = _conv(rev[0], 3, self.dtype, "conv_in")(z.astype(self.dtype))
        h = _MidBlock(self.norm_num_groups, self.mid_block_add_attention, self.dtype,
                      self.remat, name="mid_block")(h)
        for i, ch in enumerate(rev):
            h = _ResampleBlock(ch, self.layers_per_block + 1, self.norm_num_groups,
                               resample="up" if i < len(rev) - 1 else None, dtype=self.dtype,
                               remat=self.remat, name=f"up_blocks_{i}")(h)
        h = nn.silu(group_norm(h, self.norm_num_groups, _EPS, "conv_norm_out"))
        return _conv(self.out_channels, 3, self.dtype, "conv_out")(h.astype(self.dtype))


# ---------------------------------------------------------------------------------------------
# The autoencoder.

class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder (Rombach et al. 2022), diffusers ``AutoencoderKL`` layout.

    Defaults are the Stable Diffusion 1.x/2.x VAE (83.65M parameters, f = 8, 4 latent channels).
    ``f = 2 ** (len(block_out_channels) - 1)``; inputs need H and W divisible by f.

    Methods (call through ``apply(..., method=AutoencoderKL.<name>)``):
      encode(x) -> DiagonalGaussian; x: [B, H, W, in_channels] float in [-1, 1];
        mean/logvar: [B, H/f, W/f, latent_channels] float32.
      decode(z) -> [B, h*f, w*f, out_channels] float32; z: [B, h, w, latent_channels].
      __call__(x, *, key=None, sample_posterior=False) -> (recon, posterior); decodes a sample
        drawn with ``key`` if ``sample_posterior`` else the posterior mean.

    ``use_quant_conv`` / ``use_post_quant_conv`` drop the 1x1 convs (as diffusers' options of
    the same names); ``remat`` rematerialises ResBlocks/attention in the backward pass.
    """
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    dtype: Dtype = jnp.float32
    remat: bool = False

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def setup(self):
        if not self.block_out_channels:
            raise ValueError("AutoencoderKL: block_out_channels must not be empty")
        common = dict(block_out_channels=tuple(self.block_out_channels),
                      layers_per_block=self.layers_per_block,
                      norm_num_groups=self.norm_num_groups,
                      mid_block_add_attention=self.mid_block_add_attention,
                      dtype=self.dtype, remat=self.remat)
        self.encoder = Encoder(latent_channels=self.latent_channels, **common)
        self.decoder = Decoder(out_channels=self.out_channels, **common)
        if self.use_quant_conv:
            self.quant_conv = _conv(2 * self.latent_channels, 1, self.dtype, "quant_conv")
        if self.use_post_quant_conv:
            self.post_quant_conv = _conv(self.latent_channels, 1, self.dtype, "post_quant_conv")

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """x: [B, H, W, in_channels] -> posterior over [B, H/f, W/f, latent_channels]."""
        f = self.downsample_factor
        if x.ndim != 4:
            raise ValueError(f"AutoencoderKL.encode: x must be [B, H, W, C] (NHWC), "
                             f"got shape {x.shape}")
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"AutoencoderKL.encode: x has {x.shape[-1]} channels, expected "
                             f"in_channels={self.in_channels} (NHWC layout: channels last)")
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(f"AutoencoderKL.encode: H and W must be divisible by the "
                             f"downsampling factor f={f}, got {x.shape[1]}x{x.shape[2]}")
        moments = self.encoder(x)
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: jax.Array) -> jax.Array:
        """z: [B, h, w, latent_channels] -> [B, h*f, w*f, out_channels] float32."""
        if z.ndim != 4:
            raise ValueError(f"AutoencoderKL.decode: z must be [B, h, w, C] (NHWC), "
                             f"got shape {z.shape}")
        if z.shape[-1] != self.latent_channels:
            raise ValueError(f"AutoencoderKL.decode: z has {z.shape[-1]} channels, expected "
                             f"latent_channels={self.latent_channels} (NHWC layout)")
        z = z.astype(self.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jax.Array, *, key: Optional[jax.Array] = None,
                 sample_posterior: bool = False):
        """x: [B, H, W, in_channels] -> (recon [B, H, W, out_channels] float32, posterior)."""
        posterior = self.encode(x)
        if sample_posterior:
            if key is None:
                raise ValueError("AutoencoderKL: sample_posterior=True needs a PRNG key (key=...)")
            z = posterior.sample(key)
        else:
            z = posterior.mode()
        return self.decode(z), posterior
