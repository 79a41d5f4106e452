"""Pure DDPM math on a :class:`~jaxdiff.schedules.Schedule`.

Notation follows Ho et al. (2020): ``alpha_bar`` = ``alphas_cumprod[t]``,
``x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps``. We write ``alpha = sqrt(alpha_bar)``
and ``sigma = sqrt(1 - alpha_bar)`` (VDM's notation), so ``x_t = alpha x_0 + sigma eps`` and the
v-prediction target (Salimans & Ho 2022) is ``v = alpha eps - sigma x_0``.

Every function is pure and works under ``jax.jit`` and ``jax.vmap``. Images are NHWC:
``x: [B, H, W, C]`` float32; timesteps ``t: [B]`` int32 indices in ``[0, T)``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.schedules import Schedule

PREDICTIONS = ("eps", "x0", "v")


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"Unknown prediction type {prediction!r}; choose one of {PREDICTIONS}.")


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """A network function and the parameterisation of its output, bound once (the role of EDM's
    ``Precond``): ``Denoiser(fn, "v")`` is called as ``fn`` is, and every consumer -- the loss
    (:func:`diffusion_loss`), the bound (:func:`calc_bpd`), the samplers of :mod:`jaxdiff.sampling`
    and classifier-free guidance -- reads ``prediction`` from it instead of taking it as an argument.
    The model adapters of :mod:`jaxdiff.models` hand out their functions as Denoisers. Hashable
    (``fn`` by identity), so it can be a static ``jit`` argument: build it once.

    The pure functions still accept a plain function with an explicit ``prediction=`` (default
    ``"eps"``); a Denoiser and a different explicit ``prediction`` is an error."""

    fn: Callable[..., jax.Array]
    prediction: str = "eps"

    def __post_init__(self):
        _check_prediction(self.prediction)

    def __call__(self, *args, **kwargs) -> jax.Array:
        return self.fn(*args, **kwargs)


def resolve_prediction(fn: Callable, prediction: str | None) -> str:
    """What ``fn`` predicts: a :class:`Denoiser`'s bound ``prediction`` (an explicit different one is an
    error), else ``prediction`` (None: ``"eps"``)."""
    if isinstance(fn, Denoiser):
        if prediction is not None and prediction != fn.prediction:
            raise ValueError(f"The model function is bound to prediction {fn.prediction!r}; got prediction="
                             f"{prediction!r} as well: drop the argument.")
        return fn.prediction
    prediction = "eps" if prediction is None else prediction
    _check_prediction(prediction)
    return prediction


# ------------------------------------------------------------------ eps / x0 / v conversions
def pred_to_x0_eps(prediction: str, pred: jax.Array, x_t: jax.Array, alpha, sigma):
    """Turn a model output into ``(x0, eps)``.

    Args:
      prediction: what ``pred`` is: ``"eps"``, ``"x0"`` or ``"v"``.
      pred, x_t: arrays of one shape.
      alpha, sigma: ``sqrt(alpha_bar)`` and ``sqrt(1 - alpha_bar)``, broadcastable to ``x_t``.
    """
    _check_prediction(prediction)
    if prediction == "eps":
        eps = pred
        x0 = (x_t - sigma * eps) / alpha
    elif prediction == "x0":
        x0 = pred
        eps = (x_t - alpha * x0) / sigma
    else:  # v = alpha eps - sigma x0, with alpha^2 + sigma^2 = 1
        x0 = alpha * x_t - sigma * pred
        eps = sigma * x_t + alpha * pred
    return x0, eps


def x0_eps_to_pred(prediction: str, x0: jax.Array, eps: jax.Array, alpha, sigma) -> jax.Array:
    """The inverse of :func:`pred_to_x0_eps`: the target a model of type ``prediction`` learns."""
    _check_prediction(prediction)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    return alpha * eps - sigma * x0


# ------------------------------------------------------------------ indexing helpers
def _check_t(schedule: Schedule, t, x: jax.Array) -> jax.Array:
    """Validate timesteps ``t`` (int ``[]`` or ``[B]``) against ``x`` ``[B, ...]``."""
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise TypeError(
            f"t must hold integer timestep indices in [0, {schedule.num_timesteps}), got dtype {t.dtype}. "
            "Cast with t.astype(jnp.int32) (samplers pass float timesteps to the model, not here)."
        )
    if t.ndim > 1 or (t.ndim == 1 and (x.ndim == 0 or t.shape[0] != x.shape[0])):
        raise ValueError(
            f"t must be a scalar or have shape [B] matching x's leading axis; got t {t.shape}, x {x.shape}."
        )
    if not isinstance(t, jax.core.Tracer):  # concrete: check the range now (under jit, indices clamp)
        tn = np.asarray(t)
        if tn.size and (tn.min() < 0 or tn.max() >= schedule.num_timesteps):
            raise ValueError(
                f"t out of range: got values in [{tn.min()}, {tn.max()}], need 0 <= t < {schedule.num_timesteps}."
            )
    return t


def extract(arr: jax.Array, t: jax.Array, x: jax.Array) -> jax.Array:
    """``arr[t]`` reshaped to broadcast against ``x``: ``[B, 1, ..., 1]`` (or a scalar for scalar t)."""
    t = jnp.asarray(t)  # p_mean_variance's fixed_large path passes the caller's t (maybe a Python int)
    out = arr[t]
    if t.ndim == 0:
        return out
    return out.reshape(t.shape + (1,) * (x.ndim - 1))


def _same_shape(**arrays) -> None:
    shapes = {k: jnp.shape(v) for k, v in arrays.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"Shape mismatch: {shapes}; these arrays must have one shape.")


# ------------------------------------------------------------------ forward process and posterior
def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Sample ``q(x_t | x_0)``: ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``.

    Args:
      x0, noise: ``[B, ...]`` float (same shape).
      t: int ``[B]`` (per-example) or a scalar.
    """
    _same_shape(x0=x0, noise=noise)
    t = _check_t(schedule, t, x0)
    return extract(schedule.sqrt_alphas_cumprod, t, x0) * x0 + extract(
        schedule.sqrt_one_minus_alphas_cumprod, t, x0
    ) * noise


