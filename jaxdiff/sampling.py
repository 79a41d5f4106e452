"""Samplers: DDPM, DDIM, DPM-Solver++(2M), Euler, Heun and Euler ancestral, as pure functions of a ``model_fn``.

A model is known only as ``model_fn(x_t, t, **extra_args) -> prediction`` where ``x_t: [B, ...]``
float32 is the model input, ``t: [B]`` float32 the timestep on the training scale ``0..T-1`` (integer
valued for ddpm/ddim/dpmpp_2m, fractional for euler/heun/euler_ancestral) and the prediction (``"eps"``, ``"x0"``
or ``"v"``) has the shape of ``x_t``. Every sampler starts from standard normal noise ``x_T`` and
scales it as its parameterisation needs::

    x_0 = sample(model_fn, schedule, x_T, method="dpmpp_2m", num_steps=25,
                 extra_args={"params": params, "labels": y})

Compilation: the whole loop is one ``jax.lax.scan`` inside one ``jax.jit``. Per-step constants
(timesteps, alphas, sigmas, solver coefficients) are computed on the host in float64 NumPy and
enter the jitted loop as float32 arrays, so changing them (eta, spacing, Karras or not) does not
retrace as long as ``num_steps`` stays the same. ``model_fn`` is a static argument (hashed by
identity: define it once, do not rebuild a lambda per call); everything array-valued that changes
between calls -- params, labels, the guidance scale -- goes in ``extra_args``, a pytree passed
through ``jit`` as traced arguments and on to ``model_fn`` as keyword arguments. New noise, keys
or ``extra_args`` values therefore reuse the compiled loop. ``schedule`` must be concrete (it is
read on the host), so call ``sample`` outside of your own ``jit``.

Sampler arithmetic is float32 whatever the network computes in: the model output is cast to
float32 before use.

Two sigmas (see :mod:`jaxdiff.schedules`): ``sigma`` is the VP noise level ``sqrt(1 - alpha_bar)``
of ``x_t = alpha x_0 + sigma eps`` (DDPM, DDIM, DPM-Solver++ and :mod:`jaxdiff.diffusion`);
``ve_sigma`` is the VE one, ``sigma / alpha = sqrt((1 - alpha_bar) / alpha_bar)`` of
``x_t / alpha = x_0 + ve_sigma eps``, the state variable of Euler, Heun and Euler ancestral and
what Karras sigmas and diffusers' ``scheduler.sigmas`` are. Every sampler takes its timesteps
(and VE sigmas) from :func:`jaxdiff.schedules.sampling_grid`.

Conventions follow diffusers' schedulers (``DDPMScheduler``, ``DDIMScheduler``,
``DPMSolverMultistepScheduler``, ``EulerDiscreteScheduler``, ``HeunDiscreteScheduler``,
``EulerAncestralDiscreteScheduler``) with the
same default timestep spacing per method; where we deviate on purpose it is said in the sampler's
docstring (DDIM always steps to the next timestep of the grid; the Euler family always starts at
``sqrt(ve_sigma_max^2 + 1)``; DDPM/DDIM recompute eps from a clipped x0; no noise at the last step).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import xla
from jaxdiff.diffusion import Denoiser, pred_to_x0_eps, resolve_prediction
from jaxdiff.schedules import TIMESTEP_SPACINGS, Schedule, sampling_grid

METHODS = ("ddpm", "ddim", "dpmpp_2m", "euler", "heun", "euler_ancestral", "pndm")
VARIANCES = ("fixed_small", "fixed_large")
# diffusers' default `timestep_spacing` of each scheduler.
DEFAULT_SPACING = {
    "ddpm": "leading", "ddim": "leading", "dpmpp_2m": "linspace", "euler": "linspace", "heun": "linspace",
    "euler_ancestral": "linspace", "pndm": "leading",
}
KARRAS_METHODS = ("dpmpp_2m", "euler", "heun")

ModelFn = Callable[..., jax.Array]


# ----------------------------------------------------------------------------- x0 post-processing
def dynamic_threshold(x0: jax.Array, p: float, s_max: float = math.inf) -> jax.Array:
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3) of ``x0: [B, ...]``.

    Per sample, ``s`` = the ``p``-quantile of ``|x0|`` clamped to ``[1, s_max]``; ``x0`` is clipped to
    ``[-s, s]`` and divided by ``s``. ``s_max`` is diffusers' ``sample_max_value`` (Imagen: inf).
    """
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.clip(jnp.quantile(flat, p, axis=1), 1.0, s_max)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.clip(x0, -s, s) / s


