"""Flax Linen modules (NHWC). Knows nothing of diffusion: models map (x, t, y) to arrays."""
from jaxdiff.nn.layers import (AttentionBlock, Downsample, ResBlock, TimestepMLP, Upsample,
                               dot_product_attention, group_norm, timestep_embedding)
from jaxdiff.nn.unet import UNet

__all__ = ["AttentionBlock", "Downsample", "ResBlock", "TimestepMLP", "UNet", "Upsample",
           "dot_product_attention", "group_norm", "timestep_embedding"]
