"""Class-conditional DDPM on the embedded digits (sklearn's 1797 real 8x8 digits, at their native 8x8).

The default of ``python -m experiments.train``: trains on a 2-core CPU in a few minutes.
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.task = "diffusion"  # jaxdiff.config.TASKS: diffusion, latent, text, finetune, vae
    c.seed = 0
    c.num_devices = 0  # 0 = all visible devices
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 0  # devices on the batch-only axis; 0 = all not on fsdp
    c.mesh.fsdp = 1  # devices that also split params, EMA and optimizer state (FSDP)

    c.data = ml_collections.ConfigDict()
    c.data.name = "digits"
    c.data.image_size = 8  # the data's own resolution; 16 or 32 upsample (bicubic)
    c.data.data_dir = ""  # "" = $JAXDIFF_DATA_DIR or ~/tensorflow_datasets
    c.data.random_flip = False
    c.data.conditional = True

    c.model = ml_collections.ConfigDict()
    c.model.ch = 32
    c.model.ch_mult = (1, 2, 2)
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = (4,)
    c.model.dropout = 0.0
    c.model.num_groups = 8
    c.model.num_heads = 1
    c.model.dtype = "float32"
    c.model.remat = False

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.schedule = "cosine"
    c.diffusion.num_timesteps = 1000
    c.diffusion.prediction = "eps"
    c.diffusion.min_snr_gamma = 0.0  # 0 = off
    c.diffusion.p_uncond = 0.1  # label dropout for classifier-free guidance

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 1000
    c.train.batch_size = 64
    c.train.lr = 2e-3
    c.train.warmup_steps = 100
    c.train.cosine_decay = True
    c.train.weight_decay = 0.0
    c.train.grad_clip = 1.0
    c.train.ema_decay = 0.999
    c.train.log_every = 50
    c.train.checkpoint_every = 250
    c.train.keep_checkpoints = 2
    c.train.sample_every = 0  # 0 = only at the end
    c.train.num_samples = 100
    # Evaluation during training (jaxdiff.eval.in_training): every eval_every steps and at the end,
    # eval_num fixed-key EMA samples scored by the digits classifier (accuracy, Frechet) and the SVM
    # judge, logged as eval/... to metrics.jsonl and TensorBoard. 0 = off.
    c.train.eval_every = 250
    c.train.eval_num = 100
    c.train.eval_inception = ""  # FID Inception .safetensors (python -m jaxdiff.interop.inception): adds eval/fid
    c.train.eval_fid_ref = ""  # FID reference ("" = the training split at data.image_size; or stats/images .npz)

    c.sample = ml_collections.ConfigDict()
    c.sample.method = "dpmpp_2m"  # 25 steps reach the quality of 1000 ancestral steps (README)
    c.sample.num_steps = 25
    c.sample.eta = 0.0
    c.sample.guidance = 1.5  # from the measured sweep (README: "Choosing the guidance"): 0.97+ on the requested class
    c.sample.clip_x0 = 1.0
    c.sample.seed = 0
    return c
