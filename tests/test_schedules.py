"""Tests for jaxdiff.schedules against float64 NumPy transcriptions of the papers and diffusers.

References:
  * Ho et al. 2020 (DDPM): linear betas, alpha_bar_t = prod (1 - beta_s), eq. 6-7 posterior.
  * Nichol & Dhariwal 2021, eq. 17: cosine alpha_bar, betas clipped at 0.999.
  * Rombach et al. (Stable Diffusion) scaled_linear; GeoDiff sigmoid.
  * Lin et al. 2024, Algorithm 1: rescale to zero terminal SNR.
  * diffusers.DDPMScheduler (float32 torch) on the same configuration.
  * Sampling grids: float64 transcriptions of diffusers' DPMSolverMultistepScheduler and
    EulerDiscreteScheduler ``set_timesteps`` (0.42), and the schedulers themselves.
"""
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from jaxdiff import schedules as S

T = 1000
OURS = {"squaredcos_cap_v2": "cosine"}  # diffusers name -> ours
FIELDS = (
    "betas",
    "alphas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


# ------------------------------------------------------------------ float64 references (written from the papers)
def ref_betas(kind, n, beta_start=None, beta_end=None, s=0.008, max_beta=0.999):
    if kind == "linear":  # Ho et al. 2020, sec. 4
        b0, b1 = beta_start or 1e-4, beta_end or 0.02
        return np.array([b0 + (b1 - b0) * i / (n - 1) for i in range(n)], dtype=np.float64)
    if kind == "scaled_linear":  # linear in sqrt(beta)
        b0, b1 = beta_start or 0.00085, beta_end or 0.012
        r0, r1 = math.sqrt(b0), math.sqrt(b1)
        return np.array([(r0 + (r1 - r0) * i / (n - 1)) ** 2 for i in range(n)], dtype=np.float64)
    if kind == "sigmoid":  # GeoDiff: sigmoid(linspace(-6, 6)) scaled into [beta_start, beta_end]
        b0, b1 = beta_start or 1e-4, beta_end or 0.02
        x = np.array([-6.0 + 12.0 * i / (n - 1) for i in range(n)])
        return scipy.special.expit(x) * (b1 - b0) + b0
    if kind == "cosine":  # Nichol & Dhariwal eq. 17: alpha_bar(t) = f(t) / f(0), f = cos^2(...)
        f = lambda t: math.cos((t / n + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        abar = [f(t) / f(0) for t in range(n + 1)]  # abar[0] = 1 (no noise)
        return np.array([min(1 - abar[t] / abar[t - 1], max_beta) for t in range(1, n + 1)])
    raise AssertionError(kind)


def ref_zero_snr(betas):
    """Lin et al. 2024, Algorithm 1 (float64)."""
    abar_sqrt = np.sqrt(np.cumprod(1.0 - betas))
    a0, aT = abar_sqrt[0], abar_sqrt[-1]
    abar_sqrt = (abar_sqrt - aT) * a0 / (a0 - aT)
    abar = abar_sqrt**2
    alphas = np.empty_like(abar)
    alphas[0] = abar[0]
    alphas[1:] = abar[1:] / abar[:-1]
    return 1.0 - alphas


def ref_schedule(betas):
    """Every Schedule field from Ho et al. eqs. 4, 6, 7 in float64."""
    betas = np.asarray(betas, np.float64)
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    one_minus = 1.0 - abar
    post_var = betas * (1.0 - abar_prev) / one_minus  # beta-tilde, eq. 7
    with np.errstate(divide="ignore"):
        return dict(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=abar,
            alphas_cumprod_prev=abar_prev,
            sqrt_alphas_cumprod=np.sqrt(abar),
            sqrt_one_minus_alphas_cumprod=np.sqrt(one_minus),
            log_one_minus_alphas_cumprod=np.log(one_minus),
            sqrt_recip_alphas_cumprod=1.0 / np.sqrt(abar),
            sqrt_recipm1_alphas_cumprod=np.sqrt(one_minus / abar),
            posterior_variance=post_var,
            posterior_log_variance_clipped=np.log(np.where(np.arange(len(betas)) == 0, post_var[1], post_var)),
            posterior_mean_coef1=np.sqrt(abar_prev) * betas / one_minus,
            posterior_mean_coef2=np.sqrt(alphas) * (1.0 - abar_prev) / one_minus,
        )


def max_rel_err(ours, ref):
    """max |ours - ref| / |ref| (absolute error where ref == 0); infinities must match exactly."""
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    inf = ~np.isfinite(ref)
    assert np.array_equal(ours[inf], ref[inf]), (ours[inf], ref[inf])
    o, r = ours[~inf], ref[~inf]
    err = np.abs(o - r) / np.where(r == 0, 1.0, np.abs(r))
    return float(err.max()) if err.size else 0.0


def assert_within_diffusers_rounding(ours, theirs, ref, rtol=1e-6):
    """|ours - diffusers| <= |diffusers - ref64| + rtol |ref64|: diffusers' float32 error is its own."""
    ours, theirs, ref = (np.asarray(a, np.float64) for a in (ours, theirs, ref))
    bound = np.abs(theirs - ref) + rtol * np.abs(ref) + 1e-30
    excess = np.abs(ours - theirs) - bound
    assert np.all(excess <= 0), f"worst excess {excess.max():.3g} at {int(np.argmax(excess))}"


def diffusers_sched(kind, **kw):
    return DDPMScheduler(num_train_timesteps=kw.pop("num_train_timesteps", T), beta_schedule=kind, **kw)


# ------------------------------------------------------------------ values
@pytest.mark.parametrize("kind", ["linear", "cosine", "scaled_linear", "sigmoid"])
@pytest.mark.parametrize("n", [T, 37])
def test_fields_match_float64_reference(kind, n):
    s = S.make_schedule(kind, n)
    ref = ref_schedule(ref_betas(kind, n))
    for name in FIELDS:
        err = max_rel_err(getattr(s, name), ref[name])
        assert err < 1e-6, (kind, name, err)
    np.testing.assert_allclose(S.betas_np(kind, n), ref["betas"], rtol=1e-10)
    assert S.betas_np(kind, n).dtype == np.float64
    assert float(s.posterior_variance[0]) == 0.0  # beta-tilde_1 = 0 exactly


@pytest.mark.parametrize("kind", ["linear", "cosine", "scaled_linear", "sigmoid"])
def test_snr_views_match_reference(kind):
    s = S.make_schedule(kind, T)
    ab = ref_schedule(ref_betas(kind, T))["alphas_cumprod"]
    assert max_rel_err(S.snr(s), ab / (1 - ab)) < 1e-6
    # log_snr crosses 0, so measure it absolutely: an absolute error in log SNR is a relative error in SNR.
    assert np.max(np.abs(np.asarray(S.log_snr(s), np.float64) - (np.log(ab) - np.log1p(-ab)))) < 2e-6
    assert max_rel_err(S.ve_sigmas(s), np.sqrt((1 - ab) / ab)) < 1e-6  # VE sigma = sigma / alpha
    assert max_rel_err(s.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - ab)) < 1e-6  # the VP sigma


@pytest.mark.parametrize(
    "kind,ours_kind,kw",
    [
        ("linear", "linear", {}),
        ("scaled_linear", "scaled_linear", dict(beta_start=0.00085, beta_end=0.012)),
        ("squaredcos_cap_v2", "cosine", {}),
        ("sigmoid", "sigmoid", {}),
        ("linear", "linear", dict(beta_start=3e-4, beta_end=0.03, num_train_timesteps=250)),
        ("scaled_linear", "scaled_linear", dict(beta_start=1e-4, beta_end=0.02)),
    ],
)
def test_matches_diffusers_ddpm_scheduler(kind, ours_kind, kw):
    kw = dict(kw)
    n = kw.pop("num_train_timesteps", T)
    d = diffusers_sched(kind, num_train_timesteps=n, **kw)
    s = S.make_schedule(kind, n, **kw)
    s2 = S.make_schedule(ours_kind, n, **kw)
    ref = ref_schedule(ref_betas(ours_kind, n, **kw))
    for name, theirs in [("betas", d.betas), ("alphas_cumprod", d.alphas_cumprod)]:
        theirs = theirs.double().numpy()
        np.testing.assert_array_equal(getattr(s, name), getattr(s2, name))  # alias == canonical name
        assert max_rel_err(getattr(s, name), ref[name]) < 1e-6
        assert_within_diffusers_rounding(getattr(s, name), theirs, ref[name])
        # diffusers' float32 cumprod drifts up to ~1.3e-5 (cosine tail); betas agree to ~2e-7.
        assert max_rel_err(getattr(s, name), theirs) < (2e-5 if name == "alphas_cumprod" else 1e-6)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_rescale_zero_terminal_snr(kind):
    kw = dict(beta_start=0.00085, beta_end=0.012) if kind == "scaled_linear" else {}
    d = diffusers_sched(kind, rescale_betas_zero_snr=True, **kw)
    s = S.make_schedule(kind, T, rescale_zero_terminal_snr=True, **kw)
    ref = ref_schedule(ref_zero_snr(ref_betas(OURS.get(kind, kind), T, **kw)))
    for name in FIELDS:
        assert max_rel_err(getattr(s, name), ref[name]) < 1e-6, name
    for name, theirs in [("betas", d.betas), ("alphas_cumprod", d.alphas_cumprod)]:
        assert_within_diffusers_rounding(getattr(s, name), theirs.double().numpy(), ref[name])
    assert float(s.alphas_cumprod[-1]) == 0.0 and float(s.betas[-1]) == 1.0
    assert float(S.snr(s)[-1]) == 0.0 and float(S.log_snr(s)[-1]) == -np.inf
    # the first step keeps its alpha_bar (Algorithm 1 fixes sqrt(alpha_bar_1)).
    assert abs(float(s.alphas_cumprod[0]) - ref_schedule(ref_betas(OURS.get(kind, kind), T, **kw))["alphas_cumprod"][0]) < 1e-7


def test_overrides_and_options():
    s = S.make_schedule("linear", 500, beta_start=2e-4, beta_end=0.04)
    assert max_rel_err(s.betas, ref_betas("linear", 500, 2e-4, 0.04)) < 1e-6
    s = S.make_schedule("sigmoid", 300, beta_start=1e-3, beta_end=0.05)
    assert max_rel_err(s.alphas_cumprod, ref_schedule(ref_betas("sigmoid", 300, 1e-3, 0.05))["alphas_cumprod"]) < 1e-6
    s = S.make_schedule("cosine", 200, s=0.02, max_beta=0.5)
    ref = ref_betas("cosine", 200, s=0.02, max_beta=0.5)
    assert max_rel_err(s.betas, ref) < 1e-6
    assert float(s.betas.max()) == np.float32(0.5)
    assert float(S.make_schedule("cosine", T).betas[-1]) == np.float32(0.999)  # eq. 17's clip
    # equal endpoints are a constant schedule
    np.testing.assert_allclose(S.make_schedule("linear", 10, beta_start=0.01, beta_end=0.01).betas, 0.01, rtol=1e-7)


def test_schedule_from_betas():
    b = ref_betas("linear", 64, 1e-3, 0.1)
    s = S.schedule_from_betas(b.astype(np.float32))  # any float input
    ref = ref_schedule(b.astype(np.float32).astype(np.float64))
    for name in FIELDS:
        assert max_rel_err(getattr(s, name), ref[name]) < 1e-6, name
    s1, s2 = S.schedule_from_betas(S.betas_np("cosine", 50)), S.make_schedule("cosine", 50)
    for a, b2 in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
        np.testing.assert_array_equal(a, b2)
    for bad in [np.ones((2, 3)) * 0.1, [0.1], [0.1, 0.0], [0.1, -0.2], [0.1, 1.5], [0.1, np.nan]]:
        with pytest.raises(ValueError):
            S.schedule_from_betas(bad)


def test_dtype_shape_and_pytree():
    s = S.make_schedule("linear", 123)
    assert s.num_timesteps == 123
    for name in FIELDS:
        a = getattr(s, name)
        assert isinstance(a, jax.Array) and a.dtype == jnp.float32 and a.shape == (123,), name
    leaves = jax.tree.leaves(s)
    assert len(leaves) == len(FIELDS) and all(leaf.dtype == jnp.float32 for leaf in leaves)
    # round-trips through jit as an argument and as an output
    out = jax.jit(lambda sch: sch)(s)
    assert isinstance(out, S.Schedule)
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(out, name), getattr(s, name))
    f = jax.jit(lambda sch, t: sch.alphas_cumprod[t] * sch.num_timesteps)
    np.testing.assert_allclose(f(s, 5), s.alphas_cumprod[5] * 123, rtol=1e-7)
    doubled = jax.tree.map(lambda a: 2 * a, s)
    np.testing.assert_array_equal(doubled.betas, 2 * s.betas)
    np.testing.assert_array_equal(jax.jit(S.snr)(s), S.snr(s))
    np.testing.assert_array_equal(jax.jit(S.log_snr)(s), S.log_snr(s))
    with pytest.raises(Exception):  # frozen
        s.betas = s.alphas


def test_bad_input():
    with pytest.raises(ValueError) as e:
        S.make_schedule("quadratic", 100)
    for k in ("linear", "cosine", "scaled_linear", "sigmoid"):
        assert k in str(e.value)
    with pytest.raises(ValueError, match="Unknown option"):
        S.make_schedule("linear", 100, s=0.1)
    with pytest.raises(ValueError, match="Unknown option"):
        S.make_schedule("cosine", 100, beta_start=1e-4)
    with pytest.raises(ValueError, match="Unknown option"):
        S.make_schedule("scaled_linear", 100, bogus=1)
    for n in (1, 0, -5, 2.5, "10"):
        with pytest.raises(ValueError, match="num_timesteps"):
            S.make_schedule("linear", n)
    assert S.make_schedule("linear", 2).num_timesteps == 2
    with pytest.raises(ValueError, match="beta_start"):
        S.make_schedule("linear", 100, beta_start=0.03, beta_end=0.02)
    with pytest.raises(ValueError, match="beta_start"):
        S.make_schedule("scaled_linear", 100, beta_start=0.0)
    with pytest.raises(ValueError, match="beta_start"):
        S.make_schedule("sigmoid", 100, beta_end=1.0)


# ------------------------------------------------------------------ sampling grids
# float64 transcriptions of diffusers 0.42 `set_timesteps` (lambda_min_clipped=-inf, final_sigmas_type="zero").
def ref_karras(sigma_min, sigma_max, n, rho=7.0):
    """diffusers' `_convert_to_karras`."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def ref_sigma_to_t(sigma, log_sigmas):
    """diffusers' `_sigma_to_t` (piecewise linear in log sigma), one sigma."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(np.shape(sigma))


def ref_dpm_solver_grid(ab, n, spacing, steps_offset, karras):
    """DPMSolverMultistepScheduler.set_timesteps: (timesteps, sigmas with the final 0)."""
    T = len(ab)
    if spacing == "linspace":
        t = np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        t = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1].astype(np.int64) + steps_offset
    else:
        t = np.arange(T, 0, -T / n).round().astype(np.int64) - 1
    sigmas = np.sqrt((1 - ab) / ab)
    log_sigmas = np.log(sigmas)
    if karras:
        s = ref_karras(sigmas[0], sigmas[-1], n)
        t = np.array([ref_sigma_to_t(x, log_sigmas) for x in s]).round()
    else:
        s = np.interp(t, np.arange(0, len(sigmas)), sigmas)
    return t, np.concatenate([s, [0.0]])


