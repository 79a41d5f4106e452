"""Flax Linen modules (NHWC). Knows nothing of diffusion: models map (x, t, y) to arrays."""
from jaxdiff.nn.layers import (AttentionBlock, Downsample, ResBlock, TimestepMLP, Upsample,
                               dot_product_attention, group_norm, timestep_embedding)
from jaxdiff.nn.transformer import SpatialTransformer
from jaxdiff.nn.unet import UNet
from jaxdiff.nn.unet_cond import TextConditionedUNet, UNetCondition

__all__ = ["AttentionBlock", "Downsample", "ResBlock", "SpatialTransformer", "TextConditionedUNet", "TimestepMLP", "UNet",
           "UNetCondition", "Upsample", "dot_product_attention", "group_norm",
           "timestep_embedding"]