def q_mean_variance(schedule: Schedule, x0: jax.Array, t: jax.Array):
    """Mean, variance and log-variance of ``q(x_t | x_0)`` (variance broadcast as ``[B, 1, ...]``)."""
    t = _check_t(schedule, t, x0)
    mean = extract(schedule.sqrt_alphas_cumprod, t, x0) * x0
    var = extract(jnp.square(schedule.sqrt_one_minus_alphas_cumprod), t, x0)  # float32 1 - ab cancels near t=0
    log_var = extract(schedule.log_one_minus_alphas_cumprod, t, x0)
    return mean, var, log_var


def q_posterior(schedule: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array):
    """``q(x_{t-1} | x_t, x_0)`` (Ho et al. eq. 6-7).

    Returns:
      ``(mean, variance, log_variance_clipped)``; mean is ``x0``'s shape, the variances broadcast as
      ``[B, 1, ...]``. At ``t = 0`` the variance is 0 and its log is clipped to the ``t = 1`` value.
    """
    _same_shape(x0=x0, x_t=x_t)
    t = _check_t(schedule, t, x_t)
    mean = extract(schedule.posterior_mean_coef1, t, x_t) * x0 + extract(schedule.posterior_mean_coef2, t, x_t) * x_t
    return (
        mean,
        extract(schedule.posterior_variance, t, x_t),
        extract(schedule.posterior_log_variance_clipped, t, x_t),
    )


def alpha_sigma(schedule: Schedule, t: jax.Array, x: jax.Array):
    """``(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t))`` broadcast against ``x``."""
    t = _check_t(schedule, t, x)
    return extract(schedule.sqrt_alphas_cumprod, t, x), extract(schedule.sqrt_one_minus_alphas_cumprod, t, x)


