"""The host training loop: data -> sharded jit train step -> metrics, checkpoints, sample grids.

    >>> from experiments.configs import ddpm_digits, ldm_digits, vae_digits
    >>> from jaxdiff.train.loop import train
    >>> train(ddpm_digits.get_config(), "runs/ddpm_digits")
    >>> train(vae_digits.get_config(), "runs/vae_digits")      # KL autoencoder (+ latent scale factor)
    >>> train(ldm_digits.get_config(), "runs/ldm_digits")      # U-Net on that VAE's latents

Re-running with the same ``workdir`` resumes from its latest checkpoint; since batches and keys
are pure functions of ``(seed, step)``, the resumed run ends with the same params as an
uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxdiff import config as config_lib
from jaxdiff import generation, models, parallel, xla
from jaxdiff.config import Config
from jaxdiff import images as imgs
from jaxdiff.data.captions import TokenizedCaptions
from jaxdiff.data.latent import LatentDataset
from jaxdiff.eval import in_training
from jaxdiff.train import build
from jaxdiff.train.checkpoint import Checkpointer, CheckpointError
from jaxdiff.train.metrics import MetricWriter
from jaxdiff.train.step import TrainState, create_train_state, make_optimizer, make_train_step
from jaxdiff.train.vae_step import create_vae_train_state, make_vae_train_step


class TrainingDivergedError(RuntimeError):
    """The loss or gradient became NaN/Inf; training stopped with the last good checkpoint kept."""


def check_workdir(workdir: str) -> str:
    """Create ``workdir`` and prove it is writable, or raise a clear ``PermissionError``."""
    workdir = os.path.abspath(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_probe_{socket.gethostname()}_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(
            f"Cannot write to the workdir {workdir!r} ({e.strerror or e}). Pass a writable --workdir=DIR."
        ) from e
    return workdir


def _validate_config(config: Config) -> None:
    """What :func:`jaxdiff.config.parse` cannot check on its own: files the config names."""
    t = config.train
    if t.eval_every and t.eval_inception and not os.path.isfile(os.path.expanduser(t.eval_inception)):
        from jaxdiff.interop.inception import CONVERT_HINT

        raise ValueError(f"train.eval_inception={t.eval_inception}: no such file (the FID Inception weights); "
                         f"{CONVERT_HINT}.")
    if t.eval_fid_ref and not t.eval_inception:
        raise ValueError("train.eval_fid_ref is set but train.eval_inception is not: FID needs the Inception weights.")


def eval_settings(config: Config) -> in_training.EvalSettings:
    """The ``train.eval_*`` keys of ``config`` as the in-training evaluation's settings."""
    config = config_lib.parse(config)
    t, d = config.train, config.data
    return in_training.EvalSettings(
        every=t.eval_every, num=t.eval_num, seed=config.sample.seed, inception=os.path.expanduser(t.eval_inception),
        fid_ref=t.eval_fid_ref, data_name=d.name, data_dir=d.data_dir, image_size=d.image_size, holdout=d.holdout,
        prompts=tuple(config.sample.prompts))


