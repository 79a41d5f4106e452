"""Config -> parts: the dataset, model, schedule, autoencoder and discriminator an experiment config
describes, the metadata stored with its checkpoints, and the frozen VAE a latent config names.

    >>> from jaxdiff.train import build
    >>> model = build.build_model(config, image_shape=(8, 8, 1), num_classes=10)
    >>> dataset = build.make_dataset(config, "train")     # ImageDataset, or LatentDataset of its VAE

Latent diffusion: a config with ``vae.workdir`` set trains the U-Net on ``scale_factor * z`` of a
frozen KL autoencoder trained by ``experiments/configs/vae_*.py`` (:func:`load_vae`,
:class:`jaxdiff.data.latent.LatentDataset`); the model then carries the autoencoder, so sampling
returns pixels for pixel-space and latent runs alike.

Fine-tuning Stable Diffusion: a config with ``model.pretrained`` set (``experiments/configs/sd_finetune.py``)
names a diffusers SD 1.x folder; :func:`load_pretrained` reads it once (U-Net, frozen VAE and CLIP
text encoder, tokenizer, the noise schedule and prediction type of ``scheduler/scheduler_config.json``,
the VAE's ``scaling_factor``) into a :class:`jaxdiff.models.PretrainedTextDiffusionModel`.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import config as config_lib
from jaxdiff.config import Config
from jaxdiff.data import ImageDataset
from jaxdiff.data.latent import LatentDataset
from jaxdiff import text_to_image
from jaxdiff.diffusion import PREDICTIONS
from jaxdiff.models import (DTYPES, DiffusionModel, LatentAutoencoder, PretrainedTextDiffusionModel,
                            TextDiffusionModel, VAEModel)
from jaxdiff.nn.discriminator import PatchDiscriminator
from jaxdiff.nn.text import CLIPTextTransformer
from jaxdiff.nn.unet import UNet
from jaxdiff.nn.unet_cond import TextConditionedUNet, UNetCondition
from jaxdiff.nn.vae import AutoencoderKL
from jaxdiff.schedules import Schedule, make_schedule
from jaxdiff.tokenizers import WordTokenizer
from jaxdiff.train.checkpoint import CheckpointError, Checkpointer


def is_latent(config: Config) -> bool:
    """True for a latent diffusion config trained on a VAE run's latents (``config.vae.workdir``);
    a fine-tune works on its folder's VAE latents (:func:`is_pretrained`)."""
    return config_lib.parse(config).latent


def make_dataset(config: Config, split: str = "train", *, vae_step: int | None = None,
                 autoencoder: LatentAutoencoder | None = None):
    """The config's :class:`ImageDataset`; for a latent config the :class:`LatentDataset` of its VAE
    (at ``vae_step``, default ``config.vae.step`` or the VAE run's latest checkpoint); for a
    ``model.pretrained`` config the :class:`LatentDataset` of the folder's VAE (``autoencoder``, the
    model's from :func:`load_pretrained`), cached in memory unless ``data.cache_latents`` is False."""
    config = config_lib.parse(config)
    images = _image_dataset(config, split)
    if is_pretrained(config):
        if autoencoder is None:
            raise ValueError("make_dataset: a model.pretrained config needs the model's autoencoder "
                             "(build.load_pretrained(config)[1].autoencoder).")
        if tuple(images.image_shape) != tuple(autoencoder.vae.image_shape):
            raise ValueError(f"The data's images are {tuple(images.image_shape)} but the model encodes "
                             f"{tuple(autoencoder.vae.image_shape)}.")
        if "caption" not in images.annotation_keys:
            raise ValueError(f"Fine-tuning {config.model.pretrained} needs captioned images: {images.name} has no "
                             "captions (a folder with metadata.jsonl or a .txt beside each image, and "
                             "data.conditional=True).")
        return LatentDataset(images, autoencoder, sample_posterior=True, cache=config.data.cache_latents)
    if not is_latent(config):
        return images
    if vae_step is None:
        vae_step = config.vae.step
    autoencoder = load_vae(config.vae.workdir, vae_step)
    if tuple(images.image_shape) != tuple(autoencoder.vae.image_shape):
        raise ValueError(
            f"The data's images are {tuple(images.image_shape)} but the VAE in {autoencoder.workdir} was trained on "
            f"{tuple(autoencoder.vae.image_shape)}: set data.image_size (and the dataset) to the VAE's.")
    return LatentDataset(images, autoencoder, sample_posterior=config.vae.sample_posterior)


