"""Noise schedules for discrete-time diffusion (DDPM, Ho et al. 2020).

A :class:`Schedule` is a frozen pytree of float32 arrays of shape ``[T]``; every array is computed
in float64 NumPy and rounded once to float32, so that products such as ``1 - alpha_bar`` do not
lose precision (and never round to 0 or 1 the way bf16 would).

    >>> s = make_schedule("linear", 1000)
    >>> s.alphas_cumprod.shape
    (1000,)

Two noise levels, two names:

* ``sigma`` is the variance-preserving (VP) one, ``sigma_t = sqrt(1 - alpha_bar_t)`` with
  ``x_t = alpha_t x_0 + sigma_t eps`` and ``alpha_t = sqrt(alpha_bar_t)``: the ``sigma`` of
  :mod:`jaxdiff.diffusion` and of the DDPM/DDIM/DPM-Solver samplers.
* ``ve_sigma`` is the variance-exploding (VE, k-diffusion/EDM) one,
  ``ve_sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) = sigma_t / alpha_t`` with
  ``x_t / alpha_t = x_0 + ve_sigma_t eps``: what diffusers' ``scheduler.sigmas`` hold, what Karras
  et al. (2022) space, and the state variable of the Euler/Heun samplers. Functions here that
  return or take it say ``ve_sigma`` in their names (:func:`ve_sigmas`, :func:`ve_sigmas_np`,
  :func:`timestep_to_ve_sigma`, :func:`ve_sigma_to_timestep`, :func:`karras_ve_sigmas`); the
  older names without ``ve_`` remain as aliases.

Sampling grids (the timesteps, and VE sigmas, a sampler visits) all come from one builder,
:func:`sampling_grid`.

This module imports nothing else from jaxdiff.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

SCHEDULE_KINDS = ("linear", "cosine", "scaled_linear", "sigmoid")
# diffusers' names for the same schedules, accepted as aliases.
_ALIASES = {"squaredcos_cap_v2": "cosine"}
_DEFAULT_ENDPOINTS = {
    "linear": (1e-4, 0.02),
    "scaled_linear": (0.00085, 0.012),
    "sigmoid": (1e-4, 0.02),
}


@struct.dataclass
class Schedule:
    """Per-timestep constants of a discrete diffusion process; every field is float32 ``[T]``.

    Index ``t`` (0-based, ``0 <= t < T``) corresponds to the paper's step ``t + 1``:
    ``alphas_cumprod[t] = prod_{s<=t} (1 - betas[s])``.
    """

    betas: jax.Array
    alphas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array  # alpha_bar_{t-1}, with alpha_bar_{-1} = 1
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    log_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    # q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, posterior_variance)
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array  # log variance with index 0 replaced by index 1
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array

    @property
    def num_timesteps(self) -> int:
        """T, the number of training timesteps (static: it is the arrays' shape)."""
        return self.betas.shape[0]


def _linear(T, beta_start, beta_end):
    return np.linspace(beta_start, beta_end, T, dtype=np.float64)


def _scaled_linear(T, beta_start, beta_end):
    return np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2


def _sigmoid(T, beta_start, beta_end):
    x = np.linspace(-6.0, 6.0, T, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-x)) * (beta_end - beta_start) + beta_start