def ref_euler_grid(ab, n, spacing, steps_offset, karras):
    """EulerDiscreteScheduler.set_timesteps (in float64): (timesteps, sigmas with the final 0)."""
    T = len(ab)
    if spacing == "linspace":
        t = np.linspace(0, T - 1, n)[::-1].copy()
    elif spacing == "leading":
        t = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.float64) + steps_offset
    else:
        t = np.arange(T, 0, -T / n).round() - 1
    sigmas = np.sqrt((1 - ab) / ab)
    log_sigmas = np.log(sigmas)
    s = np.interp(t, np.arange(0, len(sigmas)), sigmas)
    if karras:
        s = ref_karras(s[-1], s[0], n)
        t = np.array([ref_sigma_to_t(x, log_sigmas) for x in s])
    return t, np.concatenate([s, [0.0]])


GRID_CASES = [(sp, n) for sp in S.TIMESTEP_SPACINGS for n in (1, 2, 7, 25, 50, 999)]
AB64 = {k: np.asarray(S.make_schedule(k, T).alphas_cumprod, np.float64) for k in ("linear", "scaled_linear")}


@pytest.mark.parametrize("kind", ["linear", "scaled_linear"])
@pytest.mark.parametrize("karras", [False, True])
def test_sampling_grid_matches_dpm_solver_transcription(kind, karras):
    ab = AB64[kind]
    for spacing, n in GRID_CASES:
        offset = 1 if spacing == "leading" and n < 500 else 0  # (n=999, offset 1 would step past T - 1)
        t, s = S.sampling_grid(ab, n, spacing, steps_offset=offset, integer=True, drop_last=True,
                               karras="training" if karras else None)
        t_ref, s_ref = ref_dpm_solver_grid(ab, n, spacing, offset, karras)
        assert t.dtype == np.float64 and s.dtype == np.float64 and t.shape == (n,) and s.shape == (n + 1,)
        np.testing.assert_array_equal(t, t_ref, err_msg=f"{spacing} {n}")
        np.testing.assert_allclose(s, s_ref, rtol=1e-12, atol=0, err_msg=f"{spacing} {n}")


