"""KL autoencoder (latent diffusion's first stage) on the embedded digits at 32x32: f = 4 -> 8x8x4 latents.

    python -m experiments.train --config=experiments/configs/vae_digits.py --workdir=runs/vae_digits

Every checkpoint stores the latent scale factor (1 / std of posterior samples over the training
split) in its metadata; ``experiments/configs/ldm_digits.py`` trains a U-Net on those latents.
Loss (latent-diffusion's, without LPIPS): per-example sum of |x - x_rec| + kl_weight * KL, plus an
optional PatchGAN hinge loss with the adaptive weight from ``disc.start`` on (``disc.weight = 0``
leaves the discriminator out).
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.task = "vae"
    c.seed = 0
    c.num_devices = 0  # 0 = all visible devices
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 0  # devices on the batch-only axis; 0 = all not on fsdp
    c.mesh.fsdp = 1  # devices that also split params, EMA and optimizer state (FSDP)

    c.data = ml_collections.ConfigDict()
    c.data.name = "digits"
    c.data.image_size = 32  # sklearn's 8x8 digits, bicubic-resized to 32x32
    c.data.data_dir = ""
    c.data.random_flip = False
    c.data.conditional = False

    c.model = ml_collections.ConfigDict()  # jaxdiff.nn.vae.AutoencoderKL
    c.model.block_out_channels = (16, 32, 64)  # 3 levels: f = 4
    c.model.layers_per_block = 1
    c.model.latent_channels = 4
    c.model.norm_num_groups = 8
    c.model.mid_block_add_attention = True
    c.model.dtype = "float32"
    c.model.remat = False

    c.loss = ml_collections.ConfigDict()
    c.loss.recon = "l1"  # "l1" or "l2"
    c.loss.kl_weight = 1e-6  # Stable Diffusion's

    c.disc = ml_collections.ConfigDict()  # PatchGAN (jaxdiff.nn.discriminator)
    c.disc.weight = 0.0  # 0 = no discriminator
    c.disc.start = 400  # steps before the adversarial loss starts
    c.disc.adaptive = True  # Esser et al.'s adaptive weight
    c.disc.ndf = 32
    c.disc.n_layers = 2
    c.disc.num_groups = 8
    c.disc.lr = 1e-3
    c.disc.b1 = 0.5
    c.disc.b2 = 0.9

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 600
    c.train.batch_size = 32
    c.train.lr = 2e-3
    c.train.warmup_steps = 100
    c.train.cosine_decay = True
    c.train.weight_decay = 0.0
    c.train.grad_clip = 0.0  # 0 = off (the loss is a per-example sum: its gradient norm is large)
    c.train.ema_decay = 0.999
    c.train.log_every = 50
    c.train.checkpoint_every = 300
    c.train.keep_checkpoints = 2
    c.train.eval_every = 0  # > 0: test PSNR (eval/test_psnr) every eval_every steps; 0 = at checkpoints
    return c