@dataclasses.dataclass(frozen=True)
class _Denoise:
    """Static (hashable) options that turn a model output into ``(x0, eps)``."""

    prediction: str
    clip_x0: float | None = None
    threshold: tuple[float, float] | None = None  # (p, s_max)

    def __call__(self, pred, x_t, alpha, sigma):
        """``(x0, eps)`` from a prediction at ``x_t = alpha x0 + sigma eps`` (VP parameterisation)."""
        x0, eps = pred_to_x0_eps(self.prediction, pred, x_t, alpha, sigma)
        if self.threshold is not None:
            x0 = dynamic_threshold(x0, *self.threshold)
        elif self.clip_x0 is not None:
            x0 = jnp.clip(x0, -self.clip_x0, self.clip_x0)
        else:
            return x0, eps
        return x0, (x_t - alpha * x0) / sigma  # the eps consistent with the processed x0


# ----------------------------------------------------------------------------- per-step updates
# Each step is ``step(model, denoise, carry, c, key) -> carry`` with ``carry = (x, x0_prev)`` and
# ``c`` a dict of float32 scalars (this step's constants). ``model(x_in, t) -> float32 prediction``.
def _ddpm_step(model, denoise, carry, c, key):
    """Ancestral step: x_prev ~ q(x_prev | x_t, x0) = N(c_x0 x0 + c_xt x_t, std^2)."""
    x, _ = carry
    x0, _ = denoise(model(x, c["t"]), x, c["alpha"], c["sigma"])
    mean = c["c_x0"] * x0 + c["c_xt"] * x
    return mean + c["std"] * jax.random.normal(key, x.shape, jnp.float32), None


def _ddim_step(model, denoise, carry, c, key):
    """Song et al. (2021), eq. 12: x_prev = alpha_prev x0 + sqrt(1 - alpha_bar_prev - s^2) eps + s z."""
    x, _ = carry
    x0, eps = denoise(model(x, c["t"]), x, c["alpha"], c["sigma"])
    x = c["alpha_prev"] * x0 + c["c_eps"] * eps
    if key is not None:
        x = x + c["sigma_eta"] * jax.random.normal(key, x.shape, jnp.float32)
    return x, None


def _dpmpp_2m_step(model, denoise, carry, c, key):
    """DPM-Solver++(2M), Lu et al. (2022), Algorithm 2 (data prediction, multistep, midpoint).

    With lambda = log(alpha / sigma), h = lambda_next - lambda and r = h_prev / h:
    ``x_next = (sigma_next / sigma) x - alpha_next (e^{-h} - 1) D``, ``D = x0 + (x0 - x0_prev) / (2 r)``
    (``D = x0``, first order, at the first and the last step).
    """
    x, x0_prev = carry
    x0, _ = denoise(model(x, c["t"]), x, c["alpha"], c["sigma"])
    D = x0 + c["second_order"] * (x0 - x0_prev) / (2.0 * c["r"])
    x = (c["sigma_next"] / c["sigma"]) * x - c["alpha_next"] * jnp.expm1(-c["h"]) * D
    return x, x0


def _ve_denoiser(model, denoise, x, ve_sigma, t):
    """Karras' D(x; ve_sigma) for a VP-trained model: call it on x / sqrt(ve_sigma^2 + 1)."""
    c_in = 1.0 / jnp.sqrt(ve_sigma**2 + 1.0)  # = alpha of the VP process at this noise level
    x_in = x * c_in  # = alpha x0 + (ve_sigma c_in) eps, and ve_sigma c_in is the VP sigma
    x0, _ = denoise(model(x_in, t), x_in, c_in, ve_sigma * c_in)
    return x0


def _euler_step(model, denoise, carry, c, key):
    """Karras et al. (2022), Algorithm 1 without churn: x_next = x + (ve_sigma_next - ve_sigma) d."""
    x, _ = carry
    d = (x - _ve_denoiser(model, denoise, x, c["ve_sigma"], c["t"])) / c["ve_sigma"]
    return x + (c["ve_sigma_next"] - c["ve_sigma"]) * d, None


def _heun_step(model, denoise, carry, c, key):
    """Karras et al. (2022), Algorithm 1 (deterministic): Euler, then the trapezoidal correction
    unless ve_sigma_next = 0 (the last step is plain Euler: 2N - 1 model calls in all)."""
    x, _ = carry
    ve_sigma, ve_sigma_next = c["ve_sigma"], c["ve_sigma_next"]
    d = (x - _ve_denoiser(model, denoise, x, ve_sigma, c["t"])) / ve_sigma
    x_euler = x + (ve_sigma_next - ve_sigma) * d

    def correct():
        d_next = (x_euler - _ve_denoiser(model, denoise, x_euler, ve_sigma_next, c["t_next"])) / ve_sigma_next
        return x + (ve_sigma_next - ve_sigma) * 0.5 * (d + d_next)

    return jax.lax.cond(ve_sigma_next > 0, correct, lambda: x_euler), None