@pytest.mark.parametrize("kind", ["linear", "scaled_linear"])
@pytest.mark.parametrize("karras", [False, True])
def test_sampling_grid_matches_euler_transcription(kind, karras):
    ab = AB64[kind]
    for spacing, n in GRID_CASES:
        offset = 1 if spacing == "leading" and n < 500 else 0  # (n=999, offset 1 would step past T - 1)
        t, s = S.sampling_grid(ab, n, spacing, steps_offset=offset, karras="grid" if karras else None)
        t_ref, s_ref = ref_euler_grid(ab, n, spacing, offset, karras)
        np.testing.assert_allclose(t, t_ref, rtol=0, atol=1e-9, err_msg=f"{spacing} {n}")
        np.testing.assert_allclose(s, s_ref, rtol=1e-12, atol=0, err_msg=f"{spacing} {n}")


def test_sampling_grid_karras_ranges_differ_and_spacing_ignored_for_training_range():
    ab = AB64["scaled_linear"]
    train = S.ve_sigmas_np(ab)
    _, s_train = S.sampling_grid(ab, 10, "leading", karras="training")
    _, s_grid = S.sampling_grid(ab, 10, "leading", karras="grid")
    assert s_train[0] == pytest.approx(train[-1], rel=1e-12) and s_train[-2] == pytest.approx(train[0], rel=1e-12)
    t_leading = S.timesteps(T, 10, "leading")
    assert s_grid[0] == pytest.approx(np.interp(t_leading[0], np.arange(T), train), rel=1e-12)
    assert s_grid[-2] == pytest.approx(train[0], rel=1e-12)  # leading ends at t = 0
    assert s_grid[0] < s_train[0]  # leading never reaches T - 1
    for spacing in ("linspace", "trailing"):
        t, s = S.sampling_grid(ab, 10, spacing, steps_offset=3, karras="training")
        np.testing.assert_array_equal(s, s_train)