def _image_dataset(config: Config, split: str) -> ImageDataset:
    d = config.data
    return ImageDataset(d.name, split, batch_size=config.train.batch_size, image_size=d.image_size, seed=config.seed,
                        data_dir=d.data_dir, random_flip=d.random_flip, drop_labels=not d.conditional,
                        holdout=d.holdout)


def build_schedule(config: Config) -> Schedule:
    """The config's noise schedule; for ``model.pretrained`` the folder's own (its scheduler_config.json)."""
    config = config_lib.parse(config)
    if is_pretrained(config):
        return text_to_image.build_schedule(pretrained_scheduler(config.model.pretrained))
    d = config.diffusion
    return make_schedule(d.schedule, d.num_timesteps, **d.schedule_options)


def _dtype(m) -> jnp.dtype:
    if m.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {list(DTYPES)}, got {m.dtype!r}.")
    return DTYPES[m.dtype]


def build_model(config: Config, image_shape, num_classes: int | None,
                autoencoder: "LatentAutoencoder | None" = None) -> DiffusionModel:
    """The :class:`DiffusionModel` of a ``diffusion`` / ``latent`` task (a :class:`TextDiffusionModel`
    for a ``text`` task), its prediction type bound from ``diffusion.prediction``."""
    config = config_lib.parse(config)
    m = config.model
    if config.task == "text":
        if num_classes is not None:
            raise ValueError("A text-conditioned model (model.type='text_unet') takes captions, not class labels: "
                             "use a captioned dataset (data.name='shapes').")
        return build_text_model(config, image_shape, autoencoder)
    if config.task not in ("diffusion", "latent"):
        raise ValueError(f"build_model builds the U-Net of a diffusion, latent or text task, not {config.task!r}.")
    module = UNet(ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
                  attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout, num_classes=num_classes,
                  num_groups=m.num_groups, num_heads=m.num_heads, dtype=_dtype(m), remat=m.remat)
    return DiffusionModel(module, tuple(int(s) for s in image_shape), num_classes, autoencoder,
                          prediction=config.diffusion.prediction)


def build_text_model(config: Config, image_shape,
                     autoencoder: "LatentAutoencoder | None" = None) -> TextDiffusionModel:
    """The :class:`TextDiffusionModel` of a ``model.type = "text_unet"`` config.

    ``config.text``: ``words`` (the tokenizer's vocabulary), ``max_length``, and the CLIP text
    transformer's ``hidden_size``, ``intermediate_size``, ``num_layers``, ``num_heads``.
    ``config.model``: :class:`jaxdiff.nn.UNetCondition` fields (``block_out_channels``,
    ``layers_per_block``, ``down_block_types``, ``up_block_types``, ``mid_block_type``,
    ``attention_head_dim`` (number of heads), ``transformer_layers_per_block``,
    ``use_linear_projection``, ``norm_num_groups``, ``dropout``, ``dtype``, ``remat``); the
    cross-attention width is ``text.hidden_size``."""
    config = config_lib.parse(config)
    m, tc = config.model, config.text
    dtype = _dtype(m)
    tokenizer = WordTokenizer(list(tc.words), model_max_length=int(tc.max_length))
    text = CLIPTextTransformer(
        vocab_size=tokenizer.vocab_size, hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size,
        num_layers=tc.num_layers, num_heads=tc.num_heads, max_position_embeddings=int(tc.max_length),
        eos_token_id=tokenizer.eos_token_id, dtype=dtype)
    c = int(image_shape[-1])
    unet = UNetCondition(
        in_channels=c, out_channels=c, block_out_channels=tuple(m.block_out_channels),
        layers_per_block=m.layers_per_block, down_block_types=tuple(m.down_block_types),
        up_block_types=tuple(m.up_block_types), mid_block_type=m.mid_block_type,
        cross_attention_dim=tc.hidden_size, attention_head_dim=m.attention_head_dim,
        transformer_layers_per_block=m.transformer_layers_per_block,
        use_linear_projection=m.use_linear_projection, norm_num_groups=m.norm_num_groups,
        dropout=m.dropout, dtype=dtype, remat=m.remat)
    if text.hidden_size != unet.cross_attention_dim:  # cannot happen from a config; guards direct use
        raise ValueError("text.hidden_size must equal the U-Net's cross_attention_dim.")
    return TextDiffusionModel(TextConditionedUNet(text, unet), tuple(int(s) for s in image_shape), None, autoencoder,
                              prediction=config.diffusion.prediction, tokenizer=tokenizer,
                              max_length=int(tc.max_length))


