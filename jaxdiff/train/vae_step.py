"""The KL autoencoder's losses and its pure, jit-compiled train step (latent-diffusion's
``LPIPSWithDiscriminator`` recipe, without LPIPS and without the learned output log-variance).

Generator (autoencoder) loss, per example summed over pixels / latent elements, averaged over the
batch (latent-diffusion's normalisation, so ``kl_weight`` means what it means there, 1e-6 for SD)::

    L_G = sum_pixels |x - x_rec|^p  +  kl_weight * KL(q(z|x) || N(0, I))  +  f(step) * lambda * L_adv
    L_adv = -mean(D(x_rec))                       (p = 1 for "l1", 2 for "l2"; x_rec decodes z ~ q)

    f(step) = disc_weight if step >= disc_start else 0
    lambda  = ||grad_last L_rec|| / (||grad_last L_adv|| + 1e-4), clipped to [0, 1e4]
              (the adaptive weight of Esser et al. 2021, ``grad_last`` = gradient w.r.t. the
               decoder's last conv kernel; lambda = 1 when ``adaptive_weight=False``)

Discriminator (hinge) loss, trained only from ``disc_start`` on::

    L_D = 0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(stop_grad(x_rec)))))

The discriminator's params and optimiser state live in :class:`VAETrainState`, so checkpoints and
resume cover them. As in :mod:`jaxdiff.train.step`, the step's key is ``fold_in(key(seed), step)``
and a non-finite loss or gradient leaves the whole state (``step`` included) unchanged.

Two compiled variants of one step: ``make_vae_train_step(..., gan=False)`` never evaluates the
discriminator (what every step before ``disc_start`` computes anyway: no adversarial gradient, the
discriminator frozen), ``gan=True`` evaluates it and gates it by ``step >= disc_start``. The host
loop calls the first for steps ``< disc_start`` and the second after, so the choice is a function
of the step alone and a resumed run replays exactly. (A ``lax.cond`` on the step would be one
program, but XLA:CPU runs convolutions inside a conditional ~15x slower.)
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxdiff.nn.vae import DiagonalGaussian
from jaxdiff.train.step import ema_update, tree_where

RECON_LOSSES = ("l1", "l2")


@struct.dataclass
class VAETrainState:
    step: jax.Array  # int32 scalar: optimiser steps taken == batches consumed
    params: Any  # autoencoder
    ema_params: Any
    opt_state: Any
    disc_params: Any  # discriminator ({} when there is none)
    disc_opt_state: Any


def create_vae_train_state(params: Any, optimizer: optax.GradientTransformation, disc_params: Any = None,
                           disc_optimizer: optax.GradientTransformation | None = None) -> VAETrainState:
    if (disc_params is None) != (disc_optimizer is None):
        raise ValueError("Pass both disc_params and disc_optimizer, or neither.")
    return VAETrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=optimizer.init(params),
        disc_params={} if disc_params is None else disc_params,
        disc_opt_state={} if disc_optimizer is None else disc_optimizer.init(disc_params),
    )


# ----------------------------------------------------------------------------- losses
def reconstruction_loss(x: jax.Array, x_rec: jax.Array, kind: str = "l1") -> jax.Array:
    """Per-example reconstruction loss summed over all pixels and channels: [B] float32.

    x, x_rec: [B, H, W, C]. ``kind``: "l1" (sum |x - x_rec|) or "l2" (sum (x - x_rec)^2)."""
    if kind not in RECON_LOSSES:
        raise ValueError(f"Reconstruction loss must be one of {RECON_LOSSES}, got {kind!r}.")
    d = x_rec.astype(jnp.float32) - x.astype(jnp.float32)
    err = jnp.abs(d) if kind == "l1" else jnp.square(d)
    return jnp.sum(err, axis=tuple(range(1, x.ndim)))


def kl_loss(posterior: DiagonalGaussian) -> jax.Array:
    """KL(q(z|x) || N(0, I)) per example, summed over latent elements: [B] float32."""
    return posterior.kl()


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_rec)))), a scalar (taming's ``hinge_d_loss``)."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def generator_adv_loss(logits_fake: jax.Array) -> jax.Array:
    """The generator's hinge/adversarial loss -mean(D(x_rec)), a scalar."""
    return -jnp.mean(logits_fake)


def adaptive_weight(grad_rec_last: jax.Array, grad_adv_last: jax.Array, max_weight: float = 1e4) -> jax.Array:
    """||g_rec|| / (||g_adv|| + 1e-4) clipped to [0, max_weight], no gradient (Esser et al. 2021, eq. 7)."""
    w = jnp.linalg.norm(grad_rec_last.ravel()) / (jnp.linalg.norm(grad_adv_last.ravel()) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(w, 0.0, max_weight))


def _psnr_from_mse(mse: jax.Array) -> jax.Array:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2, i.e. the same number as on [0, 255])."""
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))


def default_last_layer(params: Any) -> jax.Array:
    """The decoder's output conv kernel of :class:`jaxdiff.nn.vae.AutoencoderKL`."""
    return params["decoder"]["conv_out"]["kernel"]


