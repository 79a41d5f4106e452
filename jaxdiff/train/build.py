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
import ml_collections
import numpy as np

from jaxdiff.data import ImageDataset
from jaxdiff.data.latent import LatentDataset
from jaxdiff import text_to_image
from jaxdiff.models import (DTYPES, DiffusionModel, LatentAutoencoder, PretrainedTextDiffusionModel,
                            TextDiffusionModel, VAEModel)
from jaxdiff.nn.discriminator import PatchDiscriminator
from jaxdiff.nn.text import CLIPTextTransformer
from jaxdiff.nn.unet import UNet
from jaxdiff.nn.unet_cond import CROSS_MID, TextConditionedUNet, UNetCondition
from jaxdiff.nn.vae import AutoencoderKL
from jaxdiff.schedules import Schedule, make_schedule
from jaxdiff.tokenizers import WordTokenizer
from jaxdiff.train.checkpoint import CheckpointError, Checkpointer


def is_latent(config: ml_collections.ConfigDict) -> bool:
    """True for a latent diffusion config (``config.vae.workdir`` names a trained VAE run)."""
    return config.get("task", "diffusion") != "vae" and bool(config.get("vae") and config.vae.get("workdir"))


def make_dataset(config: ml_collections.ConfigDict, split: str = "train", *, vae_step: int | None = None,
                 autoencoder: LatentAutoencoder | None = None):
    """The config's :class:`ImageDataset`; for a latent config the :class:`LatentDataset` of its VAE
    (at ``vae_step``, default ``config.vae.step`` or the VAE run's latest checkpoint); for a
    ``model.pretrained`` config the :class:`LatentDataset` of the folder's VAE (``autoencoder``, the
    model's from :func:`load_pretrained`), cached in memory unless ``data.cache_latents`` is False."""
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
        return LatentDataset(images, autoencoder, sample_posterior=True,
                             cache=bool(config.data.get("cache_latents", True)))
    if not is_latent(config):
        return images
    if vae_step is None:
        vae_step = config.vae.get("step") or None
    autoencoder = load_vae(config.vae.workdir, vae_step)
    if tuple(images.image_shape) != tuple(autoencoder.vae.image_shape):
        raise ValueError(
            f"The data's images are {tuple(images.image_shape)} but the VAE in {autoencoder.workdir} was trained on "
            f"{tuple(autoencoder.vae.image_shape)}: set data.image_size (and the dataset) to the VAE's.")
    return LatentDataset(images, autoencoder, sample_posterior=config.vae.get("sample_posterior", True))


def _image_dataset(config: ml_collections.ConfigDict, split: str) -> ImageDataset:
    d = config.data
    return ImageDataset(
        d.name,
        split,
        batch_size=config.train.batch_size,
        image_size=d.get("image_size") or None,
        seed=config.seed,
        data_dir=d.get("data_dir") or None,
        random_flip=d.get("random_flip", False),
        drop_labels=not d.get("conditional", False),
        holdout=d.get("holdout") or None,
    )


def build_schedule(config: ml_collections.ConfigDict) -> Schedule:
    """The config's noise schedule; for ``model.pretrained`` the folder's own (its scheduler_config.json)."""
    if is_pretrained(config):
        return text_to_image.build_schedule(pretrained_scheduler(config.model.pretrained))
    d = config.diffusion
    options = dict(d.get("schedule_options", {}) or {})
    return make_schedule(d.schedule, d.num_timesteps, **options)