# ----------------------------------------------------------------------------- pretrained folders
def is_pretrained(config: Config) -> bool:
    """True for a config that fine-tunes a Stable Diffusion folder (task ``finetune``: a
    ``model.pretrained`` key; an empty one is an error :func:`load_pretrained` reports)."""
    return config_lib.parse(config).task == "finetune"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def pretrained_scheduler(folder: str) -> "text_to_image.SchedulerConfig":
    """The :class:`jaxdiff.text_to_image.SchedulerConfig` of a folder's ``scheduler/scheduler_config.json``."""
    path = os.path.join(os.path.expanduser(folder), "scheduler", "scheduler_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return text_to_image.SchedulerConfig.from_diffusers(json.load(f), path)
    except (OSError, ValueError) as e:
        raise ValueError(f"model.pretrained={folder}: cannot read its scheduler config ({_one_line(e)}).") from e


def _check_pretrained_config(config: Config) -> str:
    m = config.model
    folder = os.path.abspath(os.path.expanduser(m.pretrained))
    given = m.pretrained
    if not given:
        raise ValueError("model.pretrained is not set: give --config.model.pretrained=PATH, a Stable Diffusion 1.x "
                         "folder in diffusers layout (unet/ vae/ text_encoder/ tokenizer/ scheduler/).")
    if not os.path.isdir(folder):
        raise ValueError(f"model.pretrained={given}: no such folder; give a Stable Diffusion 1.x folder in diffusers "
                         "layout (unet/ vae/ text_encoder/ tokenizer/ scheduler/).")
    _dtype(m)
    if m.lora_rank:
        if m.lora_alpha is not None and not m.lora_alpha > 0:
            raise ValueError(f"model.lora_alpha must be > 0, got {m.lora_alpha!r}.")
        if not m.lora_targets:
            raise ValueError("model.lora_targets is empty: name the layers to adapt as diffusers/peft do, e.g. "
                             "('to_q', 'to_k', 'to_v', 'to_out.0').")
    if not config.data.name:
        raise ValueError("data.name is not set: give --config.data.name=folder:PATH, a folder of images captioned by "
                         "metadata.jsonl or a .txt beside each image.")
    p = config.diffusion.prediction
    if p and p not in PREDICTIONS:
        raise ValueError(f"diffusion.prediction must be '' (the folder's), 'eps', 'v' or 'x0', got {p!r}.")
    return folder


def load_pretrained(config: Config) -> tuple[Config, PretrainedTextDiffusionModel]:
    """Read the Stable Diffusion folder of ``config.model.pretrained`` once: ``(config, model)``.

    The returned config is a copy with ``model.pretrained`` made absolute and the folder's facts
    filled in where the config leaves them open: ``diffusion.prediction`` ("" = the scheduler's
    ``prediction_type``), ``diffusion.num_timesteps`` and ``diffusion.schedule`` (``"pretrained"``:
    :func:`build_schedule` reads the folder's). ``model.dtype`` is the compute dtype of the U-Net and
    text encoder (params stay float32), ``model.remat`` rematerialises the U-Net's blocks; the VAE
    encodes in float32. Raises ``ValueError`` (one line) for a missing or invalid folder or setting."""
    config = config_lib.parse(config)
    folder = _check_pretrained_config(config)
    m = config.model
    dtype = _dtype(m)
    try:
        sd = text_to_image.load_stable_diffusion(folder, dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"model.pretrained={m.pretrained}: {_one_line(e)}") from e
    scheduler = sd.scheduler
    size = config.data.image_size or sd.default_size
    f = sd.vae_scale_factor
    unet_f = 2 ** (len(sd.unet.block_out_channels) - 1)
    if size % (f * unet_f):
        raise ValueError(f"data.image_size={size} must be a multiple of {f * unet_f} for {folder} (VAE factor {f} x "
                         f"U-Net downsampling {unet_f}); its native size is {sd.default_size}.")
    config = config_lib.replace(
        config, model={"pretrained": folder}, data={"image_size": int(size)},
        diffusion={"prediction": config.diffusion.prediction or scheduler.prediction,
                   "num_timesteps": scheduler.num_train_timesteps, "schedule": "pretrained"})
    params = jax.device_get(sd.params)  # host copies: placed on the mesh by the loop
    vae_params = jax.device_put(params["vae"], jax.local_devices()[0])  # encoding is per process
    vae = VAEModel(sd.vae.clone(dtype=jnp.float32), (size, size, int(sd.vae.in_channels)))
    autoencoder = LatentAutoencoder(vae, vae_params, sd.scaling_factor, folder, 0,
                                    shift_factor=sd.vae.shift_factor,
                                    encode_chunk=config.data.encode_batch_size)
    targets, rank = tuple(m.lora_targets), m.lora_rank
    model = PretrainedTextDiffusionModel(
        sd.unet.clone(remat=m.remat), tuple(int(s) for s in vae.latent_shape), None, autoencoder,
        prediction=config.diffusion.prediction, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer,
        base={"unet": params["unet"], "text_encoder": params["text_encoder"]}, folder=folder,
        use_attention_mask=sd.use_attention_mask, train_text_encoder=config.train.text_encoder,
        lora_rank=rank, lora_alpha=float(m.lora_alpha or rank), lora_targets=targets)
    if rank:
        from jaxdiff.nn import lora

        try:
            lora.lora_targets(model.base["unet"], targets)
        except ValueError as e:
            raise ValueError(f"model.lora_targets={list(targets)}: {_one_line(e)} (the U-Net of {folder}).") from e
    return config, model


def place(tree, shardings):
    """Host arrays (the same on every process) -> global arrays laid out by ``shardings``; each process
    transfers only its own shards (works for any number of processes)."""
    def one(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(one, tree, shardings)


def run_metadata(config: Config, dataset: ImageDataset, model: DiffusionModel) -> dict:
    """JSON-able facts stored with every checkpoint (what sampling needs without the config file).

    A latent model adds ``vae``: the VAE run's absolute ``workdir``, its checkpoint ``step`` and the
    ``scale_factor`` the latents were multiplied by."""
    config = config_lib.parse(config)
    plain = json.loads(json.dumps(config_lib.to_dict(config)))  # JSON types: tuples become lists
    meta = {
        "task": "diffusion",
        "config": plain,
        # What fixes the parameter layout (compute dtype, remat and dropout may change on resume).
        "model": json.loads(json.dumps({
            "image_shape": list(model.image_shape),
            "num_classes": model.num_classes,
            "arch": config_lib.model_arch(plain["model"]),
            **({"text": plain["text"]} if config.text is not None else {}),
        })),
        "dataset": {"name": dataset.name, "num_examples": dataset.num_examples,
                    **({"class_names": dataset.class_names} if getattr(dataset, "class_names", None) else {})},
    }
    if isinstance(model, PretrainedTextDiffusionModel):  # the frozen weights come from the folder, not the checkpoint
        ae = model.autoencoder
        meta["pretrained"] = {
            "folder": model.folder, "scaling_factor": ae.scale_factor, "shift_factor": ae.shift_factor,
            "image_shape": list(ae.vae.image_shape), "latent_shape": list(model.image_shape),
            "scheduler": dataclasses.asdict(pretrained_scheduler(model.folder)),
            "trainable": sorted(jax.eval_shape(model.init_params, jax.random.key(0))),
            "lora": ({"rank": model.lora_rank, "alpha": model.lora_alpha, "targets": list(model.lora_targets)}
                     if model.lora else None),
        }
    elif model.autoencoder is not None:
        ae = model.autoencoder
        meta["vae"] = {"workdir": ae.workdir, "step": ae.step, "scale_factor": ae.scale_factor,
                       "image_shape": list(ae.vae.image_shape), "latent_shape": list(ae.vae.latent_shape)}
    return meta


def build_vae(config: Config, image_shape) -> VAEModel:
    """The :class:`VAEModel` of a VAE config (``config.model``: block_out_channels, layers_per_block,
    latent_channels, norm_num_groups, mid_block_add_attention, dtype, remat)."""
    config = config_lib.parse(config)
    m = config.model
    dtype = _dtype(m)
    h, w, c = (int(s) for s in image_shape)
    module = AutoencoderKL(
        in_channels=c,
        out_channels=c,
        block_out_channels=tuple(m.block_out_channels),
        layers_per_block=m.layers_per_block,
        latent_channels=m.latent_channels,
        norm_num_groups=m.norm_num_groups,
        mid_block_add_attention=m.mid_block_add_attention,
        use_quant_conv=m.use_quant_conv,
        use_post_quant_conv=m.use_post_quant_conv,
        dtype=dtype,
        remat=m.remat,
    )
    f = module.downsample_factor
    if h % f or w % f:
        raise ValueError(f"The VAE downsamples by f={f} (len(block_out_channels)={len(m.block_out_channels)} levels); "
                         f"the image size {h}x{w} must be divisible by it (set data.image_size).")
    return VAEModel(module, (h, w, c))


def build_discriminator(config: Config) -> PatchDiscriminator | None:
    """The config's PatchGAN discriminator, or None when ``config.disc.weight`` is 0 (or absent)."""
    d = config_lib.parse(config).disc
    if d is None or not d.weight:
        return None
    return PatchDiscriminator(ndf=d.ndf, n_layers=d.n_layers, num_groups=d.num_groups)


def vae_run_metadata(config: Config, dataset: ImageDataset, vae: VAEModel,
                     disc: PatchDiscriminator | None) -> dict:
    """JSON-able facts stored with every VAE checkpoint; each checkpoint adds its ``latent`` stats."""
    config = config_lib.parse(config)
    plain = json.loads(json.dumps(config_lib.to_dict(config)))  # JSON types: tuples become lists
    arch = config_lib.model_arch(plain["model"])
    return {
        "task": "vae",
        "config": plain,
        "model": json.loads(json.dumps({
            "image_shape": list(vae.image_shape),
            "latent_shape": list(vae.latent_shape),
            "arch": arch,
            "disc": None if disc is None else {"ndf": disc.ndf, "n_layers": disc.n_layers, "num_groups": disc.num_groups},
        })),
        "dataset": {"name": dataset.name, "num_examples": dataset.num_examples},
    }


VAE_TRAIN_COMMAND = "python -m experiments.train --config=experiments/configs/vae_digits.py --workdir={workdir}"


class VAENotReadyError(FileNotFoundError):
    """The VAE run a latent diffusion config names is missing, has no checkpoint, or is no VAE run."""


def load_vae(workdir: str, step: int | None = None) -> LatentAutoencoder:
    """The EMA params and scale factor of a VAE run (``experiments/configs/vae_*.py``) at ``step``
    (default: its latest checkpoint). Raises :class:`VAENotReadyError` with the command that makes it."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    make = VAE_TRAIN_COMMAND.format(workdir=workdir)
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise VAENotReadyError(
            f"No trained VAE in {workdir} (no checkpoints folder): latent diffusion needs a VAE run first. "
            f"Create it with\n    {make}\nor set --config.vae.workdir to an existing VAE run.")
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise VAENotReadyError(f"The VAE run {workdir} has no checkpoint yet. Train it (re-running resumes):\n    {make}")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise VAENotReadyError(
                f"The VAE run {workdir} has no checkpoint at step {step} (it has {sorted(steps)}); a latent model "
                "must use the VAE checkpoint it was trained with. Restore that checkpoint or train a new latent model.")
        try:
            meta = ckpt.restore_meta(step)
        except Exception as e:
            raise VAENotReadyError(f"Cannot read the VAE checkpoint {step} in {workdir} ({e}).") from e
        if meta.get("task") != "vae":
            raise VAENotReadyError(
                f"{workdir} is not a VAE run (its checkpoints hold a {meta.get('task', 'diffusion')} model). "
                f"Point --config.vae.workdir at a VAE run, made by\n    {make}")
        if not (meta.get("latent") or {}).get("scale_factor"):
            raise VAENotReadyError(f"The VAE checkpoint {step} in {workdir} has no latent scale factor; re-run\n    {make}")
        config = config_lib.parse(meta["config"], stored=True)
        vae = build_vae(config, meta["model"]["image_shape"])
        abstract = jax.eval_shape(vae.init_params, jax.random.key(0))
        # On this process's own first device: encoding and decoding are local computations.
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract)
        try:
            params = ckpt.restore_subtree(step, "ema_params", target)
        except Exception as e:
            raise CheckpointError(f"Could not restore the VAE params of checkpoint {step} in {workdir} ({e}).") from e
    finally:
        ckpt.close()
    num_steps = int(config.train.num_steps)
    if step < num_steps:
        print(f"Warning: the VAE run {workdir} is at step {step} of {num_steps} (unfinished); using that checkpoint. "
              f"Finish it with\n    {make}", flush=True)
    return LatentAutoencoder(vae, params, float(meta["latent"]["scale_factor"]), workdir, int(step), config)