def _euler_ancestral_step(model, denoise, carry, c, key):
    """Euler to ve_sigma_down, then fresh noise of std ve_sigma_up (k-diffusion's
    ``sample_euler_ancestral``, eta 1; diffusers' ``EulerAncestralDiscreteScheduler``):
    ve_sigma_down^2 + ve_sigma_up^2 = ve_sigma_next^2."""
    x, _ = carry
    d = (x - _ve_denoiser(model, denoise, x, c["ve_sigma"], c["t"])) / c["ve_sigma"]
    x = x + (c["ve_sigma_down"] - c["ve_sigma"]) * d
    return x + c["ve_sigma_up"] * jax.random.normal(key, x.shape, jnp.float32), None


def _pndm_step(model, denoise, carry, c, key):
    """One PLMS step (diffusers' ``PNDMScheduler`` with ``skip_prk_steps``, the Stable Diffusion 1.x
    default): a linear multistep combination of this and up to three earlier eps predictions
    (weights ``w0..w3``: Adams-Bashforth of order 1-4, and one averaging step that restarts from the
    first sample), then PNDM's transfer ``x_prev = a x - b eps``. Memory: the last three eps and the
    first sample."""
    x, (h1, h2, h3, first) = carry
    e = model(x, c["t"])
    comb = c["w0"] * e + c["w1"] * h1 + c["w2"] * h2 + c["w3"] * h3
    sample = jnp.where(c["use_first"] > 0, first, x)
    if denoise.prediction == "v":  # as diffusers: v -> eps after combining, at the step's own alpha
        comb = c["sqrt_ab"] * comb + c["sqrt_1m_ab"] * sample
    x_prev = c["sample_coeff"] * sample - c["eps_coeff"] * comb
    push = c["push"] > 0
    memory = (jnp.where(push, e, h1), jnp.where(push, h1, h2), jnp.where(push, h2, h3),
              jnp.where(c["save_first"] > 0, x, first))
    return x_prev, memory


# ----------------------------------------------------------------------------- the jitted loop
@functools.partial(xla.jit, static_argnames=("step", "model_fn", "denoise", "return_trajectory"))
def _run(x_T, init_scale, consts, keys, extra_args, *, step, model_fn, denoise, return_trajectory):
    x = x_T.astype(jnp.float32) * init_scale
    batch = x.shape[0]

    def model(x_in, t):
        pred = model_fn(x_in, jnp.full((batch,), t, jnp.float32), **extra_args)
        chex.assert_shape(pred, x_in.shape)
        return pred.astype(jnp.float32)  # sampler arithmetic stays float32 for bf16 models

    def body(carry, xs):
        c, key = xs
        carry = step(model, denoise, carry, c, key)
        return carry, (carry[0] if return_trajectory else None)

    if step is _dpmpp_2m_step:  # the multistep solvers carry memory across steps
        memory = jnp.zeros_like(x)
    elif step is _pndm_step:
        memory = (jnp.zeros_like(x),) * 4
    else:
        memory = None
    (x, _), trajectory = jax.lax.scan(body, (x, memory), (consts, keys))
    return (x, trajectory) if return_trajectory else x


def _loop(step, model_fn, x_T, consts, *, init_scale=1.0, key=None, prediction="eps", clip_x0=None,
          dynamic_threshold=None, extra_args=None, return_trajectory=False):
    """Cast host constants to float32, derive per-step keys and run the jitted scan."""
    try:
        hash(model_fn)
    except TypeError as e:
        raise TypeError(
            "model_fn must be hashable (it is a static jit argument): define it once as a function and "
            "pass arrays such as params and labels through extra_args."
        ) from e
    if clip_x0 is not None and dynamic_threshold is not None:
        raise ValueError("Pass at most one of clip_x0 and dynamic_threshold.")
    if clip_x0 is not None and not clip_x0 > 0:
        raise ValueError(f"clip_x0 must be > 0, got {clip_x0}.")
    threshold = None
    if dynamic_threshold is not None:
        p, s_max = (dynamic_threshold, math.inf) if np.isscalar(dynamic_threshold) else dynamic_threshold
        if not (0.0 < p <= 1.0 and s_max >= 1.0):
            raise ValueError(f"dynamic_threshold must be p in (0, 1] or (p, s_max >= 1), got {dynamic_threshold}.")
        threshold = (float(p), float(s_max))
    denoise = _Denoise(prediction, None if clip_x0 is None else float(clip_x0), threshold)
    num_steps = len(consts["t"])
    keys = None if key is None else jax.random.split(key, num_steps)
    consts = {k: jnp.asarray(v, jnp.float32) for k, v in consts.items()}
    return _run(x_T, jnp.float32(init_scale), consts, keys, dict(extra_args or {}), step=step,
                model_fn=model_fn, denoise=denoise, return_trajectory=return_trajectory)