def betas_for_alpha_bar(T: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> np.ndarray:
    """Betas whose cumulative product follows ``alpha_bar(t)`` on ``t in [0, 1]`` (float64)."""
    t1 = np.arange(T, dtype=np.float64) / T
    t2 = (np.arange(T, dtype=np.float64) + 1) / T
    return np.minimum(1.0 - alpha_bar(t2) / alpha_bar(t1), max_beta)


def _cosine(T, s=0.008, max_beta=0.999):
    """Nichol & Dhariwal (2021), eq. 17; diffusers' ``squaredcos_cap_v2``."""
    return betas_for_alpha_bar(T, lambda t: np.cos((t + s) / (1 + s) * math.pi / 2) ** 2, max_beta)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. (2024), Algorithm 1: shift/scale sqrt(alpha_bar) so the last step has SNR 0."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


def betas_np(kind: str, num_timesteps: int = 1000, **options) -> np.ndarray:
    """The float64 betas ``[T]`` of a named schedule (see :func:`make_schedule`)."""
    kind = _ALIASES.get(kind, kind)
    if kind not in SCHEDULE_KINDS:
        raise ValueError(
            f"Unknown schedule kind {kind!r}. Choose one of {SCHEDULE_KINDS} "
            f"(diffusers' 'squaredcos_cap_v2' is accepted for 'cosine')."
        )
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 2:
        raise ValueError(f"num_timesteps must be an integer >= 2, got {num_timesteps!r}.")
    zero_snr = bool(options.pop("rescale_zero_terminal_snr", False))
    if kind == "cosine":
        allowed = {"s", "max_beta"}
        unknown = set(options) - allowed
        if unknown:
            raise ValueError(f"Unknown option(s) {sorted(unknown)} for the cosine schedule; allowed: {sorted(allowed)}.")
        betas = _cosine(num_timesteps, **options)
    else:
        unknown = set(options) - {"beta_start", "beta_end"}
        if unknown:
            raise ValueError(
                f"Unknown option(s) {sorted(unknown)} for the {kind} schedule; allowed: ['beta_start', 'beta_end']."
            )
        start, end = _DEFAULT_ENDPOINTS[kind]
        start = float(options.get("beta_start", start))
        end = float(options.get("beta_end", end))
        if not (0.0 < start <= end < 1.0):
            raise ValueError(f"Need 0 < beta_start <= beta_end < 1, got beta_start={start}, beta_end={end}.")
        betas = {"linear": _linear, "scaled_linear": _scaled_linear, "sigmoid": _sigmoid}[kind](
            num_timesteps, start, end
        )
    if zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def schedule_from_betas(betas) -> Schedule:
    """Build a :class:`Schedule` from betas ``[T]`` (any float array; math is done in float64)."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 2:
        raise ValueError(f"betas must be a 1-D array with at least 2 entries, got shape {betas.shape}.")
    if not np.all(np.isfinite(betas)) or np.any(betas <= 0) or np.any(betas > 1):
        raise ValueError("betas must be finite and in (0, 1].")
    alphas = 1.0 - betas
    ab = np.cumprod(alphas)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
    # The variance at t = 0 is 0; its log is clipped to the value at t = 1 (improved-DDPM).
    post_log_var = np.log(np.concatenate([post_var[1:2], post_var[1:]]))
    with np.errstate(divide="ignore"):
        log1m_ab = np.log(1.0 - ab)  # -inf only for a zero-terminal-SNR last step's complement
        recip = 1.0 / ab  # inf only where alpha_bar is 0 (zero terminal SNR)
    f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)  # noqa: E731
    return Schedule(
        betas=f32(betas),
        alphas=f32(alphas),
        alphas_cumprod=f32(ab),
        alphas_cumprod_prev=f32(ab_prev),
        sqrt_alphas_cumprod=f32(np.sqrt(ab)),
        sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - ab)),
        log_one_minus_alphas_cumprod=f32(log1m_ab),
        sqrt_recip_alphas_cumprod=f32(np.sqrt(recip)),
        sqrt_recipm1_alphas_cumprod=f32(np.sqrt(recip - 1.0)),
        posterior_variance=f32(post_var),
        posterior_log_variance_clipped=f32(post_log_var),
        posterior_mean_coef1=f32(betas * np.sqrt(ab_prev) / (1.0 - ab)),
        posterior_mean_coef2=f32((1.0 - ab_prev) * np.sqrt(alphas) / (1.0 - ab)),
    )


def make_schedule(kind: str = "linear", num_timesteps: int = 1000, **options) -> Schedule:
    """A named noise schedule of ``num_timesteps`` steps.

    Args:
      kind: ``"linear"`` (DDPM, betas 1e-4..0.02), ``"cosine"`` (Nichol & Dhariwal, s=0.008, betas
        clipped at 0.999; alias ``"squaredcos_cap_v2"``), ``"scaled_linear"`` (Stable Diffusion,
        linear in sqrt(beta), 0.00085..0.012) or ``"sigmoid"`` (GeoDiff, sigmoid(-6..6)).
      num_timesteps: T.
      **options: ``beta_start`` / ``beta_end`` override the endpoints (linear, scaled_linear,
        sigmoid); ``s`` / ``max_beta`` for cosine; ``rescale_zero_terminal_snr=True`` for any kind.

    Returns:
      A :class:`Schedule` of float32 ``[T]`` arrays computed in float64.
    """
    return schedule_from_betas(betas_np(kind, num_timesteps, **options))


# ----------------------------------------------------------------------------- SNR / sigma views
def snr(schedule: Schedule) -> jax.Array:
    """alpha_bar / (1 - alpha_bar), float32 ``[T]``."""
    # 1 - alpha_bar from the float64-derived field: float32 `1 - alphas_cumprod` cancels (~1e-4 rel. error).
    return schedule.alphas_cumprod / jnp.square(schedule.sqrt_one_minus_alphas_cumprod)


def log_snr(schedule: Schedule) -> jax.Array:
    """log(alpha_bar) - log(1 - alpha_bar), float32 ``[T]`` (the VDM lambda_t)."""
    return jnp.log(schedule.alphas_cumprod) - schedule.log_one_minus_alphas_cumprod


def ve_sigmas(schedule: Schedule) -> jax.Array:
    """Variance-exploding noise levels ve_sigma_t = sqrt((1 - alpha_bar) / alpha_bar), float32 ``[T]``.

    ``x_t / sqrt(alpha_bar_t) = x_0 + ve_sigma_t * eps``: the k-diffusion / EDM parameterisation
    (not the VP ``sigma_t = sqrt(1 - alpha_bar_t)``, which is ``schedule.sqrt_one_minus_alphas_cumprod``).
    """
    return schedule.sqrt_recipm1_alphas_cumprod


sigmas = ve_sigmas  # old name


# =============================================================================================
# Sampling grids: timestep spacings, VE-sigma interpolation, Karras sigmas, and the one builder.
#
# Host-side helpers for samplers. Everything here is float64 NumPy (no JAX): samplers compute
# their per-step constants with these once per call and hand float32 arrays to the jitted loop.
# Conventions follow diffusers (Lin et al. 2024, Table 2, for the spacings). Every "sigma" in this
# section is the VE ve_sigma = sqrt((1 - alpha_bar) / alpha_bar) (see the module docstring).
# =============================================================================================
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
KARRAS_RANGES = ("training", "grid")


def timesteps(num_train_timesteps: int, num_steps: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
    """``num_steps`` descending timesteps on the training scale ``[0, T)``, float64 ``[num_steps]``.

    * ``"leading"``: ``k * (T // N) + steps_offset`` for ``k = N-1 .. 0`` (DDPM/DDIM default;
      ends at ``steps_offset``, never reaches ``T - 1``).
    * ``"trailing"``: ``round(T - k * T / N) - 1`` for ``k = 0 .. N-1`` (starts at ``T - 1``).
    * ``"linspace"``: ``N`` evenly spaced points from ``T - 1`` down to ``0``, not rounded (Euler/Heun
      use them as float timesteps; integer-time samplers round them).

    ``steps_offset`` is applied to ``"leading"`` only, as in diffusers. Samplers get their grid
    from :func:`sampling_grid`, which builds on this.
    """
    T, N = int(num_train_timesteps), int(num_steps)
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"Unknown timestep spacing {spacing!r}; choose one of {TIMESTEP_SPACINGS}.")
    if N < 1:
        raise ValueError(f"num_steps must be >= 1, got {N}.")
    if spacing == "linspace":
        return np.linspace(0.0, T - 1, N, dtype=np.float64)[::-1].copy()
    if spacing == "leading":
        return (np.arange(N, dtype=np.float64) * (T // N))[::-1] + steps_offset
    return np.round(np.arange(T, 0, -T / N, dtype=np.float64)) - 1.0


def ve_sigmas_np(alphas_cumprod) -> np.ndarray:
    """Variance-exploding ve_sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) as float64 ``[T]``."""
    ab = np.asarray(alphas_cumprod, dtype=np.float64)
    return np.sqrt((1.0 - ab) / ab)


def timestep_to_ve_sigma(t, train_ve_sigmas: np.ndarray) -> np.ndarray:
    """ve_sigma at (fractional) timesteps ``t``, linear in ve_sigma between integer timesteps (diffusers)."""
    return np.interp(np.asarray(t, dtype=np.float64), np.arange(len(train_ve_sigmas), dtype=np.float64),
                     train_ve_sigmas)


def ve_sigma_to_timestep(ve_sigma, train_ve_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timesteps of noise levels ``ve_sigma``, linear in log(ve_sigma) (inverse of the table).

    Clamped to ``[0, T-1]``; ``train_ve_sigmas`` must increase with t.
    """
    log_sigma = np.log(np.maximum(np.asarray(ve_sigma, dtype=np.float64), 1e-10))
    return np.interp(log_sigma, np.log(train_ve_sigmas), np.arange(len(train_ve_sigmas), dtype=np.float64))