def build_model(config: ml_collections.ConfigDict, image_shape, num_classes: int | None,
                autoencoder: "LatentAutoencoder | None" = None) -> DiffusionModel:
    m = config.model
    if m.get("dtype", "float32") not in DTYPES:
        raise ValueError(f"model.dtype must be one of {list(DTYPES)}, got {m.dtype!r}.")
    kind = m.get("type", "unet")
    if kind == "text_unet":
        if num_classes is not None:
            raise ValueError("A text-conditioned model (model.type='text_unet') takes captions, not class labels: "
                             "use a captioned dataset (data.name='shapes').")
        return build_text_model(config, image_shape, autoencoder)
    if kind != "unet":
        raise ValueError(f"model.type must be 'unet' (class-conditional or unconditional) or 'text_unet', got {kind!r}.")
    module = UNet(
        ch=m.ch,
        ch_mult=tuple(m.ch_mult),
        num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions),
        dropout=m.dropout,
        num_classes=num_classes,
        num_groups=m.get("num_groups", 32),
        num_heads=m.get("num_heads", 1),
        dtype=DTYPES[m.get("dtype", "float32")],
        remat=m.get("remat", False),
    )
    return DiffusionModel(module, tuple(int(s) for s in image_shape), num_classes, autoencoder)


def build_text_model(config: ml_collections.ConfigDict, image_shape,
                     autoencoder: "LatentAutoencoder | None" = None) -> TextDiffusionModel:
    """The :class:`TextDiffusionModel` of a ``model.type = "text_unet"`` config.

    ``config.text``: ``words`` (the tokenizer's vocabulary), ``max_length``, and the CLIP text
    transformer's ``hidden_size``, ``intermediate_size``, ``num_layers``, ``num_heads``.
    ``config.model``: :class:`jaxdiff.nn.UNetCondition` fields (``block_out_channels``,
    ``layers_per_block``, ``down_block_types``, ``up_block_types``, ``mid_block_type``,
    ``attention_head_dim`` (number of heads), ``transformer_layers_per_block``,
    ``use_linear_projection``, ``norm_num_groups``, ``dropout``, ``dtype``, ``remat``); the
    cross-attention width is ``text.hidden_size``."""
    if "text" not in config:
        raise ValueError("model.type='text_unet' needs a config.text section (words, max_length, hidden_size, ...).")
    m, tc = config.model, config.text
    dtype = DTYPES[m.get("dtype", "float32")]
    tokenizer = WordTokenizer(list(tc.words), model_max_length=int(tc.max_length))
    text = CLIPTextTransformer(
        vocab_size=tokenizer.vocab_size, hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size,
        num_layers=tc.num_layers, num_heads=tc.num_heads, max_position_embeddings=int(tc.max_length),
        eos_token_id=tokenizer.eos_token_id, dtype=dtype)
    c = int(image_shape[-1])
    unet = UNetCondition(
        in_channels=c, out_channels=c, block_out_channels=tuple(m.block_out_channels),
        layers_per_block=m.layers_per_block, down_block_types=tuple(m.down_block_types),
        up_block_types=tuple(m.up_block_types), mid_block_type=m.get("mid_block_type", CROSS_MID) or None,
        cross_attention_dim=tc.hidden_size, attention_head_dim=m.attention_head_dim,
        transformer_layers_per_block=m.get("transformer_layers_per_block", 1),
        use_linear_projection=m.get("use_linear_projection", True), norm_num_groups=m.get("norm_num_groups", 32),
        dropout=m.get("dropout", 0.0), dtype=dtype, remat=m.get("remat", False))
    if text.hidden_size != unet.cross_attention_dim:  # cannot happen from a config; guards direct use
        raise ValueError("text.hidden_size must equal the U-Net's cross_attention_dim.")
    return TextDiffusionModel(TextConditionedUNet(text, unet), tuple(int(s) for s in image_shape), None, autoencoder,
                              tokenizer=tokenizer, max_length=int(tc.max_length))


# ----------------------------------------------------------------------------- pretrained folders
def is_pretrained(config: ml_collections.ConfigDict) -> bool:
    """True for a config that fine-tunes a Stable Diffusion folder (it has a ``model.pretrained`` key;
    an empty one is an error :func:`load_pretrained` reports)."""
    return "model" in config and "pretrained" in config.model


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


