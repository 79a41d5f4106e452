"""DDPM CIFAR-10 (Ho et al. 2020): 35.7M-parameter U-Net, linear betas, T=1000, eps prediction,
Adam 2e-4 with 5000 warm-up steps, batch 128, EMA 0.9999, 800k steps, random flips.

Needs the TFDS cifar10 dataset prepared as array_record (see README); meant for a GPU/TPU host.
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.task = "diffusion"
    c.seed = 0
    c.num_devices = 0
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 0  # devices on the batch-only axis; 0 = all not on fsdp
    c.mesh.fsdp = 1  # devices that also split params, EMA and optimizer state (FSDP)

    c.data = ml_collections.ConfigDict()
    c.data.name = "cifar10"
    c.data.image_size = 32
    c.data.data_dir = ""
    c.data.random_flip = True
    c.data.conditional = False

    c.model = ml_collections.ConfigDict()
    c.model.ch = 128
    c.model.ch_mult = (1, 2, 2, 2)
    c.model.num_res_blocks = 2
    c.model.attn_resolutions = (16,)
    c.model.dropout = 0.1
    c.model.num_groups = 32
    c.model.num_heads = 1
    c.model.dtype = "bfloat16"
    c.model.remat = False

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.schedule = "linear"
    c.diffusion.num_timesteps = 1000
    c.diffusion.prediction = "eps"
    c.diffusion.min_snr_gamma = 0.0
    c.diffusion.p_uncond = 0.0

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 800_000
    c.train.batch_size = 128
    c.train.lr = 2e-4
    c.train.warmup_steps = 5000
    c.train.cosine_decay = False
    c.train.weight_decay = 0.0
    c.train.grad_clip = 1.0
    c.train.ema_decay = 0.9999
    c.train.log_every = 100
    c.train.checkpoint_every = 10_000
    c.train.keep_checkpoints = 3
    c.train.sample_every = 50_000
    c.train.num_samples = 64
    # FID during training: set eval_every (e.g. 50_000) and eval_inception (the converted FID Inception,
    # python -m jaxdiff.interop.inception --convert ...); the reference is the train split (cached).
    c.train.eval_every = 0  # 0 = off
    c.train.eval_num = 10_000
    c.train.eval_inception = ""
    c.train.eval_fid_ref = ""  # "" = cifar10:train; or a stats .npz (mu, sigma)

    c.sample = ml_collections.ConfigDict()
    c.sample.method = "ddpm"
    c.sample.num_steps = 1000
    c.sample.eta = 0.0
    c.sample.guidance = 1.0
    c.sample.clip_x0 = 1.0
    c.sample.seed = 0
    return c