def predict_x0_eps(schedule: Schedule, pred: jax.Array, x_t: jax.Array, t: jax.Array, prediction: str = "eps"):
    """``(x0, eps)`` implied by a model output ``pred`` at integer timesteps ``t``."""
    _same_shape(pred=pred, x_t=x_t)
    alpha, sigma = alpha_sigma(schedule, t, x_t)
    return pred_to_x0_eps(prediction, pred, x_t, alpha, sigma)


VARIANCES = ("fixed_small", "fixed_large")


def p_mean_variance(
    schedule: Schedule,
    pred: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: float | None = None,
) -> dict:
    """The reverse step ``p(x_{t-1} | x_t)`` from a model prediction.

    The mean is the posterior mean at the predicted ``x0`` (optionally clipped to
    ``[-clip_x0, clip_x0]``). ``variance="fixed_small"`` uses the posterior variance
    (beta-tilde), ``"fixed_large"`` uses beta_t (with beta-tilde_1 at t = 0, as improved-DDPM).

    Returns:
      dict with ``mean``, ``variance``, ``log_variance`` (broadcast ``[B, 1, ...]``), ``x0``, ``eps``.
    """
    if variance not in VARIANCES:
        raise ValueError(f"Unknown variance {variance!r}; choose one of {VARIANCES}.")
    x0, eps = predict_x0_eps(schedule, pred, x_t, t, prediction)
    if clip_x0 is not None:
        x0 = jnp.clip(x0, -clip_x0, clip_x0)
    mean, post_var, post_log_var = q_posterior(schedule, x0, x_t, t)
    if variance == "fixed_small":
        var, log_var = post_var, post_log_var
    else:
        large = jnp.concatenate([schedule.posterior_variance[1:2], schedule.betas[1:]])
        var, log_var = extract(large, t, x_t), extract(jnp.log(large), t, x_t)
    return {"mean": mean, "variance": var, "log_variance": log_var, "x0": x0, "eps": eps}


def p_sample_step(
    schedule: Schedule,
    pred: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: float | None = None,
) -> jax.Array:
    """One ancestral step ``x_{t-1} = mean + exp(0.5 log_var) * noise`` (no noise at ``t = 0``)."""
    _same_shape(x_t=x_t, noise=noise)
    out = p_mean_variance(schedule, pred, x_t, t, prediction=prediction, variance=variance, clip_x0=clip_x0)
    nonzero = (jnp.asarray(t) > 0).astype(x_t.dtype)
    if nonzero.ndim:
        nonzero = nonzero.reshape(nonzero.shape + (1,) * (x_t.ndim - 1))
    return out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise


# ------------------------------------------------------------------ training loss
ApplyFn = Callable[[Any, jax.Array, jax.Array, Mapping[str, jax.Array], jax.Array], jax.Array]


def loss_weight(schedule: Schedule, t: jax.Array, prediction: str, min_snr_gamma: float | None) -> jax.Array:
    """Per-example weight of the MSE in ``prediction`` space; 1 without min-SNR.

    With min-SNR-gamma (Hang et al. 2023) the effective weight on the x0 error is
    ``min(SNR, gamma)``; in eps space that is ``min(SNR, gamma) / SNR``, in v space
    ``min(SNR, gamma) / (SNR + 1)``.
    """
    _check_prediction(prediction)
    if min_snr_gamma is None:
        return jnp.ones(jnp.shape(t), jnp.float32)
    snr = schedule.alphas_cumprod[t] / jnp.square(schedule.sqrt_one_minus_alphas_cumprod[t])  # no 1 - ab cancellation
    clipped = jnp.minimum(snr, min_snr_gamma)
    # min(snr, gamma) / snr written as min(1, gamma / snr): equal for snr > 0, and 1 (not 0/0) at zero terminal SNR
    return {"eps": jnp.minimum(1.0, min_snr_gamma / snr), "x0": clipped, "v": clipped / (snr + 1.0)}[prediction]