# ----------------------------------------------------------------------------- validation
def _check(schedule: Schedule, x_T, num_steps, prediction, spacing, method) -> tuple[np.ndarray, int]:
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"Unknown timestep_spacing {spacing!r}; choose one of {TIMESTEP_SPACINGS}.")
    if not hasattr(x_T, "dtype") or not jnp.issubdtype(x_T.dtype, jnp.floating):
        got = getattr(x_T, "dtype", type(x_T))
        raise TypeError(f"x_T must be a floating-point array of standard normal noise, got {got}.")
    chex.assert_rank(x_T, {2, 3, 4, 5})
    T = schedule.num_timesteps
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be an integer in [1, T={T}] for {method}, got {num_steps!r}.")
    return np.asarray(schedule.alphas_cumprod, dtype=np.float64), T


def _need_key(key, method):
    if key is None:
        raise ValueError(f"{method} is stochastic: pass key=jax.random.key(seed) (same key, same images).")


# ----------------------------------------------------------------------------- samplers
def sample_ddpm(model_fn: ModelFn, schedule: Schedule, x_T: jax.Array, *, num_steps: int, key: jax.Array,
                prediction: str | None = None, timestep_spacing: str = "leading", steps_offset: int = 0,
                variance: str = "fixed_small", clip_x0: float | None = None, dynamic_threshold=None,
                extra_args: Mapping[str, Any] | None = None, return_trajectory: bool = False):
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) on the timestep grid of ``num_steps``.

    With ``num_steps < T`` the chain is respaced as in diffusers' ``DDPMScheduler``: between grid
    timesteps t > s, ``beta = 1 - alpha_bar_t / alpha_bar_s`` and
    ``x_s ~ N(c_x0 x0 + c_xt x_t, var)`` with ``c_x0 = sqrt(alpha_bar_s) beta / (1 - alpha_bar_t)``,
    ``c_xt = sqrt(1 - beta) (1 - alpha_bar_s) / (1 - alpha_bar_t)`` and
    ``var = beta (1 - alpha_bar_s) / (1 - alpha_bar_t)`` (``"fixed_small"``) or ``beta`` (``"fixed_large"``).
    The last step adds no noise (diffusers adds some when the grid's last timestep is > 0, e.g.
    ``"trailing"``). Step ``i`` draws ``jax.random.normal(jax.random.split(key, num_steps)[i], x.shape)``.

    Args:
      model_fn: ``model_fn(x_t, t, **extra_args) -> prediction``.
      x_T: ``[B, ...]`` standard normal noise. Returns x_0 ``[B, ...]`` float32 (and the trajectory
        ``[num_steps, B, ...]`` of x after each step when ``return_trajectory``).
    """
    prediction = resolve_prediction(model_fn, prediction)
    ab, _ = _check(schedule, x_T, num_steps, prediction, timestep_spacing, "ddpm")
    _need_key(key, "ddpm")
    if variance not in VARIANCES:
        raise ValueError(f"Unknown variance {variance!r}; choose one of {VARIANCES}.")
    t = sampling_grid(ab, num_steps, timestep_spacing, steps_offset=steps_offset, integer=True)[0].astype(np.int64)
    alpha_bar = ab[t]
    alpha_bar_prev = np.append(ab[t[1:]], 1.0)  # the step after the last lands on clean data
    beta = 1.0 - alpha_bar / alpha_bar_prev
    var = beta if variance == "fixed_large" else np.maximum(beta * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar), 1e-20)
    std = np.sqrt(var)
    std[-1] = 0.0
    consts = dict(
        t=t, alpha=np.sqrt(alpha_bar), sigma=np.sqrt(1.0 - alpha_bar), std=std,
        c_x0=np.sqrt(alpha_bar_prev) * beta / (1.0 - alpha_bar),
        c_xt=np.sqrt(1.0 - beta) * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar),
    )
    return _loop(_ddpm_step, model_fn, x_T, consts, key=key, prediction=prediction, clip_x0=clip_x0,
                 dynamic_threshold=dynamic_threshold, extra_args=extra_args, return_trajectory=return_trajectory)


def sample_ddim(model_fn: ModelFn, schedule: Schedule, x_T: jax.Array, *, num_steps: int, key=None,
                eta: float = 0.0, prediction: str | None = None, timestep_spacing: str = "leading", steps_offset: int = 0,
                clip_x0: float | None = None, dynamic_threshold=None,
                extra_args: Mapping[str, Any] | None = None, return_trajectory: bool = False,
                final_alpha_cumprod: float | None = None):
    """DDIM (Song et al. 2021, eq. 12 and 16); ``eta = 0`` is deterministic, ``eta = 1`` is DDPM-like.

    ``sigma_eta = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) (1 - alpha_bar / alpha_bar_prev))``.
    The previous timestep is the next one on the grid and clean data (alpha_bar = 1, diffusers'
    ``set_alpha_to_one=True``) after the last; diffusers uses ``t - T // num_steps``, which is the
    same for ``"leading"`` and for ``"trailing"`` when num_steps divides T, but not for ``"linspace"``.
    When x0 is clipped or thresholded, eps is recomputed from it (diffusers'
    ``use_clipped_model_output=True``). ``key`` is required when ``eta > 0``.
    ``final_alpha_cumprod``: the alpha_bar the last step goes to; None = 1 (clean data). Stable
    Diffusion's scheduler configs say ``set_alpha_to_one=False``: pass ``alphas_cumprod[0]``.
    """
    prediction = resolve_prediction(model_fn, prediction)
    ab, _ = _check(schedule, x_T, num_steps, prediction, timestep_spacing, "ddim")
    final = 1.0 if final_alpha_cumprod is None else float(final_alpha_cumprod)
    if not 0.0 < final <= 1.0:
        raise ValueError(f"final_alpha_cumprod must be in (0, 1], got {final_alpha_cumprod}.")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}.")
    if eta > 0:
        _need_key(key, "ddim with eta > 0")
    t = sampling_grid(ab, num_steps, timestep_spacing, steps_offset=steps_offset, integer=True)[0].astype(np.int64)
    alpha_bar = ab[t]
    alpha_bar_prev = np.append(ab[t[1:]], final)
    sigma_eta = eta * np.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * (1.0 - alpha_bar / alpha_bar_prev))
    consts = dict(
        t=t, alpha=np.sqrt(alpha_bar), sigma=np.sqrt(1.0 - alpha_bar), alpha_prev=np.sqrt(alpha_bar_prev),
        c_eps=np.sqrt(np.maximum(1.0 - alpha_bar_prev - sigma_eta**2, 0.0)), sigma_eta=sigma_eta,
    )
    return _loop(_ddim_step, model_fn, x_T, consts, key=key if eta > 0 else None, prediction=prediction,
                 clip_x0=clip_x0, dynamic_threshold=dynamic_threshold, extra_args=extra_args,
                 return_trajectory=return_trajectory)


def sample_dpmpp_2m(model_fn: ModelFn, schedule: Schedule, x_T: jax.Array, *, num_steps: int,
                    prediction: str | None = None, timestep_spacing: str = "linspace", steps_offset: int = 0,
                    use_karras_sigmas: bool = False, clip_x0: float | None = None, dynamic_threshold=None,
                    extra_args: Mapping[str, Any] | None = None, return_trajectory: bool = False, key=None):
    """DPM-Solver++(2M) as diffusers' ``DPMSolverMultistepScheduler`` (dpmsolver++, order 2, midpoint).

    The grid has ``num_steps`` integer timesteps (``"linspace"``/``"leading"`` take N + 1 points and
    drop the final 0) and ends at sigma = 0 (``final_sigmas_type="zero"``), so the first and the
    last step are first order (``lower_order_final``). With ``use_karras_sigmas`` the VE sigmas span
    the whole training range (spacing is ignored; ``sampling_grid(..., karras="training")``) and the
    model is called at the rounded timesteps.
    """
    prediction = resolve_prediction(model_fn, prediction)
    ab, _ = _check(schedule, x_T, num_steps, prediction, timestep_spacing, "dpmpp_2m")
    # N integer timesteps; VE sigmas (ending with 0, clean data) from the table or Karras' levels
    t, ve_sigma = sampling_grid(ab, num_steps, timestep_spacing, steps_offset=steps_offset, integer=True,
                                drop_last=True, karras="training" if use_karras_sigmas else None)
    alpha = 1.0 / np.sqrt(ve_sigma**2 + 1.0)
    sigma = ve_sigma * alpha  # VP
    with np.errstate(divide="ignore"):
        h = np.log(ve_sigma[:-1] / ve_sigma[1:])  # lambda_next - lambda, lambda = log(alpha / sigma) = -log(ve_sigma)
    r = np.ones(num_steps)
    r[1:] = h[:-1] / h[1:]
    second_order = np.zeros(num_steps)
    second_order[1:-1] = 1.0
    r[second_order == 0] = 1.0
    consts = dict(
        t=t, alpha=alpha[:-1], sigma=sigma[:-1], alpha_next=alpha[1:], sigma_next=sigma[1:],
        h=h, r=r, second_order=second_order,
    )
    return _loop(_dpmpp_2m_step, model_fn, x_T, consts, prediction=prediction, clip_x0=clip_x0,
                 dynamic_threshold=dynamic_threshold, extra_args=extra_args, return_trajectory=return_trajectory)


def sample_euler(model_fn: ModelFn, schedule: Schedule, x_T: jax.Array, *, num_steps: int,
                 prediction: str | None = None, timestep_spacing: str = "linspace", steps_offset: int = 0,
                 use_karras_sigmas: bool = False, clip_x0: float | None = None, dynamic_threshold=None,
                 extra_args: Mapping[str, Any] | None = None, return_trajectory: bool = False, key=None):
    """Euler's method on the probability-flow ODE in VE-sigma space (Karras et al. 2022; diffusers'
    ``EulerDiscreteScheduler``). The state is ``x = x0 + ve_sigma n`` (VE); the model sees
    ``x / sqrt(ve_sigma^2 + 1)`` at the float timestep of the grid. ``x_T`` is scaled by
    ``sqrt(ve_sigma_max^2 + 1)`` (diffusers uses ``ve_sigma_max`` for linspace/trailing spacing).
    Grid: ``sampling_grid`` with float timesteps; Karras levels span the spaced grid's own range
    (``karras="grid"``).
    """
    prediction = resolve_prediction(model_fn, prediction)
    ab, _ = _check(schedule, x_T, num_steps, prediction, timestep_spacing, "euler")
    t, ve_sigma = sampling_grid(ab, num_steps, timestep_spacing, steps_offset=steps_offset,
                                karras="grid" if use_karras_sigmas else None)
    consts = dict(t=t, ve_sigma=ve_sigma[:-1], ve_sigma_next=ve_sigma[1:])
    return _loop(_euler_step, model_fn, x_T, consts, init_scale=math.sqrt(ve_sigma[0] ** 2 + 1.0),
                 prediction=prediction,
                 clip_x0=clip_x0, dynamic_threshold=dynamic_threshold, extra_args=extra_args,
                 return_trajectory=return_trajectory)


def sample_heun(model_fn: ModelFn, schedule: Schedule, x_T: jax.Array, *, num_steps: int,
                prediction: str | None = None, timestep_spacing: str = "linspace", steps_offset: int = 0,
                use_karras_sigmas: bool = False, clip_x0: float | None = None, dynamic_threshold=None,
                extra_args: Mapping[str, Any] | None = None, return_trajectory: bool = False, key=None):
    """Heun's second-order method (Karras et al. 2022, Algorithm 1; diffusers'
    ``HeunDiscreteScheduler``): 2 * num_steps - 1 model calls. Grid and scaling as :func:`sample_euler`.
    """
    prediction = resolve_prediction(model_fn, prediction)
    ab, _ = _check(schedule, x_T, num_steps, prediction, timestep_spacing, "heun")
    t, ve_sigma = sampling_grid(ab, num_steps, timestep_spacing, steps_offset=steps_offset,
                                karras="grid" if use_karras_sigmas else None)
    consts = dict(t=t, t_next=np.append(t[1:], 0.0), ve_sigma=ve_sigma[:-1], ve_sigma_next=ve_sigma[1:])
    return _loop(_heun_step, model_fn, x_T, consts, init_scale=math.sqrt(ve_sigma[0] ** 2 + 1.0),
                 prediction=prediction,
                 clip_x0=clip_x0, dynamic_threshold=dynamic_threshold, extra_args=extra_args,
                 return_trajectory=return_trajectory)


def sample_euler_ancestral(model_fn: ModelFn, schedule: Schedule, x_T: jax.Array, *, num_steps: int,
                           key: jax.Array, prediction: str | None = None, timestep_spacing: str = "linspace",
                           steps_offset: int = 0, clip_x0: float | None = None, dynamic_threshold=None,
                           extra_args: Mapping[str, Any] | None = None, return_trajectory: bool = False):
    """Euler ancestral (diffusers' ``EulerAncestralDiscreteScheduler``, k-diffusion's
    ``sample_euler_ancestral`` with eta 1), in VE sigmas: each step goes by Euler from ve_sigma to
    ``ve_sigma_down = sqrt(ve_sigma_next^2 - ve_sigma_up^2)`` and adds noise of std
    ``ve_sigma_up = sqrt(ve_sigma_next^2 (ve_sigma^2 - ve_sigma_next^2) / ve_sigma^2)``, drawn from
    ``split(key, num_steps)[i]`` (the last step, to ve_sigma = 0, adds none). Grid and scaling of
    ``x_T`` as :func:`sample_euler`.
    """
    prediction = resolve_prediction(model_fn, prediction)
    ab, _ = _check(schedule, x_T, num_steps, prediction, timestep_spacing, "euler_ancestral")
    _need_key(key, "euler_ancestral")
    t, ve = sampling_grid(ab, num_steps, timestep_spacing, steps_offset=steps_offset)
    ve_sigma, ve_sigma_next = ve[:-1], ve[1:]
    ve_sigma_up = np.sqrt(ve_sigma_next**2 * (ve_sigma**2 - ve_sigma_next**2) / ve_sigma**2)
    ve_sigma_down = np.sqrt(ve_sigma_next**2 - ve_sigma_up**2)
    consts = dict(t=t, ve_sigma=ve_sigma, ve_sigma_down=ve_sigma_down, ve_sigma_up=ve_sigma_up)
    return _loop(_euler_ancestral_step, model_fn, x_T, consts, init_scale=math.sqrt(ve[0] ** 2 + 1.0), key=key,
                 prediction=prediction, clip_x0=clip_x0, dynamic_threshold=dynamic_threshold,
                 extra_args=extra_args, return_trajectory=return_trajectory)


def sample_pndm(model_fn: ModelFn, schedule: Schedule, x_T: jax.Array, *, num_steps: int,
                prediction: str | None = None, timestep_spacing: str = "leading", steps_offset: int = 0,
                final_alpha_cumprod: float | None = None, extra_args: Mapping[str, Any] | None = None,
                return_trajectory: bool = False, key=None, clip_x0=None, dynamic_threshold=None):
    """PNDM's pseudo linear multistep sampler (Liu et al. 2022) as diffusers' ``PNDMScheduler`` with
    ``skip_prk_steps=True``, the scheduler Stable Diffusion 1.x folders name: the grid of
    ``num_steps`` timesteps with its second point repeated (``num_steps + 1`` model calls), eps
    combined by Adams-Bashforth weights of rising order, ``prev_t = t - T // num_steps`` at every
    spacing, and ``final_alpha_cumprod`` after the last step (None: 1, ``set_alpha_to_one``; Stable
    Diffusion: ``alphas_cumprod[0]``). eps and v predictions (diffusers converts v after combining);
    no x0 clipping.
    """
    prediction = resolve_prediction(model_fn, prediction)
    ab, T = _check(schedule, x_T, num_steps, prediction, timestep_spacing, "pndm")
    if prediction == "x0":
        raise ValueError("pndm takes eps or v predictions (as diffusers' PNDMScheduler), not x0.")
    if clip_x0 is not None or dynamic_threshold is not None:
        raise ValueError("pndm does not clip or threshold x0 (diffusers' PNDMScheduler has no such option).")
    final = 1.0 if final_alpha_cumprod is None else float(final_alpha_cumprod)
    t, _ = sampling_grid(ab, num_steps, timestep_spacing, steps_offset=steps_offset, integer=True)
    asc = t[::-1].astype(np.int64)
    plms = np.concatenate([asc[:-1], asc[-2:-1], asc[-1:]])[::-1]
    ratio = T // num_steps
    weights = {1: (1.0, 0.0, 0.0, 0.0), 2: (1.5, -0.5, 0.0, 0.0), 3: (23 / 12, -16 / 12, 5 / 12, 0.0),
               4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
    rows, n_eps = [], 0
    for counter, t_model in enumerate(plms):  # diffusers' step_plms, unrolled on the host
        t, prev, push = int(t_model), int(t_model) - ratio, 1.0
        if counter == 1:  # the restart step: average with the first eps, from the first sample
            t, prev, push = int(t_model) + ratio, int(t_model), 0.0
        else:
            n_eps = min(n_eps, 3) + 1
        w = (0.5, 0.5, 0.0, 0.0) if counter == 1 and n_eps == 1 else weights[n_eps]
        a_t, a_prev = ab[t], (ab[prev] if prev >= 0 else final)
        denom = a_t * np.sqrt(1.0 - a_prev) + np.sqrt(a_t * (1.0 - a_t) * a_prev)
        rows.append(dict(t=float(t_model), w0=w[0], w1=w[1], w2=w[2], w3=w[3], push=push,
                         use_first=float(counter == 1 and n_eps == 1), save_first=float(counter == 0),
                         sample_coeff=np.sqrt(a_prev / a_t), eps_coeff=(a_prev - a_t) / denom,
                         sqrt_ab=np.sqrt(a_t), sqrt_1m_ab=np.sqrt(1.0 - a_t)))
    consts = {k: np.array([r[k] for r in rows], np.float64) for k in rows[0]}
    return _loop(_pndm_step, model_fn, x_T, consts, prediction=prediction, extra_args=extra_args,
                 return_trajectory=return_trajectory)


SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim, "dpmpp_2m": sample_dpmpp_2m,
            "euler": sample_euler, "heun": sample_heun, "euler_ancestral": sample_euler_ancestral,
            "pndm": sample_pndm}


def sample(model_fn: ModelFn, schedule: Schedule, x_T: jax.Array, *, method: str, num_steps: int,
           key: jax.Array | None = None, prediction: str | None = None, timestep_spacing: str | None = None,
           steps_offset: int = 0, eta: float = 0.0, variance: str = "fixed_small", use_karras_sigmas: bool = False,
           clip_x0: float | None = None, dynamic_threshold=None, extra_args: Mapping[str, Any] | None = None,
           return_trajectory: bool = False, final_alpha_cumprod: float | None = None):
    """Draw x_0 ``[B, ...]`` float32 from standard normal noise ``x_T: [B, ...]``.

    Args:
      model_fn: ``model_fn(x_t, t, **extra_args) -> prediction`` with ``t: [B]`` float32 on the
        training scale. Hashed as a static jit argument: define it once.
      schedule: the training :class:`~jaxdiff.schedules.Schedule` (concrete, read on the host).
      method: one of ``METHODS``: ``"ddpm"``, ``"ddim"``, ``"dpmpp_2m"``, ``"euler"``, ``"heun"``,
        ``"euler_ancestral"``, ``"pndm"``.
      num_steps: sampling steps N, ``1 <= N <= T`` (model calls: N, heun 2N - 1).
      key: PRNG key, required by ddpm, euler_ancestral and ddim with ``eta > 0``; ignored otherwise.
      prediction: what the model predicts: ``"eps"``, ``"x0"`` or ``"v"``; None: ``model_fn``'s own
        when it is a :class:`jaxdiff.diffusion.Denoiser` (the model adapters' functions are), else ``"eps"``.
      timestep_spacing: ``"leading"``, ``"trailing"`` or ``"linspace"``; None takes diffusers' default
        for the method (``DEFAULT_SPACING``). ``steps_offset`` shifts ``"leading"`` grids.
      eta: DDIM stochasticity (ddim only). variance: ``"fixed_small"``/``"fixed_large"`` (ddpm only).
      use_karras_sigmas: Karras et al. (2022) noise levels (dpmpp_2m, euler, heun).
      clip_x0: clip predicted x0 to ``[-clip_x0, clip_x0]``.
      dynamic_threshold: Imagen dynamic thresholding of x0: percentile ``p`` or ``(p, s_max)``.
      extra_args: pytree of keyword arguments for ``model_fn`` (params, labels, guidance scale);
        traced, so new values do not recompile.
      return_trajectory: also return x after every step, ``[N, B, ...]``.
      final_alpha_cumprod: ddim and pndm: where the last step lands (None: clean data; Stable
        Diffusion's ``set_alpha_to_one=False`` means ``alphas_cumprod[0]``).
    """
    if method not in SAMPLERS:
        raise ValueError(f"Unknown sampling method {method!r}; choose one of {METHODS}.")
    if eta != 0.0 and method != "ddim":
        raise ValueError(f"eta applies to ddim only, not {method}.")
    if variance != "fixed_small" and method != "ddpm":
        raise ValueError(f"variance applies to ddpm only, not {method}.")
    if final_alpha_cumprod is not None and method not in ("ddim", "pndm"):
        raise ValueError(f"final_alpha_cumprod applies to ddim and pndm only, not {method}.")
    if use_karras_sigmas and method not in KARRAS_METHODS:
        raise ValueError(f"use_karras_sigmas applies to {KARRAS_METHODS}, not {method}.")
    kwargs = dict(num_steps=num_steps, key=key, prediction=prediction,
                  timestep_spacing=timestep_spacing or DEFAULT_SPACING[method], steps_offset=steps_offset,
                  clip_x0=clip_x0, dynamic_threshold=dynamic_threshold, extra_args=extra_args,
                  return_trajectory=return_trajectory)
    if method == "ddpm":
        kwargs["variance"] = variance
    elif method == "ddim":
        kwargs["eta"] = eta
        kwargs["final_alpha_cumprod"] = final_alpha_cumprod
    elif method == "pndm":
        kwargs["final_alpha_cumprod"] = final_alpha_cumprod
    elif method in KARRAS_METHODS:
        kwargs["use_karras_sigmas"] = use_karras_sigmas
    return SAMPLERS[method](model_fn, schedule, x_T, **kwargs)


# ----------------------------------------------------------------------------- guidance
@functools.lru_cache(maxsize=64)
def cfg_model_fn(cond_fn: Callable[..., jax.Array]) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022) as a ``model_fn`` wrapper.

    ``cond_fn(x_t, t, cond, **kwargs) -> prediction``. The returned
    ``guided(x_t, t, *, cond, null_cond, guidance_scale, **kwargs)`` runs the conditional and the
    unconditional branch in ONE forward pass on the batch ``[x_t; x_t]`` with ``[cond; null_cond]``
    (every leaf concatenated on axis 0; ``null_cond`` leaves may have batch 1 and are broadcast) and
    returns ``pred_u + w (pred_c - pred_u)``. Pass ``cond``, ``null_cond``, ``guidance_scale`` (and
    e.g. params) through ``sample(..., extra_args=...)`` so that they are traced: a new guidance scale
    or new labels do not recompile. Cached per ``cond_fn``, so repeated calls return the same
    function (and hit the same compiled sampler). A :class:`~jaxdiff.diffusion.Denoiser` gives a
    Denoiser of the same ``prediction`` (guidance is linear in eps, x0 and v alike).
    """

    def guided(x_t, t, *, cond, null_cond, guidance_scale, **kwargs):
        def both(c, u):
            u = jnp.broadcast_to(u, c.shape)
            return jnp.concatenate([c, u.astype(c.dtype)], axis=0)

        pred = cond_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]),
                       jax.tree.map(both, cond, null_cond), **kwargs)
        pred_c, pred_u = jnp.split(pred, 2, axis=0)
        return pred_u + guidance_scale * (pred_c - pred_u)

    return Denoiser(guided, cond_fn.prediction) if isinstance(cond_fn, Denoiser) else guided
