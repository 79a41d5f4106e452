"""KL autoencoder on the embedded captioned ``shapes`` data (32x32 RGB): f = 4 -> 8x8x4 latents.

    python -m experiments.train --config=experiments/configs/vae_shapes.py --workdir=runs/vae_shapes

The first stage of ``experiments/configs/t2i_shapes.py`` (text-to-image). Same machinery as
``vae_digits``, with an L2 reconstruction loss: the images are ~97% black, and L1's constant-size
gradient on every background pixel outweighed the few shape pixels (measured: with L1, lr 2e-3 and
(32, 64, 64) channels, 1000 steps reached test PSNR 18.8 dB and lost green, blue and cyan shapes).
"""
from experiments.configs import vae_digits


def get_config():
    c = vae_digits.get_config()
    c.data.name = "shapes"
    c.data.image_size = 32
    c.model.block_out_channels = (16, 32, 64)  # 3 levels: f = 4
    c.loss.recon = "l2"
    c.train.lr = 1e-3
    c.train.num_steps = 1600  # 800 steps: 28.8 dB, but rounded corners (shape checker 80% on recons)
    c.train.checkpoint_every = 400
    return c
