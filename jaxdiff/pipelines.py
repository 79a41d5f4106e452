"""From configs and checkpoints to models, images and files.

The glue that the experiment scripts call: build the dataset / model / schedule that a config
describes, restore the EMA params of a run, and generate images with any sampler.

    >>> from jaxdiff import pipelines
    >>> run = pipelines.load_run("runs/ddpm_digits")
    >>> images, labels = pipelines.generate(run.model, run.params, run.schedule, run.config,
    ...                                     num=16, key=jax.random.key(0), labels=[3] * 16)
    >>> images.shape, images.dtype      # uint8 [N, H, W, C]

Latent diffusion: a config with ``vae.workdir`` set trains the U-Net on ``scale_factor * z`` of a
frozen KL autoencoder trained by ``experiments/configs/vae_*.py`` (:func:`load_vae`,
:class:`LatentDataset`); the model then carries the autoencoder and :func:`generate` decodes,
so the same calls return pixels for pixel-space and latent runs.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from jaxdiff import parallel, sampling, xla
from jaxdiff.data import ImageDataset
from jaxdiff.data.pipeline import prefetched
from jaxdiff.nn.discriminator import PatchDiscriminator
from jaxdiff.nn.text import CLIPTextTransformer
from jaxdiff.nn.unet import UNet
from jaxdiff.nn.unet_cond import CROSS_MID, TextConditionedUNet, UNetCondition
from jaxdiff.nn.vae import AutoencoderKL, DiagonalGaussian
from jaxdiff.schedules import Schedule, make_schedule
from jaxdiff.tokenizers import WordTokenizer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# ----------------------------------------------------------------------------- building blocks
def is_latent(config: ml_collections.ConfigDict) -> bool:
    """True for a latent diffusion config (``config.vae.workdir`` names a trained VAE run)."""
    return config.get("task", "diffusion") != "vae" and bool(config.get("vae") and config.vae.get("workdir"))


def make_dataset(config: ml_collections.ConfigDict, split: str = "train", *, vae_step: int | None = None):
    """The config's :class:`ImageDataset`; for a latent config the :class:`LatentDataset` of its VAE
    (at ``vae_step``, default ``config.vae.step`` or the VAE run's latest checkpoint)."""
    images = _image_dataset(config, split)
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
    d = config.diffusion
    options = dict(d.get("schedule_options", {}) or {})
    return make_schedule(d.schedule, d.num_timesteps, **options)


@dataclasses.dataclass(eq=False)
class DiffusionModel:
    """A denoiser network plus what it needs to be called: image shape and label count."""

    module: UNet
    image_shape: tuple[int, int, int]  # what the U-Net sees: pixels, or latents for latent diffusion
    num_classes: int | None = None
    autoencoder: "LatentAutoencoder | None" = None  # latent diffusion: decodes samples to pixels

    text_conditional = False  # True for :class:`TextDiffusionModel`

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """Shape of the images :func:`generate` returns (decoded pixels for a latent model)."""
        return self.autoencoder.vae.image_shape if self.autoencoder is not None else self.image_shape

    def init_params(self, key: jax.Array) -> Any:
        x = jnp.zeros((1, *self.image_shape), jnp.float32)
        t = jnp.zeros((1,), jnp.float32)
        y = jnp.zeros((1,), jnp.int32) if self.conditional else None
        return self.module.init({"params": key}, x, t, y, train=False)["params"]

    def apply(self, params, x_t, t, labels=None, *, train=False, key=None) -> jax.Array:
        rngs = {"dropout": key} if train else None
        return self.module.apply({"params": params}, x_t, t, labels, train=train, rngs=rngs)

    # Sampling model functions: built once per model, so the samplers' jit cache (keyed on the
    # function) is hit on every call; params and labels come in as traced keyword arguments.
    @functools.cached_property
    def label_model_fn(self):
        def model_fn(x_t, t, labels=None, *, params):
            return self.apply(params, x_t, t, labels)

        return model_fn

    @functools.cached_property
    def uncond_model_fn(self):
        def model_fn(x_t, t, *, params):
            return self.apply(params, x_t, t)

        return model_fn

    def train_apply_fn(self, p_uncond: float = 0.0):
        """``apply_fn(params, x_t, t, batch, key)`` for :func:`jaxdiff.diffusion.diffusion_loss`.

        For a conditional model, labels are replaced by the null label with probability
        ``p_uncond`` (classifier-free guidance training, Ho & Salimans 2022)."""

        def apply_fn(params, x_t, t, batch, key):
            drop_key, dropout_key = jax.random.split(key)
            labels = None
            if self.conditional:
                labels = batch["label"]
                if p_uncond > 0:
                    drop = jax.random.bernoulli(drop_key, p_uncond, labels.shape)
                    labels = jnp.where(drop, self.num_classes, labels)
            return self.apply(params, x_t, t, labels, train=True, key=dropout_key)

        return apply_fn


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
            **({"text": config.text.to_dict()} if model.text_conditional else {}),
        })),
        "dataset": {"name": dataset.name, "num_examples": dataset.num_examples},
    }
    if model.autoencoder is not None:
        ae = model.autoencoder
        meta["vae"] = {"workdir": ae.workdir, "step": ae.step, "scale_factor": ae.scale_factor,
                       "image_shape": list(ae.vae.image_shape), "latent_shape": list(ae.vae.latent_shape)}
    return meta