# ----------------------------------------------------------------------------- the step
def make_vae_train_step(
    vae_apply: Callable,
    optimizer: optax.GradientTransformation,
    *,
    disc_apply: Callable | None = None,
    disc_optimizer: optax.GradientTransformation | None = None,
    recon_loss: str = "l1",
    kl_weight: float = 1e-6,
    disc_weight: float = 0.0,
    disc_start: int = 0,
    adaptive_weight_on: bool = True,
    last_layer: Callable[[Any], jax.Array] = default_last_layer,
    ema_decay: float = 0.999,
    seed: int = 0,
    gan: bool = True,
) -> Callable[[VAETrainState, Mapping[str, jax.Array]], tuple[VAETrainState, dict]]:
    """Build ``train_step(state, batch) -> (state, metrics)``, a pure function to ``jax.jit``.

    ``vae_apply(params, x, key) -> (x_rec, posterior)`` decodes a posterior sample drawn with
    ``key``; ``disc_apply(disc_params, x) -> logits``. ``batch['image']``: [B, H, W, C] in [-1, 1].
    ``gan=False`` (or ``disc_weight == 0`` or no discriminator) builds the variant that never
    evaluates the discriminator. Metrics (same keys in both variants): ``loss`` (L_G), ``rec``
    (per-example sum), ``l1`` / ``mse`` / ``psnr`` (per pixel, of this batch), ``kl``,
    ``posterior_std``, ``g_loss``, ``d_loss``, ``adv_weight`` (f * lambda), ``logits_real``,
    ``logits_fake``, ``grad_norm``, ``d_grad_norm``, ``finite``.
    """
    if recon_loss not in RECON_LOSSES:
        raise ValueError(f"recon_loss must be one of {RECON_LOSSES}, got {recon_loss!r}.")
    if kl_weight < 0 or disc_weight < 0:
        raise ValueError(f"kl_weight and disc_weight must be >= 0, got {kl_weight}, {disc_weight}.")
    use_disc = gan and disc_weight > 0 and disc_apply is not None
    if use_disc and disc_optimizer is None:
        raise ValueError("A discriminator needs disc_optimizer.")
    base_key = jax.random.key(seed)
    zero = jnp.zeros((), jnp.float32)

    def forward(params, disc_params, x, key):
        x_rec, posterior = vae_apply(params, x, key)
        rec = jnp.mean(reconstruction_loss(x, x_rec, recon_loss))
        kl = jnp.mean(kl_loss(posterior))
        base = rec + kl_weight * kl
        g = generator_adv_loss(disc_apply(disc_params, x_rec)) if use_disc else zero
        return (base, g), (x_rec, posterior, rec, kl)

    def train_step(state: VAETrainState, batch: Mapping[str, jax.Array]):
        key = jax.random.fold_in(base_key, state.step)
        x = batch["image"].astype(jnp.float32)
        (base, g), vjp_fn, (x_rec, posterior, rec, kl) = jax.vjp(
            lambda p: forward(p, state.disc_params, x, key), state.params, has_aux=True)
        (grads,) = vjp_fn((jnp.ones_like(base), jnp.zeros_like(g)))
        metrics = {"g_loss": g, "d_loss": zero, "adv_weight": zero, "logits_real": zero,
                   "logits_fake": zero, "d_grad_norm": zero}
        disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
        finite = jnp.isfinite(base)
        loss = base
        if use_disc:
            on = state.step >= disc_start
            (grads_adv,) = vjp_fn((jnp.zeros_like(base), jnp.ones_like(g)))
            lam = adaptive_weight(last_layer(grads), last_layer(grads_adv)) if adaptive_weight_on else 1.0
            w = jnp.where(on, disc_weight * lam, 0.0)
            # where, not w * g_adv: a non-finite adversarial gradient must not leak in before disc_start.
            grads = jax.tree.map(lambda a, b: jnp.where(on, a + w * b, a), grads, grads_adv)
            loss = jnp.where(on, base + w * g, base)

            def d_loss_fn(dp):
                real = disc_apply(dp, x)
                fake = disc_apply(dp, jax.lax.stop_gradient(x_rec))
                return hinge_d_loss(real, fake), (jnp.mean(real), jnp.mean(fake))

            (d_loss, (lr_, lf_)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(state.disc_params)
            d_grad_norm = optax.global_norm(d_grads)
            d_updates, d_opt = disc_optimizer.update(d_grads, state.disc_opt_state, state.disc_params)
            d_params = optax.apply_updates(state.disc_params, d_updates)
            disc_params, disc_opt_state = tree_where(on, (d_params, d_opt), (state.disc_params, state.disc_opt_state))
            finite = finite & jnp.isfinite(loss) & jnp.where(on, jnp.isfinite(d_loss) & jnp.isfinite(d_grad_norm), True)
            metrics.update(d_loss=d_loss, adv_weight=w, logits_real=lr_, logits_fake=lf_, d_grad_norm=d_grad_norm)

        grad_norm = optax.global_norm(grads)
        finite = finite & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = VAETrainState(
            step=state.step + 1,
            params=params,
            ema_params=ema_update(state.ema_params, params, state.step, ema_decay),
            opt_state=opt_state,
            disc_params=disc_params,
            disc_opt_state=disc_opt_state,
        )
        new = tree_where(finite, new, state)
        d = x_rec - x
        mse = jnp.mean(jnp.square(d))
        metrics.update(loss=loss, rec=rec, kl=kl, l1=jnp.mean(jnp.abs(d)), mse=mse, psnr=_psnr_from_mse(mse),
                       posterior_std=jnp.mean(posterior.std), grad_norm=grad_norm, finite=finite)
        return new, metrics

    return train_step
