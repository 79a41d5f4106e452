"""Class-conditional pixel-space DDPM on the embedded digits resized to 32x32: the baseline that
``ldm_digits`` (same U-Net on 8x8x4 VAE latents) is compared with at equal steps and batch.

The U-Net of ``ddpm_digits`` (ch 32, ch_mult (1, 2, 2), one ResBlock per level); at 32x32 its
levels are 32, 16, 8 and attention sits at 8, the lowest level. v-prediction as ``ldm_digits``, so
the two differ only in the space they diffuse in; x0 is clipped to the pixel range [-1, 1].
"""
from experiments.configs import ddpm_digits


def get_config():
    c = ddpm_digits.get_config()
    c.data.image_size = 32
    c.model.attn_resolutions = (8,)
    c.diffusion.prediction = "v"
    return c