# ----------------------------------------------------------------------------- sampling
def sampler_settings(config: ml_collections.ConfigDict, **overrides) -> dict:
    """The sampler keyword arguments of ``config.sample``, with ``overrides`` applied."""
    sc = config.sample
    s = {
        "method": sc.get("method", "ddpm"),
        "num_steps": sc.get("num_steps", config.diffusion.num_timesteps),
        "eta": sc.get("eta", 0.0),
        "guidance": sc.get("guidance", 1.0),
    }
    s.update({k: v for k, v in overrides.items() if v is not None})
    return s


def generate(
    model: DiffusionModel,
    params: Any,
    schedule: Schedule,
    config: ml_collections.ConfigDict,
    *,
    num: int,
    key: jax.Array,
    labels: Sequence[int] | None = None,
    batch_size: int | None = None,
    **sampler_overrides,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Sample ``num`` images: ``(uint8 [N, H, W, C], int32 labels [N] or None)``.

    For a latent model (``model.autoencoder`` set) the sampled latents are decoded: the images
    have ``model.output_shape``.

    Labels default to ``0, 1, 2, ...`` cycling over the classes for a conditional model.
    ``sampler_overrides`` (``method``, ``num_steps``, ``eta``, ``guidance``) replace ``config.sample``.
    A guidance scale other than 1 runs classifier-free guidance (conditional and null-label
    branches in one batched forward). The sampler compiles once per settings and batch shape:
    new keys, labels, params or guidance scales reuse it.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}.")
    if model.text_conditional:
        raise ValueError("This model is text-conditioned: sample it with generate_text(..., prompts=[...]) "
                         "(python -m experiments.sample --prompt '...').")
    s = sampler_settings(config, **sampler_overrides)
    if model.conditional:
        labels = np.arange(num) % model.num_classes if labels is None else np.asarray(labels)
        if labels.shape != (num,):
            raise ValueError(f"Need {num} labels (one per image), got {labels.size}.")
        if labels.min() < 0 or labels.max() >= model.num_classes:
            raise ValueError(f"Labels must be in [0, {model.num_classes}), got {labels.min()}..{labels.max()}.")
        labels = labels.astype(np.int32)
    elif labels is not None:
        raise ValueError("This model is unconditional: it takes no labels.")
    guided = model.conditional and float(s["guidance"]) != 1.0

    def batch_args(idx):
        extra = {"params": params}
        if guided:
            y = labels[idx]
            extra.update(cond=y, null_cond=np.full_like(y, model.num_classes),
                         guidance_scale=np.float32(s["guidance"]))
            return sampling.cfg_model_fn(model.label_model_fn), extra
        if model.conditional:
            extra["labels"] = labels[idx]
            return model.label_model_fn, extra
        return model.uncond_model_fn, extra

    return _sample_in_batches(model, params, schedule, config, s, key, num, batch_size, batch_args), labels