def _check_pretrained_config(config: ml_collections.ConfigDict) -> str:
    m = config.model
    folder = os.path.abspath(os.path.expanduser(str(m.get("pretrained") or "")))
    given = m.get("pretrained")
    if not given:
        raise ValueError("model.pretrained is not set: give --config.model.pretrained=PATH, a Stable Diffusion 1.x "
                         "folder in diffusers layout (unet/ vae/ text_encoder/ tokenizer/ scheduler/).")
    if not os.path.isdir(folder):
        raise ValueError(f"model.pretrained={given}: no such folder; give a Stable Diffusion 1.x folder in diffusers "
                         "layout (unet/ vae/ text_encoder/ tokenizer/ scheduler/).")
    if m.get("dtype", "float32") not in DTYPES:
        raise ValueError(f"model.dtype must be one of {list(DTYPES)}, got {m.dtype!r}.")
    rank = m.get("lora_rank", 0)
    if not isinstance(rank, int) or rank < 0:
        raise ValueError(f"model.lora_rank must be an int >= 0 (0 = full fine-tuning), got {rank!r}.")
    if rank:
        if not float(m.get("lora_alpha", rank)) > 0:
            raise ValueError(f"model.lora_alpha must be > 0, got {m.get('lora_alpha')!r}.")
        if not tuple(m.get("lora_targets", ()) or ()):
            raise ValueError("model.lora_targets is empty: name the layers to adapt as diffusers/peft do, e.g. "
                             "('to_q', 'to_k', 'to_v', 'to_out.0').")
    if not config.data.get("name"):
        raise ValueError("data.name is not set: give --config.data.name=folder:PATH, a folder of images captioned by "
                         "metadata.jsonl or a .txt beside each image.")
    p = config.diffusion.get("prediction", "")
    if p and p not in ("eps", "v", "x0"):
        raise ValueError(f"diffusion.prediction must be '' (the folder's), 'eps', 'v' or 'x0', got {p!r}.")
    return folder


def load_pretrained(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict,
                                                                PretrainedTextDiffusionModel]:
    """Read the Stable Diffusion folder of ``config.model.pretrained`` once: ``(config, model)``.

    The returned config is a copy with ``model.pretrained`` made absolute and the folder's facts
    filled in where the config leaves them open: ``diffusion.prediction`` ("" = the scheduler's
    ``prediction_type``), ``diffusion.num_timesteps`` and ``diffusion.schedule`` (``"pretrained"``:
    :func:`build_schedule` reads the folder's). ``model.dtype`` is the compute dtype of the U-Net and
    text encoder (params stay float32), ``model.remat`` rematerialises the U-Net's blocks; the VAE
    encodes in float32. Raises ``ValueError`` (one line) for a missing or invalid folder or setting."""
    folder = _check_pretrained_config(config)
    m = config.model
    dtype = DTYPES[m.get("dtype", "float32")]
    try:
        sd = text_to_image.load_stable_diffusion(folder, dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"model.pretrained={m.pretrained}: {_one_line(e)}") from e
    scheduler = sd.scheduler
    config = ml_collections.ConfigDict(config.to_dict())  # a copy: the caller's (locked) config is left alone
    config.model.pretrained = folder
    if not config.diffusion.get("prediction"):
        config.diffusion.prediction = scheduler.prediction
    config.diffusion.num_timesteps = scheduler.num_train_timesteps
    config.diffusion.schedule = "pretrained"

    size = config.data.get("image_size") or sd.default_size
    f = sd.vae_scale_factor
    unet_f = 2 ** (len(sd.unet.block_out_channels) - 1)
    if size % (f * unet_f):
        raise ValueError(f"data.image_size={size} must be a multiple of {f * unet_f} for {folder} (VAE factor {f} x "
                         f"U-Net downsampling {unet_f}); its native size is {sd.default_size}.")
    config.data.image_size = int(size)
    params = jax.device_get(sd.params)  # host copies: placed on the mesh by the loop
    vae_params = jax.device_put(params["vae"], jax.local_devices()[0])  # encoding is per process
    vae = VAEModel(sd.vae.clone(dtype=jnp.float32), (size, size, int(sd.vae.in_channels)))
    autoencoder = LatentAutoencoder(vae, vae_params, sd.scaling_factor, folder, 0,
                                    shift_factor=sd.vae.shift_factor,
                                    encode_chunk=int(config.data.get("encode_batch_size", 8) or 8))
    targets = tuple(m.get("lora_targets", ()) or ())
    rank = int(m.get("lora_rank", 0))
    model = PretrainedTextDiffusionModel(
        sd.unet.clone(remat=bool(m.get("remat", False))), tuple(int(s) for s in vae.latent_shape), None, autoencoder,
        text_encoder=sd.text_encoder, tokenizer=sd.tokenizer,
        base={"unet": params["unet"], "text_encoder": params["text_encoder"]}, folder=folder,
        use_attention_mask=sd.use_attention_mask, train_text_encoder=bool(config.train.get("text_encoder", False)),
        lora_rank=rank, lora_alpha=float(m.get("lora_alpha", rank) or rank), lora_targets=targets)
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