def diffusion_loss(
    apply_fn: ApplyFn,
    params: Any,
    batch: Mapping[str, jax.Array],
    key: jax.Array,
    *,
    schedule: Schedule,
    prediction: str | None = None,
    min_snr_gamma: float | None = None,
):
    """The simple DDPM loss ``E_{t, eps} w(t) ||f(x_t, t) - target||^2`` (mean over pixels).

    Args:
      apply_fn: ``apply_fn(params, x_t, t, batch, key) -> prediction`` with ``t`` float32 ``[B]``
        on the training scale ``0..T-1``; ``batch`` carries conditioning (e.g. ``label``) and
        ``key`` is for dropout etc.
      params: the model parameters (what ``jax.grad`` differentiates).
      batch: ``{"image": [B, H, W, C] float32 in [-1, 1], ...}``.
      key: PRNG key; ``t`` and ``eps`` are drawn from it.
      prediction: the model's target: ``"eps"``, ``"x0"`` or ``"v"`` (None: ``apply_fn``'s own when it
        is a :class:`Denoiser`, else ``"eps"``).
      min_snr_gamma: optional min-SNR-gamma weighting (5.0 is the paper's choice).

    Returns:
      ``(loss, aux)``: scalar float32 loss and a dict of per-batch metrics (``mse``).
    """
    prediction = resolve_prediction(apply_fn, prediction)
    x0 = batch["image"]
    chex.assert_rank(x0, {2, 3, 4, 5})
    B = x0.shape[0]
    t_key, eps_key, model_key = jax.random.split(key, 3)
    t = jax.random.randint(t_key, (B,), 0, schedule.num_timesteps)
    eps = jax.random.normal(eps_key, x0.shape, jnp.float32)
    x0 = x0.astype(jnp.float32)
    alpha, sigma = alpha_sigma(schedule, t, x0)
    x_t = alpha * x0 + sigma * eps
    pred = apply_fn(params, x_t, t.astype(jnp.float32), batch, model_key).astype(jnp.float32)
    chex.assert_equal_shape([pred, x0])
    target = x0_eps_to_pred(prediction, x0, eps, alpha, sigma)
    mse = jnp.mean(jnp.square(pred - target), axis=tuple(range(1, x0.ndim)))
    loss = jnp.mean(loss_weight(schedule, t, prediction, min_snr_gamma) * mse)
    return loss, {"mse": jnp.mean(mse)}


# ------------------------------------------------------------------ variational bound (bits/dim)
def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise (nats)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: jax.Array, mean: jax.Array, log_scale: jax.Array) -> jax.Array:
    """Log-probability (nats, elementwise) of data ``x`` in [-1, 1] quantised to 256 bins.

    The bin of ``x`` is ``[x - 1/255, x + 1/255]``; the edge bins extend to -inf / +inf (Ho et al.
    eq. 13). Uses the exact normal CDF (``log_ndtr``), not improved-DDPM's tanh approximation.
    """
    centered = x - mean
    inv_std = jnp.exp(-log_scale)
    upper = inv_std * (centered + 1.0 / 255.0)
    lower = inv_std * (centered - 1.0 / 255.0)
    log_cdf_upper = jax.scipy.special.log_ndtr(upper)
    log_sf_lower = jax.scipy.special.log_ndtr(-lower)
    # log(Phi(upper) - Phi(lower)) computed stably on whichever side of the mean the bin lies.
    mid = jnp.where(
        lower > 0,
        log_sf_lower + jnp.log1p(-jnp.exp(jax.scipy.special.log_ndtr(-upper) - log_sf_lower)),
        log_cdf_upper + jnp.log1p(-jnp.exp(jax.scipy.special.log_ndtr(lower) - log_cdf_upper)),
    )
    return jnp.where(x < -0.999, log_cdf_upper, jnp.where(x > 0.999, log_sf_lower, mid))