def _sample_in_batches(model, params, schedule, config, s: dict, key, num: int, batch_size: int | None,
                       batch_args) -> np.ndarray:
    """The sampling loop of :func:`generate` and :func:`generate_text`: batch ``i`` (images ``lo``
    to ``lo + n``) starts from noise and sampler keys split from ``fold_in(key, i)`` and runs
    ``batch_args(idx) -> (model_fn, extra_args)`` for the image indices ``idx``; latents are
    decoded. uint8 [num, H, W, C], the whole set on every process.

    When ``params`` live on a mesh (a training state, :func:`load_run`), each batch is split over
    the mesh's devices, on every process; a batch that does not divide evenly is padded with extra
    rows (the last image's conditioning, further noise rows) that are dropped afterwards. Noise rows
    do not depend on the padding, so the images are the same for any number of devices."""
    sample_kwargs = dict(method=s["method"], num_steps=int(s["num_steps"]), prediction=config.diffusion.prediction,
                         clip_x0=config.sample.get("clip_x0", 1.0) or None)
    if s["method"] == "ddim":
        sample_kwargs["eta"] = float(s["eta"])
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int (images per compiled sampler call) or None, got {batch_size!r}.")
    batch_size = batch_size or num
    mesh = _mesh_of(params)
    devices = 1 if mesh is None else parallel.batch_devices(mesh)
    out = []
    for i, lo in enumerate(range(0, num, batch_size)):
        n = min(batch_size, num - lo)
        m = -(-n // devices) * devices  # padded to a multiple of the batch devices
        k_noise, k_sample = jax.random.split(jax.random.fold_in(key, i))
        shape = (m, *model.image_shape)
        if mesh is None:
            x_T = jax.random.normal(k_noise, shape, jnp.float32)
        else:
            x_T = _sharded_normal(shape, parallel.data_sharding(mesh))(k_noise)
        fn, extra = batch_args(np.minimum(np.arange(lo, lo + m), lo + n - 1))
        x0 = sampling.sample(fn, schedule, x_T, key=k_sample, extra_args=extra, **sample_kwargs)
        if model.autoencoder is not None:  # latents -> pixels, on each process's own device
            x0 = model.autoencoder.decode(parallel.to_host(x0)[:n] if mesh is not None else x0)
        out.append(parallel.to_host(to_uint8(x0))[:n])
    return np.concatenate(out)


def _mesh_of(params) -> jax.sharding.Mesh | None:
    """The mesh ``params`` are placed on (None for single-device arrays)."""
    sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
    return sharding.mesh if isinstance(sharding, jax.sharding.NamedSharding) else None


@functools.lru_cache(maxsize=32)
def _sharded_normal(shape, sharding):
    """A jitted ``key -> normal(key, shape)`` laid out by ``sharding``: every process computes only
    its rows, and the values equal the unsharded draw."""
    return jax.jit(lambda k: jax.random.normal(k, shape, jnp.float32), out_shardings=sharding)


# ----------------------------------------------------------------------------- images on disk
def to_uint8(x: jax.Array) -> jax.Array:
    """[-1, 1] float -> uint8 [0, 255] (rounded, clipped)."""
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 1) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 [rows*(H+pad)+pad, ncol*(W+pad)+pad, C] image."""
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"make_grid needs uint8 [N, H, W, C], got {images.dtype} {images.shape}.")
    n, h, w, c = images.shape
    ncol = ncol or int(np.ceil(np.sqrt(n)))
    nrow = int(np.ceil(n / ncol))
    grid = np.zeros((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = images[i]
    return grid


def save_png(path: str, image: np.ndarray, scale: int = 1) -> None:
    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


def save_samples(path: str, images: np.ndarray, labels: np.ndarray | None = None, ncol: int | None = None,
                 prompts: Sequence[str] | None = None) -> None:
    """Write ``path.png`` (a grid, upscaled for small images) and ``path.npz`` (``images``, and
    ``labels`` int32 [N] / ``prompts`` str [N] when given)."""
    path = path[:-4] if path.endswith((".png", ".npz")) else path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if ncol is None and labels is not None:
        ncol = int(len(np.unique(labels)))
    h = images.shape[1]
    save_png(path + ".png", make_grid(images, ncol), scale=max(1, 64 // h))
    arrays = {"images": images}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, np.int32)
    if prompts is not None:
        arrays["prompts"] = np.asarray(list(prompts), dtype=str)
    np.savez(path + ".npz", **arrays)


# ----------------------------------------------------------------------------- runs on disk
@dataclasses.dataclass
class Run:
    config: ml_collections.ConfigDict
    model: DiffusionModel
    schedule: Schedule
    params: Any  # EMA params
    step: int


def load_run(workdir: str, step: int | None = None, mesh: jax.sharding.Mesh | None = None) -> Run:
    """The EMA params, model, schedule and config of the latest (or given) checkpoint of a run.

    The params are replicated over ``mesh`` (default: all devices, :func:`jaxdiff.parallel.make_mesh`),
    so :func:`generate` splits its batches over them, on every process of a multi-process job.
    For a latent diffusion run the model carries its autoencoder (the VAE run and checkpoint step
    recorded in the run's metadata), so :func:`generate` returns decoded pixels."""
    from jaxdiff.train.checkpoint import Checkpointer

    ckpt = Checkpointer(workdir, read_only=True)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {ckpt.directory}: train first, or check --workdir.")
        meta = ckpt.restore_meta(step)
        if meta.get("task") == "vae":
            raise ValueError(
                f"{os.path.abspath(workdir)} is a VAE (autoencoder) run, not a diffusion model. Train a latent "
                "diffusion model on it and sample from that run: python -m experiments.train "
                f"--config=experiments/configs/ldm_digits.py --config.vae.workdir={workdir}")
        config = ml_collections.ConfigDict(meta["config"])
        autoencoder = None
        if meta.get("vae"):
            v = meta["vae"]
            autoencoder = load_vae(v["workdir"], v["step"])
            autoencoder = dataclasses.replace(autoencoder, scale_factor=float(v["scale_factor"]))
        model = build_model(config, meta["model"]["image_shape"], meta["model"]["num_classes"], autoencoder)
        abstract = jax.eval_shape(model.init_params, jax.random.key(0))
        sharding = parallel.replicated(mesh if mesh is not None else parallel.make_mesh())
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract)
        state = _restore_ema(ckpt, step, target)
    finally:
        ckpt.close()
    return Run(config=config, model=model, schedule=build_schedule(config), params=state, step=step)


