"""The one generation loop: batches, keys, padding, classifier-free guidance, decoding.

    >>> from jaxdiff import generation, runs
    >>> run = runs.load_run("runs/ddpm_digits")
    >>> images, labels = generation.generate(run.model, run.params, run.schedule, run.config,
    ...                                      num=16, key=jax.random.key(0), labels=[3] * 16)
    >>> images.shape, images.dtype      # uint8 [N, H, W, C]

Used by ``experiments.sample``, the eval scripts and training's sample hooks. Batch ``i`` starts
from ``fold_in(key, i)``; with params on a mesh each batch is split over its devices, on every
process; latents are decoded; the images are the same for any number of devices.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import parallel, sampling, text_to_image
from jaxdiff.config import Config, parse as parse_config
from jaxdiff.images import to_uint8
from jaxdiff.models import DiffusionModel, TextDiffusionModel
from jaxdiff.schedules import Schedule


def sampler_settings(config: Config, **overrides) -> dict:
    """The sampler keyword arguments of ``config.sample``, with ``overrides`` applied."""
    config = parse_config(config)
    sc = config.sample
    s = {"method": sc.method, "num_steps": config.sample_steps, "eta": sc.eta, "guidance": sc.guidance}
    s.update({k: v for k, v in overrides.items() if v is not None})
    return s


def generate(
    model: DiffusionModel,
    params: Any,
    schedule: Schedule,
    config: Config,
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
    config: Config,
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
    config = parse_config(config)
    sample_kwargs = dict(method=s["method"], num_steps=int(s["num_steps"]), clip_x0=config.sample.clip_x0)
    if s["method"] == "ddim":
        sample_kwargs["eta"] = float(s["eta"])
    mesh = _mesh_of(params)

    def run_batch(batch_key, idx, n):
        k_noise, k_sample = jax.random.split(batch_key)
        shape = (len(idx), *model.image_shape)
        if mesh is None:
            x_T = jax.random.normal(k_noise, shape, jnp.float32)
        else:
            x_T = _sharded_normal(shape, parallel.data_sharding(mesh))(k_noise)
        fn, extra = batch_args(idx)
        x0 = sampling.sample(fn, schedule, x_T, key=k_sample, extra_args=extra, **sample_kwargs)
        if model.autoencoder is not None:  # latents -> pixels, on each process's own device
            x0 = model.autoencoder.decode(parallel.to_host(x0)[:n] if mesh is not None else x0)
        return parallel.to_host(to_uint8(x0))

    return in_batches(num, batch_size, key, run_batch, multiple=1 if mesh is None else parallel.batch_devices(mesh))


def in_batches(num: int, batch_size: int | None, key: jax.Array, run_batch, *, multiple: int = 1,
               fixed_shape: bool = False) -> np.ndarray:
    """The one batch loop of every generation path: ``num`` images in batches of ``batch_size`` (None:
    one batch). Batch ``i`` covers images ``lo .. lo + n`` and runs
    ``run_batch(fold_in(key, i), idx, n) -> uint8 [len(idx), ...]``; ``idx`` are the image indices
    padded with the batch's last index up to a multiple of ``multiple`` (the mesh's batch devices) or,
    with ``fixed_shape``, to ``batch_size`` (one compiled shape for every batch); the padding rows are
    dropped. Returns uint8 ``[num, ...]``."""
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int (images per compiled sampler call) or None, got {batch_size!r}.")
    batch_size = min(batch_size or num, num)
    out = []
    for i, lo in enumerate(range(0, num, batch_size)):
        n = min(batch_size, num - lo)
        m = batch_size if fixed_shape else n
        m = -(-m // multiple) * multiple
        idx = np.minimum(np.arange(lo, lo + m), lo + n - 1)
        out.append(np.asarray(run_batch(jax.random.fold_in(key, i), idx, n))[:n])
    return np.concatenate(out)


def generate_sd(sd: "text_to_image.StableDiffusion", prompts: str | Sequence[str], *, num: int, key: jax.Array,
                batch_size: int | None = None, **kwargs) -> tuple[np.ndarray, list[str]]:
    """``num`` images of a Stable Diffusion folder cycling through ``prompts``, in batches:
    ``(uint8 [num, H, W, 3], the prompt of each image)``. Batch ``i`` runs
    :func:`jaxdiff.text_to_image.text_to_image` with ``key = fold_in(key, i)`` (:func:`in_batches`);
    the last batch is padded with its last prompt (one compiled shape for every batch) and the padding
    dropped. ``kwargs`` go to ``text_to_image`` (``num_steps``, ``guidance_scale``, ``method``,
    ``negative_prompt``, ``height``, ``width``). Pixels are rounded as diffusers' ``numpy_to_pil``."""
    if not isinstance(num, (int, np.integer)) or num < 1:
        raise ValueError(f"num must be an int >= 1, got {num!r}.")
    per_image = cycle_prompts(prompts, num)  # raises for no prompt

    def run_batch(batch_key, idx, n):
        x = text_to_image.text_to_image(sd, [per_image[j] for j in idx], key=batch_key, **kwargs)
        return to_uint8(x, value_range=(0, 1))

    return in_batches(num, batch_size, key, run_batch, fixed_shape=True), per_image


def _mesh_of(params) -> jax.sharding.Mesh | None:
    """The mesh ``params`` are placed on (None for single-device arrays)."""
    sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
    return sharding.mesh if isinstance(sharding, jax.sharding.NamedSharding) else None


@functools.lru_cache(maxsize=32)
def _sharded_normal(shape, sharding):
    """A jitted ``key -> normal(key, shape)`` laid out by ``sharding``: every process computes only
    its rows, and the values equal the unsharded draw."""
    return jax.jit(lambda k: jax.random.normal(k, shape, jnp.float32), out_shardings=sharding)
