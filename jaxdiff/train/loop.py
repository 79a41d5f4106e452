"""The host training loop: data -> sharded jit train step -> metrics, checkpoints, sample grids.

    >>> from experiments.configs import ddpm_digits
    >>> from jaxdiff.train.loop import train
    >>> train(ddpm_digits.get_config(), "runs/ddpm_digits")

Re-running with the same ``workdir`` resumes from its latest checkpoint; since batches and keys
are pure functions of ``(seed, step)``, the resumed run ends with the same params as an
uninterrupted one.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from jaxdiff import parallel, pipelines
from jaxdiff.train.checkpoint import Checkpointer, CheckpointError
from jaxdiff.train.metrics import MetricWriter
from jaxdiff.train.step import TrainState, create_train_state, make_optimizer, make_train_step


class TrainingDivergedError(RuntimeError):
    """The loss or gradient became NaN/Inf; training stopped with the last good checkpoint kept."""


def check_workdir(workdir: str) -> str:
    """Create ``workdir`` and prove it is writable, or raise a clear ``PermissionError``."""
    workdir = os.path.abspath(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_probe_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(
            f"Cannot write to the workdir {workdir!r} ({e.strerror or e}). Pass a writable --workdir=DIR."
        ) from e
    return workdir


def _validate_config(config: ml_collections.ConfigDict) -> None:
    for key in ("seed", "train.num_steps", "train.batch_size", "train.checkpoint_every"):
        node = config
        for part in key.split("."):
            if part not in node:
                raise ValueError(f"The config lacks the required key '{key}'.")
            node = node[part]
    t = config.train
    for key in ("num_steps", "batch_size", "checkpoint_every", "log_every"):
        if int(t.get(key, 1)) < 1:
            raise ValueError(f"train.{key} must be >= 1, got {t.get(key)}.")


def train(config: ml_collections.ConfigDict, workdir: str, *, num_devices: int | None = None) -> dict:
    """Train (or resume) the diffusion model described by ``config`` in ``workdir``.

    Returns a summary dict: final ``step``, last ``loss``, ``steps_per_sec``, the last checkpoint
    step, the sample grid path and the final ``state`` (a :class:`TrainState`).
    Raises :class:`TrainingDivergedError` on a NaN/Inf loss, :class:`CheckpointError` when a
    checkpoint cannot be written (earlier ones stay intact), ``PermissionError`` for an unwritable
    workdir, and ``ValueError`` for a bad config or batch size.
    """
    _validate_config(config)
    workdir = check_workdir(workdir)
    parallel.initialize_distributed()
    mesh = parallel.make_mesh(num_devices if num_devices is not None else config.get("num_devices") or None)
    tc = config.train
    parallel.check_batch_size(tc.batch_size, mesh)

    dataset = pipelines.make_dataset(config, split="train")
    model = pipelines.build_model(config, dataset.image_shape, dataset.num_classes)
    schedule = pipelines.build_schedule(config)
    optimizer = make_optimizer(
        learning_rate=tc.lr,
        warmup_steps=tc.warmup_steps,
        decay_steps=tc.num_steps if tc.get("cosine_decay", False) else None,
        weight_decay=tc.get("weight_decay", 0.0),
        grad_clip=tc.get("grad_clip", 1.0) or None,
        b1=tc.get("b1", 0.9),
        b2=tc.get("b2", 0.999),
    )

    # Initialise directly into the target shardings (no full replica on one device first).
    def init_state():
        return create_train_state(model.init_params(jax.random.key(config.seed)), optimizer)

    abstract = jax.eval_shape(init_state)
    state_shardings = TrainState(
        step=parallel.replicated(mesh),
        params=parallel.param_shardings(abstract.params, mesh, fsdp=tc.get("fsdp", False)),
        ema_params=parallel.param_shardings(abstract.ema_params, mesh, fsdp=tc.get("fsdp", False)),
        opt_state=parallel.param_shardings(abstract.opt_state, mesh, fsdp=tc.get("fsdp", False)),
    )
    ckpt = Checkpointer(workdir, max_to_keep=tc.get("keep_checkpoints", 3))
    meta = pipelines.run_metadata(config, dataset, model)
    if ckpt.latest_step() is not None:
        saved_model = ckpt.restore_meta().get("model")
        if saved_model != meta["model"]:
            raise CheckpointError(
                f"The checkpoint in {ckpt.directory} was written with a different model config "
                f"({saved_model}) than the current one ({meta['model']}). Use a new --workdir, or the old config."
            )
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_shardings)
        state, _ = ckpt.restore(target)
        print(f"Resuming from checkpoint step {int(state.step)} in {ckpt.directory}", flush=True)
    else:
        state = jax.jit(init_state, out_shardings=state_shardings)()
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))

    step_fn = make_train_step(
        model.train_apply_fn(p_uncond=config.diffusion.get("p_uncond", 0.0)),
        optimizer,
        schedule,
        prediction=config.diffusion.prediction,
        min_snr_gamma=config.diffusion.get("min_snr_gamma") or None,
        ema_decay=tc.ema_decay,
        seed=config.seed,
    )
    batch_sharding = parallel.data_sharding(mesh)
    train_step = jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, parallel.replicated(mesh)),
        donate_argnums=0,
    )

    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    start = int(state.step)
    num_steps = int(tc.num_steps)
    pending: list[tuple[int, dict]] = []  # device metrics not yet fetched (avoid a sync per step)
    last_good_ckpt = ckpt.latest_step()
    last_loss = math.nan
    t_last, s_last = time.perf_counter(), start
    steps_per_sec = math.nan
    grid_path = None

    def flush():
        nonlocal last_loss
        if not pending:
            return None
        fetched = jax.device_get(pending)
        pending.clear()
        for s, m in fetched:
            if not bool(m["finite"]):
                ckpt.wait()
                raise TrainingDivergedError(
                    f"The loss became {float(m['loss'])} (grad norm {float(m['grad_norm'])}) at step {s}; "
                    f"training stopped. The last good checkpoint is step {ckpt.latest_step()} in "
                    f"{ckpt.directory}. Lower train.lr, raise train.warmup_steps or check the data, then re-run."
                )
        s, m = fetched[-1]
        last_loss = float(m["loss"])
        return s, {k: float(v) for k, v in m.items() if k != "finite"}

    host_local = tc.batch_size // jax.process_count()
    lo = jax.process_index() * host_local
    bar = tqdm(total=num_steps, initial=start, desc="train", dynamic_ncols=True, disable=jax.process_index() != 0)
    try:
        for step, batch in zip(range(start, num_steps), dataset.iterate(start_step=start)):
            batch = {k: v[lo : lo + host_local] for k, v in batch.items()}
            state, metrics = train_step(state, parallel.shard_batch(batch, mesh))
            pending.append((step, metrics))
            done = step + 1
            bar.update(1)
            if done % tc.log_every == 0 or done == num_steps:
                out = flush()
                now = time.perf_counter()
                steps_per_sec = (done - s_last) / max(now - t_last, 1e-9)
                t_last, s_last = now, done
                if out is not None:
                    scalars = {**out[1], "steps_per_sec": steps_per_sec}
                    writer.write(done, scalars)
                    bar.set_postfix(loss=f"{out[1]['loss']:.4f}", steps_s=f"{steps_per_sec:.2f}")
            if done % tc.checkpoint_every == 0 or done == num_steps:
                flush()
                ckpt.save(done, state, {**meta, "step": done})
                last_good_ckpt = done
            if tc.get("sample_every", 0) and done % tc.sample_every == 0 and done != num_steps:
                flush()
                grid_path = _write_samples(config, model, schedule, state, workdir, f"samples_{done:07d}")
    finally:
        bar.close()
        writer.close()
        try:
            ckpt.wait()
        finally:
            ckpt.close()

    if int(state.step) >= num_steps and tc.get("num_samples", 0):
        grid_path = _write_samples(config, model, schedule, state, workdir, "samples_final")
    return {
        "step": int(state.step),
        "loss": last_loss,
        "steps_per_sec": steps_per_sec,
        "checkpoint_step": last_good_ckpt,
        "samples": grid_path,
        "state": state,
    }


def _write_samples(config, model, schedule, state, workdir, name) -> str:
    sc = config.sample
    images, labels = pipelines.generate(
        model,
        state.ema_params,
        schedule,
        config,
        num=config.train.num_samples,
        key=jax.random.key(sc.get("seed", 0)),
    )
    path = os.path.join(workdir, name)
    pipelines.save_samples(path, images, labels)
    if jax.process_index() == 0:
        print(f"Wrote {path}.png and {path}.npz", flush=True)
    return path + ".png"