# diffusers 0.42 + NumPy 2: "__array__ implementation doesn't accept a copy keyword" in set_timesteps.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize("spacing", S.TIMESTEP_SPACINGS)
@pytest.mark.parametrize("kind", ["linear", "scaled_linear"])
def test_sampling_grid_matches_diffusers_schedulers(spacing, kind):
    kw = dict(beta_schedule=kind, beta_start=0.00085, beta_end=0.012) if kind == "scaled_linear" else {}
    offset = 1 if spacing == "leading" else 0
    for n in (7, 25):
        ddim = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset, **kw)
        ddim.set_timesteps(n)
        ab = ddim.alphas_cumprod.numpy().astype(np.float64)
        t, _ = S.sampling_grid(ab, n, spacing, steps_offset=offset, integer=True)
        np.testing.assert_array_equal(t, ddim.timesteps.numpy())
        for karras in (False, True):
            dpm = DPMSolverMultistepScheduler(timestep_spacing=spacing, steps_offset=offset, use_karras_sigmas=karras,
                                              final_sigmas_type="zero", **kw)
            dpm.set_timesteps(n)
            t, s = S.sampling_grid(ab, n, spacing, steps_offset=offset, integer=True, drop_last=True,
                                   karras="training" if karras else None)
            np.testing.assert_array_equal(t, dpm.timesteps.numpy())
            np.testing.assert_allclose(s, dpm.sigmas.numpy(), rtol=1e-6)
            euler = EulerDiscreteScheduler(timestep_spacing=spacing, steps_offset=offset, use_karras_sigmas=karras, **kw)
            euler.set_timesteps(n)
            t, s = S.sampling_grid(ab, n, spacing, steps_offset=offset, karras="grid" if karras else None)
            np.testing.assert_allclose(t, euler.timesteps.numpy(), rtol=1e-6, atol=1e-3)
            np.testing.assert_allclose(s, euler.sigmas.numpy(), rtol=1e-6)


