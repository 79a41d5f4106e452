"""The PatchGAN discriminator of pix2pix / taming-transformers / latent-diffusion (``NLayerDiscriminator``).

    disc = PatchDiscriminator(ndf=64, n_layers=3)           # latent-diffusion's default
    params = disc.init(key, x)["params"]                    # x: [B, H, W, C] in [-1, 1]
    logits = disc.apply({"params": params}, x)              # [B, H', W', 1] float32, one per patch

Layout: conv 4x4 stride 2 (ndf) -> LeakyReLU(0.2) -> for n = 1..n_layers-1: conv 4x4 stride 2
(ndf * min(2**n, 8), no bias) -> norm -> LeakyReLU(0.2) -> conv 4x4 stride 1 (ndf * min(2**n_layers,
8), no bias) -> norm -> LeakyReLU(0.2) -> conv 4x4 stride 1 to one logit per patch. Every conv pads
1 on each side, so H' = H / 2**n_layers - 2.

Difference from the reference: its norm is BatchNorm (running statistics, a mutable collection);
here it is GroupNorm (``num_groups`` groups, float32), so the discriminator is a pure function of its
params and of each example alone. Params float32; convolutions compute in ``dtype``.
"""
from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class PatchDiscriminator(nn.Module):
    """x: [B, H, W, C] float (H, W >= 2**(n_layers+1)) -> patch logits [B, H', W', 1] float32."""
    ndf: int = 64
    n_layers: int = 3
    num_groups: int = 8
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        chex.assert_rank(x, 4)
        if min(x.shape[1:3]) < 2 ** (self.n_layers + 1):
            raise ValueError(f"PatchDiscriminator: {x.shape[1]}x{x.shape[2]} inputs are too small for "
                             f"n_layers={self.n_layers} (need >= {2 ** (self.n_layers + 1)} px)")

        def conv(features, stride, bias, name):
            return nn.Conv(features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
                           use_bias=bias, dtype=self.dtype, param_dtype=jnp.float32, name=name)

        def norm(h, name):
            return nn.GroupNorm(num_groups=self.num_groups, epsilon=1e-5, dtype=jnp.float32,
                                param_dtype=jnp.float32, name=name)(h.astype(jnp.float32))

        h = nn.leaky_relu(conv(self.ndf, 2, True, "conv_0")(x.astype(self.dtype)), 0.2)
        for n in range(1, self.n_layers + 1):
            ch = self.ndf * min(2 ** n, 8)
            h = conv(ch, 2 if n < self.n_layers else 1, False, f"conv_{n}")(h.astype(self.dtype))
            h = nn.leaky_relu(norm(h, f"norm_{n}"), 0.2)
        return conv(1, 1, True, "conv_out")(h.astype(self.dtype)).astype(jnp.float32)
