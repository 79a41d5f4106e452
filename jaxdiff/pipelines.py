"""From configs and checkpoints to models, images and files.

The glue that the experiment scripts call: build the dataset / model / schedule that a config
describes, restore the EMA params of a run, and generate images with any sampler.

    >>> from jaxdiff import pipelines
    >>> run = pipelines.load_run("runs/ddpm_digits")
    >>> images, labels = pipelines.generate(run.model, run.params, run.schedule, run.config,
    ...                                     num=16, key=jax.random.key(0), labels=[3] * 16)
    >>> images.shape, images.dtype      # uint8 [N, H, W, C]
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

from jaxdiff import sampling
from jaxdiff.data import ImageDataset
from jaxdiff.nn.unet import UNet
from jaxdiff.schedules import Schedule, make_schedule

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# ----------------------------------------------------------------------------- building blocks
def make_dataset(config: ml_collections.ConfigDict, split: str = "train") -> ImageDataset:
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
    )


def build_schedule(config: ml_collections.ConfigDict) -> Schedule:
    d = config.diffusion
    options = dict(d.get("schedule_options", {}) or {})
    return make_schedule(d.schedule, d.num_timesteps, **options)


@dataclasses.dataclass(eq=False)
class DiffusionModel:
    """A denoiser network plus what it needs to be called: image shape and label count."""

    module: UNet
    image_shape: tuple[int, int, int]
    num_classes: int | None = None

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

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


def build_model(config: ml_collections.ConfigDict, image_shape, num_classes: int | None) -> DiffusionModel:
    m = config.model
    if m.get("dtype", "float32") not in DTYPES:
        raise ValueError(f"model.dtype must be one of {list(DTYPES)}, got {m.dtype!r}.")
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
    return DiffusionModel(module, tuple(int(s) for s in image_shape), num_classes)


def run_metadata(config: ml_collections.ConfigDict, dataset: ImageDataset, model: DiffusionModel) -> dict:
    """JSON-able facts stored with every checkpoint (what sampling needs without the config file)."""
    return {
        "config": json.loads(config.to_json_best_effort()),
        # What fixes the parameter layout (compute dtype, remat and dropout may change on resume).
        "model": json.loads(json.dumps({
            "image_shape": list(model.image_shape),
            "num_classes": model.num_classes,
            "arch": {k: v for k, v in config.model.to_dict().items() if k not in ("dtype", "remat", "dropout")},
        })),
        "dataset": {"name": dataset.name, "num_examples": dataset.num_examples},
    }


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

    Labels default to ``0, 1, 2, ...`` cycling over the classes for a conditional model.
    ``sampler_overrides`` (``method``, ``num_steps``, ``eta``, ``guidance``) replace ``config.sample``.
    A guidance scale other than 1 runs classifier-free guidance (conditional and null-label
    branches in one batched forward). The sampler compiles once per settings and batch shape:
    new keys, labels, params or guidance scales reuse it.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}.")
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
    sample_kwargs = dict(method=s["method"], num_steps=int(s["num_steps"]), prediction=config.diffusion.prediction,
                         clip_x0=config.sample.get("clip_x0", 1.0) or None)
    if s["method"] == "ddim":
        sample_kwargs["eta"] = float(s["eta"])
    batch_size = batch_size or num
    out = []
    for i, lo in enumerate(range(0, num, batch_size)):
        n = min(batch_size, num - lo)
        k_noise, k_sample = jax.random.split(jax.random.fold_in(key, i))
        x_T = jax.random.normal(k_noise, (n, *model.image_shape), jnp.float32)
        extra = {"params": params}
        if guided:
            y = jnp.asarray(labels[lo : lo + n])
            extra.update(cond=y, null_cond=jnp.full_like(y, model.num_classes),
                         guidance_scale=jnp.float32(s["guidance"]))
            fn = sampling.cfg_model_fn(model.label_model_fn)
        elif model.conditional:
            extra["labels"] = jnp.asarray(labels[lo : lo + n])
            fn = model.label_model_fn
        else:
            fn = model.uncond_model_fn
        x0 = sampling.sample(fn, schedule, x_T, key=k_sample, extra_args=extra, **sample_kwargs)
        out.append(np.asarray(to_uint8(x0)))
    return np.concatenate(out), labels


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


def save_samples(path: str, images: np.ndarray, labels: np.ndarray | None = None, ncol: int | None = None) -> None:
    """Write ``path.png`` (a grid, upscaled for small images) and ``path.npz`` (``images``, ``labels``)."""
    path = path[:-4] if path.endswith((".png", ".npz")) else path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if ncol is None and labels is not None:
        ncol = int(len(np.unique(labels)))
    h = images.shape[1]
    save_png(path + ".png", make_grid(images, ncol), scale=max(1, 64 // h))
    arrays = {"images": images}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, np.int32)
    np.savez(path + ".npz", **arrays)


# ----------------------------------------------------------------------------- runs on disk
@dataclasses.dataclass
class Run:
    config: ml_collections.ConfigDict
    model: DiffusionModel
    schedule: Schedule
    params: Any  # EMA params
    step: int


def load_run(workdir: str, step: int | None = None) -> Run:
    """The EMA params, model, schedule and config of the latest (or given) checkpoint of a run."""
    from jaxdiff.train.checkpoint import Checkpointer

    ckpt = Checkpointer(workdir, read_only=True)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {ckpt.directory}: train first, or check --workdir.")
        meta = ckpt.restore_meta(step)
        config = ml_collections.ConfigDict(meta["config"])
        model = build_model(config, meta["model"]["image_shape"], meta["model"]["num_classes"])
        abstract = jax.eval_shape(model.init_params, jax.random.key(0))
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
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
