"""Checkpoint -> run: the EMA params, model, schedule and config of a trained run, ready to sample.

    >>> from jaxdiff import runs
    >>> run = runs.load_run("runs/ddpm_digits")     # latest checkpoint; run.params are its EMA params
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections

from jaxdiff import parallel
from jaxdiff.models import DiffusionModel
from jaxdiff.schedules import Schedule
from jaxdiff.train.build import build_model, build_schedule, load_vae
from jaxdiff.train.checkpoint import CheckpointError, Checkpointer

__all__ = ["CheckpointError", "Run", "load_run"]  # CheckpointError: what load_run raises for a broken run


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
        state = ckpt.restore_subtree(step, "ema_params", target)
    finally:
        ckpt.close()
    return Run(config=config, model=model, schedule=build_schedule(config), params=state, step=step)