def karras_ve_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022), eq. 5: ``n`` descending VE noise levels from sigma_max to sigma_min (float64).

    ``sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``.
    Unlike k-diffusion's ``get_sigmas_karras`` no trailing zero is appended.
    """
    if not 0.0 < sigma_min <= sigma_max:
        raise ValueError(f"Need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}.")
    ramp = np.linspace(0.0, 1.0, int(n), dtype=np.float64)
    min_inv_rho, max_inv_rho = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


train_sigmas_np = ve_sigmas_np  # old name
timestep_to_sigma = timestep_to_ve_sigma  # old name
sigma_to_timestep = ve_sigma_to_timestep  # old name
karras_sigmas = karras_ve_sigmas  # old name


def sampling_grid(alphas_cumprod, num_steps: int, spacing: str, *, steps_offset: int = 0,
                  karras: str | None = None, integer: bool = False,
                  drop_last: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The timesteps a sampler visits and their VE sigmas: ``(t [N], ve_sigma [N + 1])``, float64.

    Every sampler in :mod:`jaxdiff.sampling` gets its grid here; ``ve_sigma`` always ends with an
    appended 0 (the step after the last lands on clean data) and is the VE noise level
    ``sqrt((1 - alpha_bar) / alpha_bar)`` at each timestep (samplers that want the VP sigma or
    alpha_bar index ``alphas_cumprod`` with the integer ``t``).

    Args:
      alphas_cumprod: the training alpha_bar ``[T]`` (any float array; used in float64).
      num_steps: N, the number of timesteps returned.
      spacing: ``"leading"``, ``"trailing"`` or ``"linspace"`` (see :func:`timesteps`); ignored
        when ``karras="training"``.
      steps_offset: shifts ``"leading"`` grids (diffusers' ``steps_offset``).
      karras: None: ``ve_sigma`` is read off the spaced timesteps. Otherwise N Karras et al.
        (2022) noise levels (:func:`karras_ve_sigmas`, rho 7) whose timesteps are found by
        :func:`ve_sigma_to_timestep`; the two diffusers conventions differ in their range:

        * ``"training"``: the whole training range ``[ve_sigma_0, ve_sigma_{T-1}]``, spacing
          ignored, as ``DPMSolverMultistepScheduler(use_karras_sigmas=True)``.
        * ``"grid"``: the spaced grid's own ``[min, max]`` (its sigmas interpolated at the float
          timesteps of ``spacing``), as ``EulerDiscreteScheduler`` / ``HeunDiscreteScheduler``
          with ``use_karras_sigmas=True``.
      integer: round the timesteps (still float64; cast them to index tables). Without Karras the VE sigmas are then
        the training table's values at those integers (DPM-Solver++); with Karras they stay the
        Karras levels while only the timesteps are rounded (diffusers' DPM-Solver does the same).
        False: float timesteps, VE sigmas interpolated linearly between integer timesteps
        (:func:`timestep_to_ve_sigma`, Euler/Heun).
      drop_last: ``"linspace"`` and ``"leading"`` build N + 1 timesteps and drop the last
        (``DPMSolverMultistepScheduler``, whose ``"leading"`` step is ``T // (N + 1)``);
        ``"trailing"`` and Karras grids are unaffected.

    Which sampler asks for what (each matches the named diffusers scheduler's ``set_timesteps``):
    ddpm/ddim/pndm ``integer=True`` (DDPM/DDIM/PNDMScheduler); dpmpp_2m ``integer=True,
    drop_last=True``, ``karras="training"`` with Karras sigmas (DPMSolverMultistepScheduler);
    euler/heun/euler_ancestral float timesteps, ``karras="grid"`` with Karras sigmas
    (Euler/Heun/EulerAncestralDiscreteScheduler).
    """
    if karras not in (None,) + KARRAS_RANGES:
        raise ValueError(f"Unknown karras range {karras!r}; choose None or one of {KARRAS_RANGES}.")
    T, N = len(alphas_cumprod), int(num_steps)
    with np.errstate(divide="ignore"):  # alpha_bar = 0 (zero terminal SNR): ve_sigma = inf
        train = ve_sigmas_np(alphas_cumprod)
    if karras == "training":
        s = karras_ve_sigmas(train[0], train[-1], N)
    else:
        if drop_last and spacing != "trailing":
            t = timesteps(T, N + 1, spacing, steps_offset)[:-1]
        else:
            t = timesteps(T, N, spacing, steps_offset)
        if integer:
            t = np.round(t)
            s = train[t.astype(np.int64)]
        else:
            s = timestep_to_ve_sigma(t, train)
        if karras == "grid":
            s = karras_ve_sigmas(s[-1], s[0], N)
    if karras is not None:
        t = ve_sigma_to_timestep(s, train)
        if integer:
            t = np.round(t)
    return t, np.append(s, 0.0)