def _mean_flat(x):
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def prior_bpd(schedule: Schedule, x0: jax.Array) -> jax.Array:
    """KL(q(x_T | x_0) || N(0, I)) in bits/dim, ``[B]``."""
    t = jnp.full((x0.shape[0],), schedule.num_timesteps - 1, jnp.int32)
    mean, _, log_var = q_mean_variance(schedule, x0, t)
    return _mean_flat(normal_kl(mean, log_var, 0.0, 0.0) * jnp.ones_like(x0)) / np.log(2.0)


def vb_term_bpd(
    schedule: Schedule,
    pred: jax.Array,
    x0: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: float | None = None,
) -> jax.Array:
    """One term of the bound in bits/dim, ``[B]``: ``L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))``
    for ``t >= 1`` and the decoder NLL ``-log p(x_0 | x_1)`` for ``t = 0`` (improved-DDPM's
    ``_vb_terms_bpd``)."""
    t = _check_t(schedule, t, x_t)
    true_mean, _, true_log_var = q_posterior(schedule, x0, x_t, t)
    p = p_mean_variance(schedule, pred, x_t, t, prediction=prediction, variance=variance, clip_x0=clip_x0)
    kl = _mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / np.log(2.0)
    nll = -_mean_flat(
        discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"] * jnp.ones_like(x0))
    ) / np.log(2.0)
    return jnp.where(t == 0, nll, kl)


def calc_bpd(
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    schedule: Schedule,
    x0: jax.Array,
    key: jax.Array,
    *,
    prediction: str | None = None,
    variance: str = "fixed_small",
    clip_x0: float | None = None,
) -> dict:
    """The full variational bound on ``-log p(x_0)`` in bits/dim (Ho et al. eq. 5), one ``lax.scan``.

    Args:
      model_fn: ``model_fn(x_t, t) -> prediction`` with ``t`` float32 ``[B]`` (a :class:`Denoiser`
        carries its ``prediction``; otherwise pass ``prediction``, default ``"eps"``).
      x0: ``[B, ...]`` data in [-1, 1] on the 256-level grid (``(k / 255) * 2 - 1``).
      key: PRNG key for the per-timestep noise.

    Returns:
      dict with ``total_bpd`` ``[B]``, ``prior_bpd`` ``[B]``, ``terms_bpd`` ``[B, T]`` and the
      per-timestep ``x0_mse`` / ``eps_mse`` ``[B, T]``.
    """
    prediction = resolve_prediction(model_fn, prediction)
    B = x0.shape[0]
    T = schedule.num_timesteps
    x0 = x0.astype(jnp.float32)

    def body(_, inp):
        t_scalar, k = inp
        t = jnp.full((B,), t_scalar, jnp.int32)
        eps = jax.random.normal(k, x0.shape, jnp.float32)
        x_t = q_sample(schedule, x0, t, eps)
        pred = model_fn(x_t, t.astype(jnp.float32)).astype(jnp.float32)
        term = vb_term_bpd(schedule, pred, x0, x_t, t, prediction=prediction, variance=variance, clip_x0=clip_x0)
        x0_hat, eps_hat = predict_x0_eps(schedule, pred, x_t, t, prediction)
        return None, (term, _mean_flat(jnp.square(x0_hat - x0)), _mean_flat(jnp.square(eps_hat - eps)))

    ts = jnp.arange(T, dtype=jnp.int32)
    _, (terms, x0_mse, eps_mse) = jax.lax.scan(body, None, (ts, jax.random.split(key, T)))
    prior = prior_bpd(schedule, x0)
    terms = terms.T
    return {
        "total_bpd": jnp.sum(terms, axis=1) + prior,
        "prior_bpd": prior,
        "terms_bpd": terms,
        "x0_mse": x0_mse.T,
        "eps_mse": eps_mse.T,
    }
