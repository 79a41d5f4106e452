"""Weights in from other libraries (diffusers, Stable Diffusion, CLIP) and back out.

Loaders take NumPy arrays (e.g. from ``safetensors.numpy.load_file``); torch is never imported.
Export (our params -> diffusers / transformers folders) is :mod:`jaxdiff.interop.export`
(imported on its own: it needs jax for the schedules).
"""
from jaxdiff.interop.unet2d import unet_config_from_diffusers, unet_params_from_diffusers
from jaxdiff.interop.unet2d_cond import (convert_unet2d_condition_state_dict,
                                         load_unet2d_condition,
                                         unet2d_condition_config_from_diffusers)

__all__ = ["convert_unet2d_condition_state_dict", "load_unet2d_condition",
           "unet2d_condition_config_from_diffusers", "unet_config_from_diffusers",
           "unet_params_from_diffusers"]