def train(config: Config, workdir: str, *, num_devices: int | None = None) -> dict:
    """Train (or resume) the model described by ``config`` in ``workdir``.

    ``config``: a :class:`jaxdiff.config.Config` or an experiment ``ConfigDict`` (parsed here, once:
    a wrong key or value is a one-line ``ValueError``). ``config.task``: ``"diffusion"``, ``"latent"``
    (on a trained VAE run's latents), ``"text"``, ``"finetune"`` (a Stable Diffusion folder) or
    ``"vae"`` (a KL autoencoder, see :func:`train_vae`).

    Devices: the mesh of ``config.mesh`` (``data`` x ``fsdp``; default all devices on ``data``)
    over all devices of all processes (``num_devices``/``config.num_devices``: fewer, on one
    process). Many processes: call :func:`jaxdiff.parallel.initialize_distributed` first; every
    process runs ``train`` with the same arguments, reads only its own rows of each batch, and only
    process 0 writes metrics, config, samples and the progress bar (checkpoints are written by all,
    as Orbax does). SIGTERM (a preemption notice) to any process: all save a checkpoint at the step
    they agree on and return with ``preempted`` True; re-running resumes there.

    Evaluation (``train.eval_every`` > 0): every ``eval_every`` steps and at the last step, the
    job's metrics on a fixed-key sample set of ``train.eval_num`` images from the EMA params
    (:mod:`jaxdiff.eval.in_training`: digits classifier accuracy / Frechet and the SVM judge,
    shapes prompt adherence, FID with ``train.eval_inception``; a VAE's test PSNR), logged as
    ``eval/...`` scalars to ``metrics.jsonl`` and TensorBoard, one line printed per evaluation.

    Returns a summary dict: final ``step``, last ``loss``, ``steps_per_sec``, the last checkpoint
    step, the sample grid path, ``preempted``, ``eval`` (the last evaluation's scalars, {} if none)
    and the final ``state`` (a :class:`TrainState`).
    Raises :class:`TrainingDivergedError` on a NaN/Inf loss, :class:`CheckpointError` when a
    checkpoint cannot be written (earlier ones stay intact), ``PermissionError`` for an unwritable
    workdir, ``ValueError`` for a bad config or batch size, and
    :class:`jaxdiff.train.build.VAENotReadyError` when a latent config's VAE run does not exist.
    """
    config = config_lib.parse(config)
    _validate_config(config)
    parallel.check_initialized()
    workdir = check_workdir(workdir)
    mesh = parallel.make_mesh(num_devices if num_devices is not None else config.num_devices,
                              data=config.mesh.data, fsdp=config.mesh.fsdp)
    parallel.check_batch_size(config.train.batch_size, mesh)
    if config.task == "vae":
        return train_vae(config, workdir, mesh)
    return _train_diffusion(config, workdir, mesh)


def _make_optimizer(tc: config_lib.Train):
    return make_optimizer(learning_rate=tc.lr, warmup_steps=tc.warmup_steps,
                          decay_steps=tc.num_steps if tc.cosine_decay else None, weight_decay=tc.weight_decay,
                          grad_clip=tc.grad_clip, b1=tc.b1, b2=tc.b2)