def test_sampling_grid_integer_and_options():
    ab = AB64["linear"]
    for spacing in S.TIMESTEP_SPACINGS:
        t, s = S.sampling_grid(ab, 30, spacing, steps_offset=1, integer=True)
        np.testing.assert_array_equal(t, np.round(S.timesteps(T, 30, spacing, 1)))
        np.testing.assert_array_equal(s, np.append(S.ve_sigmas_np(ab)[t.astype(np.int64)], 0.0))
    # drop_last leaves trailing grids alone
    np.testing.assert_array_equal(S.sampling_grid(ab, 30, "trailing", drop_last=True)[0],
                                  S.sampling_grid(ab, 30, "trailing")[0])
    with pytest.raises(ValueError, match="karras"):
        S.sampling_grid(ab, 10, "linspace", karras="train")
    with pytest.raises(ValueError, match="spacing"):
        S.sampling_grid(ab, 10, "uniform")
    # zero terminal SNR: ve_sigma_{T-1} = inf, without a warning
    zsnr = np.asarray(S.make_schedule("scaled_linear", T, rescale_zero_terminal_snr=True).alphas_cumprod, np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t, s = S.sampling_grid(zsnr, 10, "trailing", integer=True)
    assert t[0] == T - 1 and np.isinf(s[0]) and s[-1] == 0.0


def test_old_names_are_aliases():
    assert S.sigmas is S.ve_sigmas
    assert S.train_sigmas_np is S.ve_sigmas_np
    assert S.timestep_to_sigma is S.timestep_to_ve_sigma
    assert S.sigma_to_timestep is S.ve_sigma_to_timestep
    assert S.karras_sigmas is S.karras_ve_sigmas
