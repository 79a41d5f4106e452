"""The functional train state and the pure, jit-compiled train step.

``TrainState`` holds everything that changes during training. The data position and the PRNG
position are both ``step``: batch ``s`` is a pure function of ``(seed, s)`` (see
:mod:`jaxdiff.data`) and the step's key is ``fold_in(key(seed), s)``, so a run restored at step
``s`` continues exactly as the uninterrupted run would.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxdiff import diffusion
from jaxdiff.schedules import Schedule


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimiser steps taken == batches consumed
    params: Any
    ema_params: Any
    opt_state: Any


def create_train_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=optimizer.init(params),
    )


def make_optimizer(
    *,
    learning_rate: float,
    warmup_steps: int = 0,
    decay_steps: int | None = None,
    end_learning_rate_ratio: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
) -> optax.GradientTransformation:
    """AdamW with linear warm-up, then constant (``decay_steps=None``) or cosine decay, and
    clipping by global norm (as DDPM: Adam 2e-4, 5000 warm-up steps, clip 1.0)."""
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}.")
    if decay_steps:
        lr = optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, warmup_steps, max(decay_steps, warmup_steps + 1), learning_rate * end_learning_rate_ratio
        )
    elif warmup_steps:
        lr = optax.join_schedules(
            [optax.linear_schedule(0.0, learning_rate, warmup_steps), optax.constant_schedule(learning_rate)],
            [warmup_steps],
        )
    else:
        lr = learning_rate
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
    parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts)


def ema_update(ema_params: Any, params: Any, step: jax.Array, decay: float, warmup: bool = True) -> Any:
    """``ema <- d * ema + (1 - d) * params`` with ``d = min(decay, (1 + step) / (10 + step))`` when
    ``warmup`` (so early EMA weights are not dominated by the random init)."""
    d = jnp.asarray(decay, jnp.float32)
    if warmup:
        s = step.astype(jnp.float32)
        d = jnp.minimum(d, (1.0 + s) / (10.0 + s))
    return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema_params, params)


def tree_where(cond: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where the scalar bool ``cond`` holds, else ``old``, leaf by leaf (same structures).

    The train steps keep the old state when a loss or gradient is NaN/Inf (so the loop can stop
    with the last good one) and the discriminator's state before ``disc_start``."""
    return jax.tree.map(lambda n, o: jnp.where(cond, n, o), new, old)


def make_train_step(
    apply_fn: Callable,
    optimizer: optax.GradientTransformation,
    schedule: Schedule,
    *,
    prediction: str | None = None,
    min_snr_gamma: float | None = None,
    ema_decay: float = 0.9999,
    seed: int = 0,
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict]]:
    """Build ``train_step(state, batch) -> (state, metrics)``, a pure function to ``jax.jit``.

    ``apply_fn(params, x_t, t, batch, key)`` is the model (see :func:`jaxdiff.diffusion.diffusion_loss`); a
    :class:`jaxdiff.diffusion.Denoiser` (what the model adapters' ``train_apply_fn`` return) brings its
    prediction type, otherwise ``prediction`` names it (default ``"eps"``).
    The step's key is ``fold_in(key(seed), state.step)``. A non-finite loss or gradient leaves the
    whole state unchanged (``step`` included) and sets ``metrics['finite']`` to False, so the host
    loop can stop with the last good state.

    Fine-tuning a pretrained model: ``train_step(state, batch, frozen)`` passes the weights that are
    not trained (a frozen text encoder, the base U-Net under LoRA adapters) to
    ``apply_fn(params, x_t, t, batch, key, frozen=frozen)``. They are an argument of the jitted step
    (never baked in as constants), outside the state: no gradient, optimizer state, EMA or checkpoint.
    """
    base_key = jax.random.key(seed)
    prediction = diffusion.resolve_prediction(apply_fn, prediction)

    def loss_fn(params, batch, key, frozen):
        fn = apply_fn if frozen is None else functools.partial(apply_fn, frozen=frozen)
        return diffusion.diffusion_loss(
            fn, params, batch, key, schedule=schedule, prediction=prediction, min_snr_gamma=min_snr_gamma
        )

    def train_step(state: TrainState, batch: Mapping[str, jax.Array], frozen: Any = None):
        key = jax.random.fold_in(base_key, state.step)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key, frozen)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = TrainState(
            step=state.step + 1,
            params=params,
            ema_params=ema_update(state.ema_params, params, state.step, ema_decay),
            opt_state=opt_state,
        )
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = tree_where(finite, new, state)
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, **aux}
        return new, metrics

    return train_step
