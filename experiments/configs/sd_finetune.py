"""Fine-tune a Stable Diffusion 1.x folder (diffusers layout) on your own captioned images.

    python -m experiments.train --config=experiments/configs/sd_finetune.py \
        --config.model.pretrained=PATH/stable-diffusion-v1-5 --config.data.name=folder:IMAGES --workdir=runs/sd_ft
    python -m experiments.sample --workdir=runs/sd_ft --prompt "a photo of ..." --num=4
    # LoRA instead of full fine-tuning (only the adapters are trained, kept in the EMA and checkpointed):
    python -m experiments.train --config=experiments/configs/sd_finetune.py --config.model.pretrained=... \
        --config.data.name=folder:IMAGES --config.model.lora_rank=4 --workdir=runs/sd_lora

``model.pretrained``: ``unet/ vae/ text_encoder/ tokenizer/ scheduler/``. The U-Net is trained (all of
it, or LoRA adapters when ``model.lora_rank > 0``); the VAE is frozen and encodes each process's
images to ``scaling_factor * z`` (``vae/config.json``), kept in memory (``data.cache_latents``); the
CLIP text encoder is frozen (``train.text_encoder=True`` trains it too) and encodes the captions,
tokenized by the folder's tokenizer to 77 tokens and dropped to "" with probability
``diffusion.p_uncond`` (classifier-free guidance). The noise schedule and the prediction type are the
folder's ``scheduler/scheduler_config.json`` (``diffusion.prediction=""``: its ``prediction_type``).
The images: ``data.name=folder:PATH``, a folder with ``metadata.jsonl`` (``{"file_name", "text"}``
lines) or a ``.txt`` caption beside each image, centre-cropped and resized to ``data.image_size``.
The run's metadata records the folder: sampling and resuming read the frozen weights from it.
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.task = "finetune"  # a Stable Diffusion folder (model.pretrained)
    c.seed = 0
    c.num_devices = 0  # 0 = all visible devices
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 0
    c.mesh.fsdp = 1  # devices that also split params, EMA and optimizer state (FSDP)

    c.data = ml_collections.ConfigDict()
    c.data.name = ""  # folder:PATH of captioned images (required)
    c.data.image_size = 512  # SD 1.x's native size; any multiple of 64
    c.data.data_dir = ""
    c.data.random_flip = False
    c.data.conditional = True  # batches carry the captions
    c.data.holdout = ""
    c.data.cache_latents = True  # False: encode every batch again (flat memory, slower steps)
    c.data.encode_batch_size = 8  # images per compiled VAE-encoder call

    c.model = ml_collections.ConfigDict()
    c.model.pretrained = ""  # a Stable Diffusion 1.x folder in diffusers layout (required)
    c.model.dtype = "bfloat16"  # compute dtype of the U-Net and text encoder; params stay float32
    c.model.remat = True  # gradient checkpointing of the U-Net's ResBlocks and transformers
    c.model.lora_rank = 0  # 0 = full fine-tuning of the U-Net; r > 0: LoRA adapters of rank r only
    c.model.lora_alpha = 4.0  # LoRA scale alpha / rank
    c.model.lora_targets = ("to_k", "to_q", "to_v", "to_out.0")  # diffusers/peft module names (attention)

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.schedule = "pretrained"  # the folder's scheduler_config.json (set by the loader)
    c.diffusion.num_timesteps = 1000  # the folder's num_train_timesteps (set by the loader)
    c.diffusion.prediction = ""  # "" = the folder's prediction_type (eps for SD 1.x)
    c.diffusion.min_snr_gamma = 0.0  # 0 = off
    c.diffusion.p_uncond = 0.1  # caption dropout to "" for classifier-free guidance

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 1000
    c.train.batch_size = 1
    c.train.lr = 1e-5  # full fine-tuning; LoRA takes ~1e-4
    c.train.warmup_steps = 0
    c.train.cosine_decay = False
    c.train.weight_decay = 1e-2
    c.train.grad_clip = 1.0
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.ema_decay = 0.9999
    c.train.text_encoder = False  # True: train the CLIP text encoder too (full fine-tuning of it)
    c.train.log_every = 10
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 2
    c.train.sample_every = 0  # 0 = only at the end
    c.train.num_samples = 4
    # FID of sample.prompts (cycled) vs the folder during training: eval_every > 0 and eval_inception
    c.train.eval_every = 0  # 0 = off
    c.train.eval_num = 100
    c.train.eval_inception = ""
    c.train.eval_fid_ref = ""

    c.sample = ml_collections.ConfigDict()
    c.sample.method = "dpmpp_2m"
    c.sample.num_steps = 25
    c.sample.eta = 0.0
    c.sample.guidance = 7.5
    c.sample.clip_x0 = 0.0  # latents: no x0 clipping
    c.sample.seed = 0
    c.sample.prompts = ["a photo"]
    return c