def _peek_meta(workdir: str) -> dict | None:
    """The latest checkpoint's metadata of ``workdir``, or None (creates nothing)."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return None
    ck = Checkpointer(workdir, read_only=True)
    try:
        return ck.restore_meta() if ck.latest_step() is not None else None
    finally:
        ck.close()


def _init_or_restore(ckpt: Checkpointer, init_state, state_shardings, meta: dict, keys=("model",), init_args=()):
    """Restore the newest readable checkpoint into ``state_shardings`` (refusing one whose ``meta[key]``
    differ), or initialise directly into the target shardings (no full replica on one device first):
    ``init_state(*init_args)``, jitted (pretrained weights come in as ``init_args``, never as constants).

    An unreadable checkpoint (truncated or corrupted files) is reported by step and path, moved to
    ``checkpoints.corrupt/`` (never deleted) and the next older one is tried."""
    abstract = jax.eval_shape(init_state, *init_args)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_shardings)
    unreadable = []
    for step in sorted(ckpt.all_steps(), reverse=True):
        try:
            saved = ckpt.restore_meta(step)
        except Exception as e:
            unreadable.append(_set_aside(ckpt, step, e))
            continue
        for key in keys:
            if _normalised(saved.get(key), key) != _normalised(meta.get(key), key):
                what = "model config" if key == "model" else key
                raise CheckpointError(
                    f"The checkpoint in {ckpt.directory} was written with a different {what} "
                    f"({saved.get(key)}) than the current one ({meta.get(key)}). Use a new --workdir, or the old config."
                )
        try:
            state, _ = ckpt.restore(target, step)
        except CheckpointError as e:
            unreadable.append(_set_aside(ckpt, step, e.__cause__ or e))
            continue
        if parallel.is_writer():
            print(f"Resuming from checkpoint step {int(state.step)} in {ckpt.directory}", flush=True)
        return state
    if unreadable:  # never silently restart a run whose every checkpoint failed to read (a full disk, ...)
        raise CheckpointError(
            f"No checkpoint in {ckpt.directory} could be read; moved aside (kept): {', '.join(unreadable)}. "
            "Move one back once it is readable to resume, or use a new --workdir to start over.")
    return jax.jit(init_state, out_shardings=state_shardings)(*init_args)


def _normalised(entry, key: str):
    """A metadata entry as compared on resume: a model's ``arch`` with its defaults filled in (checkpoints
    written before typed configs stored only the keys their config file had)."""
    if key == "model" and isinstance(entry, dict) and "arch" in entry:
        return {**entry, "arch": config_lib.model_arch(entry["arch"])}
    return entry


def _set_aside(ckpt: Checkpointer, step: int, error: BaseException) -> str:
    path = os.path.join(ckpt.directory, str(step))
    moved = ckpt.set_aside(step)
    older = [s for s in ckpt.all_steps() if s < step]
    if parallel.is_writer():
        why = " ".join(str(error).split())[:200]
        print(f"warning: checkpoint step {step} at {path} is unreadable ({type(error).__name__}: {why}); moved it to "
              f"{moved} (kept, not deleted)" + (f" and trying step {max(older)}." if older else "."), flush=True)
    return moved


def _train_diffusion(config: Config, workdir: str, mesh) -> dict:
    tc = config.train
    vae_step = None
    if build.is_latent(config):
        # Resume with the VAE checkpoint this run was started with, even if the VAE run moved on.
        saved = _peek_meta(workdir)
        if saved is not None and saved.get("vae"):
            want = os.path.abspath(os.path.expanduser(config.vae.workdir))
            if saved["vae"]["workdir"] != want:
                raise CheckpointError(
                    f"The checkpoint in {workdir} was trained on latents of the VAE run {saved['vae']['workdir']}, "
                    f"not {want}. Use a new --workdir, or the old vae.workdir.")
            vae_step = int(saved["vae"]["step"])
    model = None
    if build.is_pretrained(config):  # a Stable Diffusion folder: read once (config copy with its schedule facts)
        config, model = build.load_pretrained(config)
        tc = config.train
    dataset = build.make_dataset(config, split="train", vae_step=vae_step,
                                 autoencoder=None if model is None else model.autoencoder)
    if isinstance(dataset, LatentDataset) and parallel.is_writer():
        print(f"Latent diffusion on {dataset}", flush=True)
    if model is None:
        model = build.build_model(config, dataset.image_shape, dataset.num_classes,
                                  getattr(dataset, "autoencoder", None))
    if model.text_conditional:  # captions -> token ids on the host (strings cannot be sharded)
        dataset = TokenizedCaptions(dataset, model)
    schedule = build.build_schedule(config)
    optimizer = _make_optimizer(tc)

    frozen = frozen_shardings = None
    init_args = ()
    if isinstance(model, models.PretrainedTextDiffusionModel):
        # The folder's weights go onto the mesh once, as arguments: the trainable part initialises the
        # state, the rest (a frozen text encoder, the base U-Net under LoRA) is the step's `frozen`.
        base_shardings = parallel.param_shardings(model.base, mesh)
        base = build.place(model.base, base_shardings)
        frozen = model.frozen_params(base)
        frozen_shardings = model.frozen_params(base_shardings)
        init_args = (base,)

        def init_state(base):
            return create_train_state(model.init_trainable(jax.random.key(config.seed), base), optimizer)
    else:
        def init_state():
            return create_train_state(model.init_params(jax.random.key(config.seed)), optimizer)

    abstract = jax.eval_shape(init_state, *init_args)
    state_shardings = TrainState(
        step=parallel.replicated(mesh),
        params=parallel.param_shardings(abstract.params, mesh),
        ema_params=parallel.param_shardings(abstract.ema_params, mesh),
        opt_state=parallel.param_shardings(abstract.opt_state, mesh),
    )
    ckpt = Checkpointer(workdir, max_to_keep=tc.keep_checkpoints)
    meta = build.run_metadata(config, dataset, model)
    state = _init_or_restore(ckpt, init_state, state_shardings, meta, keys=("model", "vae", "pretrained"),
                             init_args=init_args)
    del init_args
    base = None  # the base U-Net of a full fine-tune lives on only in the state
    _write_config(config, workdir)

    step_fn = make_train_step(
        model.train_apply_fn(p_uncond=config.diffusion.p_uncond),
        optimizer,
        schedule,
        min_snr_gamma=config.diffusion.min_snr_gamma,
        ema_decay=tc.ema_decay,
        seed=config.seed,
    )
    train_step = _jit_step(step_fn, state_shardings, mesh, frozen_shardings)
    if frozen is not None:
        jitted = train_step

        def train_step(state, batch):
            return jitted(state, batch, frozen)

        sampling_params = jax.jit(model.full_params, out_shardings=parallel.param_shardings(
            jax.eval_shape(model.full_params, abstract.params, frozen), mesh))

    def sample_params(state):
        """What sampling takes: the EMA params (fine-tuning: merged with the frozen weights)."""
        return state.ema_params if frozen is None else sampling_params(state.ema_params, frozen)

    def on_sample(done, state):
        return _write_samples(config, model, schedule, sample_params(state), workdir, f"samples_{done:07d}")

    on_eval = None
    evaluator = _make_evaluator(config, model, schedule, mesh)
    if evaluator is not None:
        def on_eval(done, state):
            scalars = evaluator(sample_params(state))
            if parallel.is_writer():
                print("\n" + evaluator.line(done, scalars), flush=True)
            return scalars

    summary = _host_loop(config, workdir, mesh, dataset, state, lambda step: train_step, ckpt,
                         checkpoint_meta=lambda done, state: {**meta, "step": done}, on_sample=on_sample,
                         on_eval=on_eval)
    state = summary["state"]
    if int(state.step) >= tc.num_steps and tc.num_samples:
        summary["samples"] = _write_samples(config, model, schedule, sample_params(state), workdir, "samples_final")
    if frozen is not None:
        summary["frozen"] = frozen
    return summary


def _make_evaluator(config, model, schedule, mesh) -> in_training.InTrainingEval | None:
    """The run's in-training evaluation (:mod:`jaxdiff.eval.in_training`), or None when
    ``train.eval_every`` is 0 or no metric fits the run (then a one-line notice)."""
    settings = eval_settings(config)
    if not settings.every:
        return None
    if not in_training.choose_metrics(settings, model):
        if parallel.is_writer():
            print(f"note: train.eval_every={settings.every} but no in-training metric fits this run (data "
                  f"{settings.data_name!r}); set train.eval_inception=WEIGHTS.safetensors for FID. Evaluation is off.",
                  flush=True)
        return None
    return in_training.InTrainingEval(settings, model, schedule, config, mesh=mesh)


def _write_config(config, workdir):
    if not parallel.is_writer():
        return
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config_lib.to_dict(config), f, indent=2)


def _jit_step(step_fn, state_shardings, mesh, frozen_shardings=None):
    """``step_fn(state, batch)`` (or ``(state, batch, frozen)`` with ``frozen_shardings``) jitted over
    the mesh, the state donated."""
    frozen = () if frozen_shardings is None else (frozen_shardings,)
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, parallel.data_sharding(mesh), *frozen),
        out_shardings=(state_shardings, parallel.replicated(mesh)),
        donate_argnums=0,
        compiler_options=xla.compiler_options(mesh.devices.flat[0].platform) or None,
    )


def _host_loop(config, workdir, mesh, dataset, state, step_for, ckpt, *, checkpoint_meta, on_sample=None,
               on_checkpoint=None, on_eval=None) -> dict:
    """Run ``state, metrics = step_for(step)(state, batch)`` from ``state.step`` to
    ``config.train.num_steps``: metrics (fetched every ``log_every`` steps, not every step),
    checkpoints with ``checkpoint_meta(done, state)``, periodic samples (``on_sample(done, state)``)
    and progress. ``on_checkpoint(done, state) -> {name: float}`` scalars are logged at each save;
    ``on_eval(done, state) -> {name: float}`` every ``train.eval_every`` steps and at the last one
    (after that step's checkpoint; every process calls it, the writer logs what it returns; the
    time it takes is kept out of steps/s). A step's scalars (losses, checkpoint, eval) make one
    metrics line. The summary's ``eval`` holds the last evaluation's scalars.

    Each process reads only its rows of every global batch (:func:`jaxdiff.parallel.host_rows`).
    A preemption notice (SIGTERM) saves a checkpoint at the step all processes agree on and stops."""
    tc = config.train
    writer = MetricWriter(workdir, enabled=parallel.is_writer())
    start = int(state.step)
    num_steps = int(tc.num_steps)
    pending: list[tuple[int, dict]] = []  # device metrics not yet fetched (avoid a sync per step)
    last_good_ckpt = ckpt.latest_step()
    last_loss = math.nan
    t_last, s_last = time.perf_counter(), start
    steps_per_sec = math.nan
    grid_path = None
    preempted = False
    eval_every = tc.eval_every if on_eval is not None else 0
    last_eval: dict = {}
    row: dict = {}  # the scalars of the current step, written as one line
    done = start

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

    batch_size = int(tc.batch_size)
    rows = parallel.host_rows(batch_size, mesh)
    bar = tqdm(total=num_steps, initial=start, desc="train", dynamic_ncols=True, disable=not parallel.is_writer())
    restore_sigterm = parallel.install_preemption_handler()
    try:
        for step, batch in zip(range(start, num_steps), dataset.iterate(start_step=start, rows=rows)):
            state, metrics = step_for(step)(state, parallel.global_batch(batch, rows, batch_size, mesh))
            pending.append((step, metrics))
            done = step + 1
            bar.update(1)
            if done % tc.log_every == 0 or done == num_steps:
                out = flush()
                now = time.perf_counter()
                steps_per_sec = (done - s_last) / max(now - t_last, 1e-9)
                t_last, s_last = now, done
                if out is not None:
                    row.update(out[1], steps_per_sec=steps_per_sec)
                    bar.set_postfix(loss=f"{out[1]['loss']:.4f}", steps_s=f"{steps_per_sec:.2f}")
            preempted = parallel.reached_preemption(done) and done != num_steps
            if done % tc.checkpoint_every == 0 or done == num_steps or preempted:
                flush()
                ckpt.save(done, state, checkpoint_meta(done, state))
                last_good_ckpt = done
                if on_checkpoint is not None:
                    row.update(on_checkpoint(done, state))
                t_last, s_last = time.perf_counter(), done  # keep checkpoint work out of steps/s
            if not preempted and eval_every and (done % eval_every == 0 or done == num_steps):
                flush()
                last_eval = on_eval(done, state)
                row.update(last_eval)
                t_last, s_last = time.perf_counter(), done
            if row:  # one metrics line per step: losses, checkpoint and eval scalars together
                writer.write(done, row)
                row = {}
            if preempted:
                break
            if on_sample is not None and tc.sample_every and done % tc.sample_every == 0 and done != num_steps:
                flush()
                grid_path = on_sample(done, state)
                t_last, s_last = time.perf_counter(), done
    finally:
        restore_sigterm()
        bar.close()
        if row:  # a step's scalars logged before a failure (checkpoint, evaluation) are kept
            writer.write(done, row)
        writer.close()
        try:
            ckpt.wait()
        finally:
            ckpt.close()
    return {
        "step": int(state.step),
        "loss": last_loss,
        "steps_per_sec": steps_per_sec,
        "checkpoint_step": last_good_ckpt,
        "samples": grid_path,
        "preempted": preempted,
        "eval": last_eval,
        "state": state,
    }


# ----------------------------------------------------------------------------- the KL autoencoder
@dataclasses.dataclass(eq=False)
class VAETraining:
    """What :func:`train_vae` trains with: the models, ``init_state()``, the state shardings and the
    two jitted variants of the step (``gan_step`` is None without a discriminator)."""

    vae: models.VAEModel
    disc: Any
    init_state: Callable[[], Any]
    state_shardings: Any
    plain_step: Callable
    gan_step: Callable | None
    disc_start: int

    def step_for(self, step: int) -> Callable:
        """The program for batch ``step``: a function of the step alone, so resume replays exactly."""
        return self.gan_step if self.gan_step is not None and step >= self.disc_start else self.plain_step


def build_vae_training(config: Config, image_shape, mesh) -> VAETraining:
    config = config_lib.parse(config)
    tc, lc = config.train, config.loss
    vae = build.build_vae(config, image_shape)
    disc = build.build_discriminator(config)
    dc = config.disc or config_lib.Disc()
    optimizer = _make_optimizer(tc)
    disc_optimizer = None
    if disc is not None:
        disc_optimizer = make_optimizer(learning_rate=tc.lr if dc.lr is None else dc.lr, b1=dc.b1, b2=dc.b2,
                                        grad_clip=tc.grad_clip)
    disc_apply = None if disc is None else (lambda p, x: disc.apply({"params": p}, x))

    def init_state():
        k_vae, k_disc = jax.random.split(jax.random.key(config.seed))
        disc_params = None
        if disc is not None:
            disc_params = disc.init({"params": k_disc}, jnp.zeros((1, *vae.image_shape), jnp.float32))["params"]
        return create_vae_train_state(vae.init_params(k_vae), optimizer, disc_params, disc_optimizer)

    state_shardings = parallel.param_shardings(jax.eval_shape(init_state), mesh)
    common = dict(disc_apply=disc_apply, disc_optimizer=disc_optimizer, recon_loss=lc.recon,
                  kl_weight=lc.kl_weight, disc_weight=dc.weight, disc_start=dc.start, adaptive_weight_on=dc.adaptive,
                  ema_decay=tc.ema_decay, seed=config.seed)
    plain = _jit_step(make_vae_train_step(vae.train_apply, optimizer, gan=False, **common), state_shardings, mesh)
    gan = None
    if disc is not None:
        gan = _jit_step(make_vae_train_step(vae.train_apply, optimizer, gan=True, **common), state_shardings, mesh)
    return VAETraining(vae, disc, init_state, state_shardings, plain, gan, dc.start)


def train_vae(config: Config, workdir: str, mesh) -> dict:
    """Train (or resume) the KL autoencoder of a ``task = "vae"`` config (see
    :mod:`jaxdiff.train.vae_step` for the loss). Call through :func:`train`.

    Every checkpoint's metadata holds ``latent``: the scale factor (1 / std of posterior samples
    of the EMA autoencoder over the training split) and related statistics, and ``eval``: the
    reconstruction PSNR on the held-out ``test`` split when the dataset has one. The PSNR is logged
    as ``eval/test_psnr`` at each checkpoint, or, with ``train.eval_every`` > 0, every
    ``eval_every`` steps and at the last one (computed once for a step that is both). The final
    step also writes ``reconstructions.png`` (rows of test images above their reconstructions).
    """
    from jaxdiff.eval.psnr import psnr as psnr_fn

    tc = config.train
    dataset = build.make_dataset(config, split="train")
    t = build_vae_training(config, dataset.image_shape, mesh)
    vae = t.vae
    ckpt = Checkpointer(workdir, max_to_keep=tc.keep_checkpoints)
    meta = build.vae_run_metadata(config, dataset, vae, t.disc)
    state = _init_or_restore(ckpt, t.init_state, t.state_shardings, meta)
    _write_config(config, workdir)
    step_for = t.step_for

    # Latent statistics over the whole training split, and test-split PSNR, at every checkpoint.
    train_images, _ = dataset.examples(np.arange(dataset.num_examples))
    try:
        test_ds = build.make_dataset(config, split="test")
        test_images = test_ds.examples(np.arange(test_ds.num_examples))[0]
    except ValueError:  # the dataset has no test split
        test_images = None
    stats: dict[int, dict] = {}
    eval_every = tc.eval_every
    if eval_every and test_images is None and parallel.is_writer():
        print(f"note: train.eval_every={eval_every} but {config.data.name!r} has no test split for the PSNR. "
              "Evaluation is off.", flush=True)
    psnr_memo: dict[int, dict] = {}

    def test_psnr(done, state) -> dict:
        """Test-split PSNR of the EMA params at step ``done`` (computed once per step)."""
        if done not in psnr_memo:
            psnr_memo.clear()
            psnr_memo[done] = {"split": "test", **psnr_fn(test_images, vae.reconstruct(state.ema_params, test_images))}
        return psnr_memo[done]

    def checkpoint_meta(done, state):
        mean, std = vae.encode_images(state.ema_params, train_images)
        latent = models.latent_statistics(mean, std, seed=config.seed)
        latent.update(split="train", params="ema_params", step=done)
        ev = test_psnr(done, state) if test_images is not None else {}
        stats[done] = {"latent": latent, "eval": ev}
        return {**meta, "step": done, "latent": latent, "eval": ev}

    def on_checkpoint(done, state):
        s = stats.pop(done)
        out = {"latent/scale_factor": s["latent"]["scale_factor"], "latent/std": s["latent"]["std"]}
        logged = bool(s["eval"]) and not eval_every  # with eval_every, on_eval logs the PSNR
        if logged:
            out["eval/test_psnr"] = s["eval"]["psnr"]
        if parallel.is_writer():
            print(f"\nstep {done}: latent scale factor {out['latent/scale_factor']:.5g}"
                  + (f", test PSNR {out['eval/test_psnr']:.2f} dB (EMA params)" if logged else ""), flush=True)
        return out

    on_eval = None
    if eval_every and test_images is not None:
        def on_eval(done, state):
            t0 = time.perf_counter()
            out = {"eval/test_psnr": test_psnr(done, state)["psnr"], "eval/seconds": time.perf_counter() - t0}
            if parallel.is_writer():
                print(f"\nstep {done} eval ({len(test_images)} test images, EMA params, {out['eval/seconds']:.1f} s): "
                      f"PSNR {out['eval/test_psnr']:.2f} dB", flush=True)
            return out

    summary = _host_loop(config, workdir, mesh, dataset, state, step_for, ckpt,
                         checkpoint_meta=checkpoint_meta, on_checkpoint=on_checkpoint, on_eval=on_eval)
    state = summary["state"]
    if int(state.step) >= tc.num_steps and test_images is not None:
        k = min(len(test_images), 16)
        rec = vae.reconstruct(state.ema_params, test_images[:k])  # every process takes part
        path = os.path.join(workdir, "reconstructions")
        if parallel.is_writer():
            imgs.save_samples(path, np.concatenate([test_images[:k], rec]), ncol=k)
        summary["samples"] = path + ".png"
    return summary


def _write_samples(config, model, schedule, params, workdir, name) -> str:
    """Sample ``config.train.num_samples`` images with ``params`` (the EMA params, or a fine-tune's
    full params) and write ``workdir/name.png`` and ``.npz``."""
    sc = config.sample
    path = os.path.join(workdir, name)
    if model.text_conditional:  # one column per prompt of sample.prompts
        prompts = generation.cycle_prompts(list(sc.prompts), config.train.num_samples)
        images = generation.generate_text(model, params, schedule, config, prompts=prompts,
                                         key=jax.random.key(sc.seed))
        if parallel.is_writer():
            imgs.save_samples(path, images, ncol=min(len(sc.prompts), len(prompts)), prompts=prompts)
            print(f"Wrote {path}.png and {path}.npz (columns: {', '.join(list(sc.prompts))})", flush=True)
        return path + ".png"
    images, labels = generation.generate(
        model,
        params,
        schedule,
        config,
        num=config.train.num_samples,
        key=jax.random.key(sc.seed),
    )
    if parallel.is_writer():
        imgs.save_samples(path, images, labels)
        print(f"Wrote {path}.png and {path}.npz", flush=True)
    return path + ".png"