def _restore_ema(ckpt, step, params_target):
    import orbax.checkpoint as ocp

    # Restore only the EMA params subtree: a partial restore leaves the optimiser state on disk.
    restored = ckpt._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item={"ema_params": params_target},
                restore_args=jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), {"ema_params": params_target}),
                partial_restore=True,
            )
        ),
    )
    return restored.state["ema_params"]


# ----------------------------------------------------------------------------- autoencoders (latent diffusion)
VAE_TRAIN_COMMAND = "python -m experiments.train --config=experiments/configs/vae_digits.py --workdir={workdir}"


class VAENotReadyError(FileNotFoundError):
    """The VAE run a latent diffusion config names is missing, has no checkpoint, or is no VAE run."""


@dataclasses.dataclass(eq=False)
class VAEModel:
    """A KL autoencoder (:class:`jaxdiff.nn.vae.AutoencoderKL`) and the image shape it works on;
    every method is a pure function of explicit params.

    image_shape: (H, W, C) of the images; ``latent_shape`` = (H/f, W/f, latent_channels).
    """

    module: AutoencoderKL
    image_shape: tuple[int, int, int]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        f = self.module.downsample_factor
        return (self.image_shape[0] // f, self.image_shape[1] // f, int(self.module.latent_channels))

    def init_params(self, key: jax.Array) -> Any:
        return self.module.init({"params": key}, jnp.zeros((1, *self.image_shape), jnp.float32))["params"]

    def train_apply(self, params, x: jax.Array, key: jax.Array) -> tuple[jax.Array, DiagonalGaussian]:
        """x: [B, H, W, C] in [-1, 1] -> (decoded posterior sample [B, H, W, C] float32, posterior)."""
        return self.module.apply({"params": params}, x, key=key, sample_posterior=True)

    @functools.cached_property
    def encode(self):
        """``encode(params, x [B, H, W, C] in [-1, 1]) -> DiagonalGaussian`` over [B, h, w, c] (jitted)."""
        return xla.jit(lambda params, x: self.module.apply({"params": params}, x, method=AutoencoderKL.encode))

    @functools.cached_property
    def decode(self):
        """``decode(params, z [B, h, w, c]) -> [B, H, W, C] float32`` (jitted)."""
        return xla.jit(lambda params, z: self.module.apply({"params": params}, z, method=AutoencoderKL.decode))

    def encode_images(self, params, images: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images [N, H, W, C] -> posterior (mean, std), float32 NumPy [N, h, w, c] each.

        Runs in fixed-size chunks (one compilation for any N)."""
        means, stds = [], []
        for lo in range(0, len(images), chunk):
            x = _to_float(images[lo : lo + chunk])
            n = len(x)
            post = self.encode(params, np.pad(x, ((0, chunk - n), (0, 0), (0, 0), (0, 0))))
            means.append(np.asarray(post.mean)[:n])
            stds.append(np.asarray(post.std)[:n])
        return np.concatenate(means), np.concatenate(stds)

    def reconstruct(self, params, images: np.ndarray, chunk: int = 256) -> np.ndarray:
        """uint8 [N, H, W, C] -> uint8 reconstructions (decoded posterior means), fixed-size chunks."""
        out = []
        for lo in range(0, len(images), chunk):
            x = _to_float(images[lo : lo + chunk])
            n = len(x)
            x = np.pad(x, ((0, chunk - n), (0, 0), (0, 0), (0, 0)))
            out.append(np.asarray(to_uint8(self.decode(params, self.encode(params, x).mean)))[:n])
        return np.concatenate(out)


def _to_float(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"Expected uint8 images [N, H, W, C], got {images.dtype} {images.shape}.")
    return images.astype(np.float32) / 127.5 - 1.0


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


def latent_statistics(mean: np.ndarray, std: np.ndarray, seed: int = 0) -> dict:
    """Statistics of posterior samples ``z = mean + std * eps`` over a dataset (float64).

    ``scale_factor = 1 / std(z)`` over all elements: Stable Diffusion's recipe (Rombach et al.
    2022, sec. G), which makes the diffusion model's data unit-variance. eps from
    ``np.random.default_rng(seed)``, so the figure is reproducible."""
    eps = np.random.default_rng(seed).standard_normal(mean.shape)
    z = mean.astype(np.float64) + std.astype(np.float64) * eps
    s = float(z.std())
    if not np.isfinite(s) or s <= 0:
        raise ValueError(f"The latents have std {s}: cannot compute a scale factor.")
    return {"scale_factor": 1.0 / s, "mean": float(z.mean()), "std": s,
            "std_of_means": float(mean.astype(np.float64).std()),
            "mean_posterior_std": float(std.astype(np.float64).mean()),
            "num_examples": int(len(mean)), "seed": int(seed)}


@dataclasses.dataclass(eq=False)
class LatentAutoencoder:
    """A trained, frozen VAE with its EMA params and latent scale factor, as latent diffusion uses it:
    diffusion latents are ``scale_factor * z``."""

    vae: VAEModel
    params: Any
    scale_factor: float
    workdir: str
    step: int
    config: ml_collections.ConfigDict | None = None

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N, H, W, C] -> scaled posterior (mean, std), float32 NumPy [N, h, w, c] each
        (computed on this process's own device, in fixed-size chunks: one compilation for any N)."""
        mean, std = self.vae.encode_images(self.params, images)
        s = np.float32(self.scale_factor)
        return mean * s, std * s

    def decode(self, z: jax.Array) -> jax.Array:
        """Scaled latents [B, h, w, c] -> images [B, H, W, C] float32 (about [-1, 1])."""
        return self.vae.decode(self.params, jnp.asarray(z, jnp.float32) / jnp.float32(self.scale_factor))


def load_vae(workdir: str, step: int | None = None) -> LatentAutoencoder:
    """The EMA params and scale factor of a VAE run (``experiments/configs/vae_*.py``) at ``step``
    (default: its latest checkpoint). Raises :class:`VAENotReadyError` with the command that makes it."""
    from jaxdiff.train.checkpoint import CheckpointError, Checkpointer

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
            params = _restore_ema(ckpt, step, target)
        except Exception as e:
            raise CheckpointError(f"Could not restore the VAE params of checkpoint {step} in {workdir} ({e}).") from e
    finally:
        ckpt.close()
    num_steps = int(config.train.num_steps)
    if step < num_steps:
        print(f"Warning: the VAE run {workdir} is at step {step} of {num_steps} (unfinished); using that checkpoint. "
              f"Finish it with\n    {make}", flush=True)
    return LatentAutoencoder(vae, params, float(meta["latent"]["scale_factor"]), workdir, int(step), config)


class LatentDataset:
    """Batches of scaled VAE latents of an :class:`ImageDataset`, in the same (seed, step) order.

    Examples are encoded (posterior mean and std, times the scale factor) when a batch first needs
    them, by the process whose rows hold them, and kept in memory; a process never encodes the rows
    of other processes. Batch ``step`` holds ``scale * (mean + std * eps)`` (a posterior sample, as
    latent diffusion trains; ``sample_posterior=False``: the means), eps from
    ``Generator(PCG64([seed, step, 2]))`` for the whole global batch: pure in (seed, step), so resume
    is exact and the global batch is the same for any number of processes.

    Attributes as :class:`ImageDataset`: ``name``, ``split``, ``batch_size``, ``seed``,
    ``num_examples``, ``num_classes``, ``image_shape`` (the latent shape), plus ``autoencoder``.
    """

    def __init__(self, images: ImageDataset, autoencoder: LatentAutoencoder, *, sample_posterior: bool = True):
        self.images, self.autoencoder, self.sample_posterior = images, autoencoder, bool(sample_posterior)
        self.name, self.split = images.name, images.split
        self.batch_size, self.seed, self.num_examples = images.batch_size, images.seed, images.num_examples
        self.num_classes = images.num_classes
        self.image_shape = tuple(autoencoder.vae.latent_shape)
        self.annotation_keys = tuple(getattr(images, "annotation_keys", ()))
        self._mean = np.empty((self.num_examples, *self.image_shape), np.float32)
        self._std = np.empty_like(self._mean)
        self._encoded = np.zeros((self.num_examples,), bool)

    def __repr__(self) -> str:
        return (f"LatentDataset({self.name!r}, {self.split!r}, batch_size={self.batch_size}, "
                f"latent_shape={self.image_shape}, num_examples={self.num_examples}, vae={self.autoencoder.workdir!r} "
                f"step {self.autoencoder.step}, scale_factor={self.autoencoder.scale_factor:.5g})")

    def latents(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scaled posterior ``(mean, std)`` of examples ``indices``: float32 [n, h, w, c] each,
        encoding those not encoded yet."""
        indices = np.asarray(indices, np.int64)
        missing = np.unique(indices[~self._encoded[indices]])
        if missing.size:
            mean, std = self.autoencoder.encode(self.images.examples(missing)[0])
            self._mean[missing], self._std[missing] = mean, std
            self._encoded[missing] = True
        return self._mean[indices], self._std[indices]

    def batch(self, step: int, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``{'image': float32 [B, h, w, c] scaled latents, 'label': int32 [B]}`` (no label if unconditional),
        plus the image dataset's ``annotation_keys`` (e.g. ``caption``). ``rows``: only those rows of
        the global batch (one process's share), as :meth:`ImageDataset.batch`."""
        if not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}.")
        idx = self.images.indices(int(step))
        if rows is not None:
            idx = idx[np.asarray(rows)]
        z, std = self.latents(idx)
        if self.sample_posterior:
            eps = np.random.Generator(np.random.PCG64([self.seed, int(step), 2])).standard_normal(
                (self.batch_size, *self.image_shape), np.float32)
            z = z + std * (eps if rows is None else eps[np.asarray(rows)])
        out = {"image": z}
        if self.num_classes is not None:
            out["label"] = self.images.examples(idx)[1]
        if self.annotation_keys:  # captions (str) and attribute ids, as ImageDataset
            out.update(self.images.annotations(idx))
        return out

    def iterate(self, start_step: int = 0, prefetch: int = 0, rows: np.ndarray | None = None):
        """Endless batches from ``start_step`` (``prefetch`` ahead on a thread; 0: none)."""
        if not isinstance(start_step, (int, np.integer)) or start_step < 0:
            raise ValueError(f"start_step must be a non-negative int, got {start_step!r}.")
        return prefetched(functools.partial(self.batch, rows=rows), int(start_step), int(prefetch))


# ----------------------------------------------------------------------------- text-to-image (trained from scratch)
@dataclasses.dataclass(eq=False)
class TextDiffusionModel(DiffusionModel):
    """A :class:`jaxdiff.nn.TextConditionedUNet` (text encoder + cross-attention U-Net, trained
    together) and its tokenizer: a ``model.type = "text_unet"`` config (``experiments/configs/t2i_*.py``).

    Params are ``{"text_encoder": ..., "unet": ...}``. Captions are tokenized to ``max_length``
    ids (bos, words, eos, padding); padding is masked out of every attention. Classifier-free
    guidance uses the empty caption ``""`` as the unconditional branch (training drops captions
    to ``""`` with probability ``diffusion.p_uncond``).
    """

    tokenizer: Any = None
    max_length: int = 16
    text_conditional = True

    def tokenize(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Prompts -> ``(input_ids, attention_mask)``, int32 [N, max_length] each.

        Raises ValueError for a prompt longer than the model's ``max_length`` (with bos/eos) or
        with words outside its vocabulary (the model never saw them)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for p in prompts:
            if not isinstance(p, str):
                raise ValueError(f"Prompts must be strings, got {type(p).__name__} {p!r}.")
            words = self.tokenizer.tokenize(p)
            unknown = [w for w in words if w not in self.tokenizer.encoder]
            if unknown:
                raise ValueError(f"The prompt {p!r} has words outside the model's vocabulary: {unknown}. "
                                 f"Known words: {' '.join(self.tokenizer.vocab[2:-2])}.")
            if len(words) + 2 > self.max_length:
                raise ValueError(f"The prompt {p!r} has {len(words)} words; the model takes at most "
                                 f"{self.max_length - 2} (text.max_length={self.max_length} with bos/eos).")
        enc = self.tokenizer(prompts, max_length=self.max_length, padding="max_length", truncation=False)
        return np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)

    def init_params(self, key: jax.Array) -> Any:
        x = jnp.zeros((1, *self.image_shape), jnp.float32)
        ids, mask = self.tokenize([""])
        return self.module.init({"params": key}, x, jnp.zeros((1,), jnp.float32), ids, mask, train=False)["params"]

    def apply(self, params, x_t, t, input_ids, attention_mask, *, train=False, key=None) -> jax.Array:
        rngs = {"dropout": key} if train else None
        return self.module.apply({"params": params}, x_t, t, input_ids, attention_mask, train=train, rngs=rngs)

    @functools.cached_property
    def encode_text(self):
        """``encode_text(params, input_ids, attention_mask) -> context float32 [N, L, D]`` (jitted)."""
        return xla.jit(lambda params, ids, mask: self.module.apply(
            {"params": params}, ids, mask, method=TextConditionedUNet.encode_text))

    @functools.cached_property
    def context_model_fn(self):
        """``model_fn(x_t, t, cond, *, params)`` with ``cond = (context, mask)`` (for the samplers and
        :func:`jaxdiff.sampling.cfg_model_fn`); one function per model, so the sampler cache hits."""
        def model_fn(x_t, t, cond, *, params):
            context, mask = cond
            return self.module.apply({"params": params}, x_t, t, context, mask, method=TextConditionedUNet.denoise)

        return model_fn

    def train_apply_fn(self, p_uncond: float = 0.0):
        """``apply_fn(params, x_t, t, batch, key)`` on ``batch['input_ids']``, ``batch['attention_mask']``;
        captions become ``""`` with probability ``p_uncond`` (classifier-free guidance training)."""
        null_ids, null_mask = (jnp.asarray(a) for a in self.tokenize([""]))

        def apply_fn(params, x_t, t, batch, key):
            drop_key, dropout_key = jax.random.split(key)
            ids, mask = batch["input_ids"], batch["attention_mask"]
            if p_uncond > 0:
                drop = jax.random.bernoulli(drop_key, p_uncond, (ids.shape[0], 1))
                ids, mask = jnp.where(drop, null_ids, ids), jnp.where(drop, null_mask, mask)
            return self.apply(params, x_t, t, ids, mask, train=True, key=dropout_key)

        return apply_fn


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


class TokenizedCaptions:
    """A dataset whose batches carry ``caption`` strings, with the captions tokenized on the host:
    batches hold ``image`` plus ``input_ids`` and ``attention_mask`` (int32 [B, L]); strings and
    the other annotations are dropped (they cannot be sharded onto devices). Other attributes
    (``image_shape``, ``num_examples``, ``autoencoder``, ...) are the wrapped dataset's."""

    def __init__(self, dataset, model: TextDiffusionModel):
        if "caption" not in getattr(dataset, "annotation_keys", ()):
            raise ValueError(
                f"A text-conditioned model needs captions, but the batches of {dataset!r} have none: use a captioned "
                "dataset (data.name='shapes') with data.conditional=True.")
        self.dataset, self.model = dataset, model
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __getattr__(self, name):  # only called for attributes this wrapper lacks
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __repr__(self) -> str:
        return f"TokenizedCaptions({self.dataset!r}, max_length={self.model.max_length})"

    def _convert(self, batch: dict) -> dict:
        captions = [str(c) for c in batch["caption"]]
        missing = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if missing:
            for c, ids, mask in zip(missing, *self.model.tokenize(missing)):
                self._cache[c] = (ids, mask)
        out = {"image": batch["image"],
               "input_ids": np.stack([self._cache[c][0] for c in captions]),
               "attention_mask": np.stack([self._cache[c][1] for c in captions])}
        return out

    def batch(self, step: int, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        return self._convert(self.dataset.batch(step, rows))

    def iterate(self, start_step: int = 0, **kwargs):
        return (self._convert(b) for b in self.dataset.iterate(start_step, **kwargs))


def cycle_prompts(prompts: Sequence[str], num: int) -> list[str]:
    """``num`` prompts cycling through ``prompts``."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("Give at least one prompt.")
    return [prompts[i % len(prompts)] for i in range(num)]


def generate_text(
    model: TextDiffusionModel,
    params: Any,
    schedule: Schedule,
    config: ml_collections.ConfigDict,
    *,
    prompts: str | Sequence[str],
    key: jax.Array,
    batch_size: int | None = None,
    **sampler_overrides,
) -> np.ndarray:
    """One image per prompt: uint8 [N, H, W, C] (decoded pixels for a latent model).

    ``sampler_overrides`` (``method``, ``num_steps``, ``eta``, ``guidance``) replace
    ``config.sample``. Guidance scale w != 1 runs classifier-free guidance against the empty
    caption (both branches in one batched forward). Prompts are encoded once per batch, outside
    the sampling loop. Batch ``i`` uses ``fold_in(key, i)``, as :func:`generate`; the sampler
    compiles once per settings and batch shape (new prompts, keys or guidance scales reuse it).
    """
    if not model.text_conditional:
        raise ValueError("This model is not text-conditioned: use generate(...) (labels, not prompts).")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("Give at least one prompt.")
    ids, mask = model.tokenize(prompts)
    null_ids, null_mask = model.tokenize([""])
    s = sampler_settings(config, **sampler_overrides)
    guided = float(s["guidance"]) != 1.0
    null_ctx = model.encode_text(params, null_ids, null_mask) if guided else None

    def batch_args(idx):
        cond = (model.encode_text(params, ids[idx], mask[idx]), mask[idx])
        if guided:
            return sampling.cfg_model_fn(model.context_model_fn), {
                "params": params, "cond": cond, "null_cond": (null_ctx, null_mask),
                "guidance_scale": np.float32(s["guidance"])}
        return model.context_model_fn, {"params": params, "cond": cond}

    return _sample_in_batches(model, params, schedule, config, s, key, len(prompts), batch_size, batch_args)