def run_metadata(config: ml_collections.ConfigDict, dataset: ImageDataset, model: DiffusionModel) -> dict:
    """JSON-able facts stored with every checkpoint (what sampling needs without the config file).

    A latent model adds ``vae``: the VAE run's absolute ``workdir``, its checkpoint ``step`` and the
    ``scale_factor`` the latents were multiplied by."""
    meta = {
        "task": "diffusion",
        "config": json.loads(config.to_json_best_effort()),
        # What fixes the parameter layout (compute dtype, remat and dropout may change on resume).
        "model": json.loads(json.dumps({
            "image_shape": list(model.image_shape),
            "num_classes": model.num_classes,
            "arch": {k: v for k, v in config.model.to_dict().items() if k not in ("dtype", "remat", "dropout")},
            **({"text": config.text.to_dict()} if model.text_conditional and "text" in config else {}),
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


def build_vae(config: ml_collections.ConfigDict, image_shape) -> VAEModel:
    """The :class:`VAEModel` of a VAE config (``config.model``: block_out_channels, layers_per_block,
    latent_channels, norm_num_groups, mid_block_add_attention, dtype, remat)."""
    m = config.model
    if m.get("dtype", "float32") not in DTYPES:
        raise ValueError(f"model.dtype must be one of {list(DTYPES)}, got {m.dtype!r}.")
    h, w, c = (int(s) for s in image_shape)
    module = AutoencoderKL(
        in_channels=c,
        out_channels=c,
        block_out_channels=tuple(m.block_out_channels),
        layers_per_block=m.layers_per_block,
        latent_channels=m.latent_channels,
        norm_num_groups=m.get("norm_num_groups", 32),
        mid_block_add_attention=m.get("mid_block_add_attention", True),
        use_quant_conv=m.get("use_quant_conv", True),
        use_post_quant_conv=m.get("use_post_quant_conv", True),
        dtype=DTYPES[m.get("dtype", "float32")],
        remat=m.get("remat", False),
    )
    f = module.downsample_factor
    if h % f or w % f:
        raise ValueError(f"The VAE downsamples by f={f} (len(block_out_channels)={len(m.block_out_channels)} levels); "
                         f"the image size {h}x{w} must be divisible by it (set data.image_size).")
    return VAEModel(module, (h, w, c))


def build_discriminator(config: ml_collections.ConfigDict) -> PatchDiscriminator | None:
    """The config's PatchGAN discriminator, or None when ``config.disc.weight`` is 0 (or absent)."""
    d = config.get("disc")
    if not d or not float(d.get("weight", 0.0)):
        return None
    return PatchDiscriminator(ndf=d.get("ndf", 64), n_layers=d.get("n_layers", 3),
                              num_groups=d.get("num_groups", 8))


def vae_run_metadata(config: ml_collections.ConfigDict, dataset: ImageDataset, vae: VAEModel,
                     disc: PatchDiscriminator | None) -> dict:
    """JSON-able facts stored with every VAE checkpoint; each checkpoint adds its ``latent`` stats."""
    arch = {k: v for k, v in config.model.to_dict().items() if k not in ("dtype", "remat")}
    return {
        "task": "vae",
        "config": json.loads(config.to_json_best_effort()),
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
        config = ml_collections.ConfigDict(meta["config"])
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
