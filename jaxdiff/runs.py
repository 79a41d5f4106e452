"""Checkpoint -> run: the EMA params, model, schedule and config of a trained run, ready to sample.

    >>> from jaxdiff import runs
    >>> run = runs.load_run("runs/ddpm_digits")     # latest checkpoint; run.params are its EMA params
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax

from jaxdiff import config as config_lib
from jaxdiff import parallel
from jaxdiff.config import Config
from jaxdiff.models import DiffusionModel
from jaxdiff.schedules import Schedule
from jaxdiff.train.build import build_model, build_schedule, load_pretrained, load_vae, place
from jaxdiff.train.checkpoint import CheckpointError, Checkpointer

__all__ = ["CheckpointError", "Run", "load_run"]  # CheckpointError: what load_run raises for a broken run


@dataclasses.dataclass
class Run:
    config: Config  # typed (jaxdiff.config), as the run was trained
    model: DiffusionModel
    schedule: Schedule
    params: Any  # EMA params
    step: int
    # A fine-tuned Stable Diffusion run's EMA trainable params as checkpointed ({"lora"} adapters,
    # unmerged, or {"unet"}; plus "text_encoder" when trained); None for other runs.
    trainable: Any = None


def load_run(workdir: str, step: int | None = None, mesh: jax.sharding.Mesh | None = None) -> Run:
    """The EMA params, model, schedule and config of the latest (or given) checkpoint of a run.

    The params are replicated over ``mesh`` (default: all devices, :func:`jaxdiff.parallel.make_mesh`),
    so :func:`generate` splits its batches over them, on every process of a multi-process job.
    For a latent diffusion run the model carries its autoencoder (the VAE run and checkpoint step
    recorded in the run's metadata), so :func:`generate` returns decoded pixels.

    A fine-tuned Stable Diffusion run (``model.pretrained``) reads its frozen weights from the folder
    its metadata records; ``params`` are then the full ``{"unet", "text_encoder"}`` (a LoRA run's EMA
    adapters merged into the base U-Net once, here) and the model decodes with the folder's VAE."""
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
        config = config_lib.parse(meta["config"], stored=True)
        if meta.get("pretrained"):
            return _load_pretrained_run(ckpt, meta, config, step, mesh)
        autoencoder = None
        if meta.get("vae"):
            v = meta["vae"]
            autoencoder = load_vae(v["workdir"], v["step"])
            autoencoder = dataclasses.replace(autoencoder, scale_factor=float(v["scale_factor"]))
        model = build_model(config, meta["model"]["image_shape"], meta["model"]["num_classes"], autoencoder)
        abstract = jax.eval_shape(model.init_params, jax.random.key(0))
        sharding = parallel.replicated(mesh if mesh is not None else parallel.make_mesh())
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract)
        state = ckpt.restore_subtree(step, "ema_params", target)
    finally:
        ckpt.close()
    return Run(config=config, model=model, schedule=build_schedule(config), params=state, step=step)


def _load_pretrained_run(ckpt: Checkpointer, meta: dict, config: Config, step: int,
                         mesh: jax.sharding.Mesh | None) -> Run:
    folder = meta["pretrained"]["folder"]
    try:
        config, model = load_pretrained(config)
    except ValueError as e:
        raise FileNotFoundError(f"The run {ckpt.directory} fine-tunes {folder}, which cannot be loaded now ({e}); "
                                "the frozen weights come from that folder: restore it there.") from e
    if list(model.image_shape) != meta["model"]["image_shape"]:
        raise CheckpointError(f"{folder} now makes latents {list(model.image_shape)}, but the run was trained on "
                              f"{meta['model']['image_shape']}.")
    sharding = parallel.replicated(mesh if mesh is not None else parallel.make_mesh())
    abstract = jax.eval_shape(model.init_params, jax.random.key(0))
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract)
    ema = ckpt.restore_subtree(step, "ema_params", target)
    frozen = model.frozen_params(model.base)
    frozen = place(frozen, jax.tree.map(lambda _: sharding, frozen))
    params = jax.jit(model.full_params, out_shardings=sharding)(ema, frozen)  # LoRA: merged once
    return Run(config=config, model=model, schedule=build_schedule(config), params=params, step=step, trainable=ema)
