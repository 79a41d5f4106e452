"""Tests for jaxdiff.diffusion against float64 NumPy/SciPy transcriptions of the papers and diffusers.

References:
  * Ho et al. 2020: eq. 4 (q(x_t|x_0)), eqs. 6-7 (posterior), eq. 11-12 (eps-parameterised mean),
    eq. 13 (discretised decoder), eq. 15 (x0 from eps).
  * Nichol & Dhariwal 2021 (improved-DDPM) ``normal_kl``, ``discretized_gaussian_log_likelihood``,
    ``_vb_terms_bpd`` (transcribed here in float64, with the exact normal CDF from scipy.stats.norm).
  * Salimans & Ho 2022: v = alpha eps - sigma x0.  Hang et al. 2023: min-SNR-gamma weights.
  * diffusers.DDPMScheduler: add_noise, get_velocity, step, _get_variance.
"""
import math

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest
import scipy.stats
import torch
from diffusers import DDPMScheduler

from jaxdiff import diffusion as D
from jaxdiff import schedules as S

T = 1000
LN2 = math.log(2.0)
SHAPE = (8, 4, 4, 3)
TS = np.array([0, 1, 2, 10, 100, 500, 998, 999])
SCHED = S.make_schedule("linear", T)


# ------------------------------------------------------------------ float64 references
def ref_tables(betas):
    """Ho et al. eqs. 4, 6, 7 in float64."""
    betas = np.asarray(betas, np.float64)
    ab = np.cumprod(1.0 - betas)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
    return dict(
        betas=betas,
        ab=ab,
        alpha=np.sqrt(ab),
        sigma=np.sqrt(1.0 - ab),
        post_var=post_var,
        post_logvar=np.log(np.concatenate([post_var[1:2], post_var[1:]])),
        coef1=np.sqrt(ab_prev) * betas / (1.0 - ab),
        coef2=np.sqrt(1.0 - betas) * (1.0 - ab_prev) / (1.0 - ab),
        large_var=np.concatenate([post_var[1:2], betas[1:]]),
    )


REF = ref_tables(np.linspace(1e-4, 0.02, T, dtype=np.float64))  # Ho et al.'s linear betas


def bc(v, t, ndim):
    """table[t] as [B, 1, ..., 1]."""
    return np.asarray(v)[np.asarray(t)].reshape((-1,) + (1,) * (ndim - 1))


def ref_x0_from_pred(prediction, pred, x_t, t):
    a, s = bc(REF["alpha"], t, x_t.ndim), bc(REF["sigma"], t, x_t.ndim)
    if prediction == "eps":  # Ho et al. eq. 15
        return (x_t - s * pred) / a
    if prediction == "x0":
        return pred
    return a * x_t - s * pred  # Salimans & Ho: x = alpha z - sigma v


def ref_normal_kl(m1, lv1, m2, lv2):
    return 0.5 * (-1.0 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))


def ref_disc_loglik(x, mean, log_scale):
    """log P(bin of x) under N(mean, exp(log_scale)^2), 256 bins, edge bins open (scipy, float64)."""
    x, mean, log_scale = np.broadcast_arrays(*(np.asarray(a, np.float64) for a in (x, mean, log_scale)))
    std = np.exp(log_scale)
    up, lo = (x - mean + 1 / 255) / std, (x - mean - 1 / 255) / std
    N = scipy.stats.norm
    with np.errstate(divide="ignore"):
        mid = np.where(lo > 0, np.log(N.sf(lo) - N.sf(up)), np.log(N.cdf(up) - N.cdf(lo)))
    return np.where(x < -0.999, N.logcdf(up), np.where(x > 0.999, N.logsf(lo), mid))


def ref_vb_terms_bpd(pred, x0, x_t, t, prediction, variance):
    """improved-DDPM's _vb_terms_bpd in float64."""
    nd = x_t.ndim
    x0_hat = ref_x0_from_pred(prediction, pred, x_t, t)
    c1, c2 = bc(REF["coef1"], t, nd), bc(REF["coef2"], t, nd)
    true_mean, true_lv = c1 * x0 + c2 * x_t, bc(REF["post_logvar"], t, nd)
    model_mean = c1 * x0_hat + c2 * x_t
    model_lv = true_lv if variance == "fixed_small" else bc(np.log(REF["large_var"]), t, nd)
    axes = tuple(range(1, nd))
    kl = np.mean(ref_normal_kl(true_mean, true_lv, model_mean, model_lv) * np.ones_like(x0), axis=axes) / LN2
    nll = -np.mean(ref_disc_loglik(x0, model_mean, 0.5 * model_lv), axis=axes) / LN2
    return np.where(np.asarray(t) == 0, nll, kl)


def ref_min_snr_weight(t, prediction, gamma):
    """Hang et al. 2023: weight min(SNR, gamma) on the x0 loss, expressed in each parameterisation."""
    snr = REF["ab"][t] / (1.0 - REF["ab"][t])
    w = np.minimum(snr, gamma)
    return {"x0": w, "eps": w / snr, "v": w / (snr + 1.0)}[prediction]


def f64(a):
    return np.asarray(a, np.float64)


def assert_close_scaled(ours, ref, scale, rtol=1e-6, what=""):
    """|ours - ref| <= rtol * scale elementwise (scale = sum of magnitudes of the terms that were added)."""
    err = np.abs(f64(ours) - ref) / np.maximum(scale, 1e-30)
    assert err.max() < rtol, f"{what}: max scaled error {err.max():.3g}"
    return float(err.max())


def data(seed=0, shape=SHAPE):
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(-1, 1, shape).astype(np.float32)
    noise = rng.standard_normal(shape).astype(np.float32)
    return rng, x0, noise


def diffusers_scheduler(dtype=torch.float32, **kw):
    """Stock DDPMScheduler, or (float64) the same code with float64 tables built from Ho's betas."""
    d = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=False, **kw)
    if dtype == torch.float64:
        d.betas = torch.tensor(REF["betas"])
        d.alphas = 1.0 - d.betas
        d.alphas_cumprod = torch.cumprod(d.alphas, 0)
        d.one = torch.tensor(1.0, dtype=torch.float64)
    return d


# ------------------------------------------------------------------ forward process
def test_q_sample_vs_reference_and_diffusers():
    _, x0, noise = data()
    t = TS
    out = f64(D.q_sample(SCHED, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise)))
    a, s = bc(REF["alpha"], t, 4), bc(REF["sigma"], t, 4)
    ref = a * x0 + s * noise  # Ho et al. eq. 4
    scale = np.abs(a * x0) + np.abs(s * noise)
    assert_close_scaled(out, ref, scale, 1e-6, "q_sample vs float64")
    d = diffusers_scheduler()
    theirs = f64(d.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)))
    # diffusers' float32 `1 - alphas_cumprod` carries its own rounding; ours may not be further off than it is.
    assert np.all(np.abs(out - theirs) <= np.abs(theirs - ref) + 1e-6 * scale)
    assert np.max(np.abs(out - theirs)) / np.max(np.abs(theirs)) < 2e-6  # normwise; measured 1.1e-6
    # scalar t broadcasts over the batch
    out5 = D.q_sample(SCHED, jnp.asarray(x0), 5, jnp.asarray(noise))
    np.testing.assert_allclose(out5, REF["alpha"][5] * x0 + REF["sigma"][5] * noise, rtol=1e-6, atol=1e-7)


def test_q_mean_variance_and_posterior_vs_reference():
    _, x0, noise = data(1)
    t = TS
    x_t = (bc(REF["alpha"], t, 4) * x0 + bc(REF["sigma"], t, 4) * noise).astype(np.float32)
    mean, var, log_var = D.q_mean_variance(SCHED, jnp.asarray(x0), jnp.asarray(t))
    assert var.shape == (8, 1, 1, 1) and log_var.shape == (8, 1, 1, 1)
    np.testing.assert_allclose(mean, bc(REF["alpha"], t, 4) * x0, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(var, bc(1 - REF["ab"], t, 4), rtol=1e-6)
    np.testing.assert_allclose(log_var, bc(np.log1p(-REF["ab"]), t, 4), rtol=1e-6)

    pm, pv, plv = D.q_posterior(SCHED, jnp.asarray(x0), jnp.asarray(x_t), jnp.asarray(t))
    c1, c2 = bc(REF["coef1"], t, 4), bc(REF["coef2"], t, 4)
    assert_close_scaled(pm, c1 * x0 + c2 * x_t, np.abs(c1 * x0) + np.abs(c2 * x_t), 1e-6, "posterior mean")
    np.testing.assert_allclose(pv, bc(REF["post_var"], t, 4), rtol=1e-6, atol=0)
    np.testing.assert_allclose(plv, bc(REF["post_logvar"], t, 4), rtol=1e-6)
    # at t = 0 the posterior is a point mass at x0, with the log-variance clipped to beta-tilde_1
    assert float(pv[0, 0, 0, 0]) == 0.0
    np.testing.assert_allclose(pm[0], x0[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("prediction,dtype", [("x0", "sample"), ("eps", "epsilon"), ("v", "v_prediction")])
def test_p_sample_step_vs_diffusers_step(prediction, dtype, variance):
    rng, x0, noise = data(2)
    d32 = diffusers_scheduler(prediction_type=dtype, variance_type=variance)
    d64 = diffusers_scheduler(torch.float64, prediction_type=dtype, variance_type=variance)
    worst = 0.0
    for k, t in enumerate([0, 1, 2, 50, 500, 999]):
        x_t = (REF["alpha"][t] * x0 + REF["sigma"][t] * noise).astype(np.float32)
        pred = rng.standard_normal(SHAPE).astype(np.float32) * (0.5 if prediction == "x0" else 1.0)
        outs = {}
        for name, d, tdt in [("32", d32, torch.float32), ("64", d64, torch.float64)]:
            step = d.step(torch.from_numpy(pred).to(tdt), t, torch.from_numpy(x_t).to(tdt),
                          generator=torch.Generator().manual_seed(k))
            z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(k), dtype=tdt).numpy()
            outs[name] = (f64(step.prev_sample), f64(step.pred_original_sample), z,
                          float(d._get_variance(t)) if t > 0 else None)
        prev64, x0_64, z64, var64 = outs["64"]
        ours = D.p_mean_variance(SCHED, jnp.asarray(pred), jnp.asarray(x_t), t, prediction=prediction, variance=variance)
        # the model's x0 and the posterior mean (diffusers' step without the noise)
        x0_scale = {"x0": np.abs(pred), "eps": (np.abs(x_t) + REF["sigma"][t] * np.abs(pred)) / REF["alpha"][t],
                    "v": REF["alpha"][t] * np.abs(x_t) + REF["sigma"][t] * np.abs(pred)}[prediction]
        assert_close_scaled(ours["x0"], x0_64, x0_scale, 1e-6, f"x0 t={t}")
        if t > 0:  # variance: ours vs diffusers' _get_variance (float64 tables, and the stock float32 ones)
            np.testing.assert_allclose(f64(ours["variance"]).ravel(), var64, rtol=1e-6)
            ref_var = (REF["post_var"] if variance == "fixed_small" else REF["betas"])[t]
            assert abs(float(np.ravel(ours["variance"])[0]) - outs["32"][3]) <= abs(outs["32"][3] - ref_var) + 1e-6 * ref_var
        # full ancestral step with diffusers' own noise
        for name in ("64", "32"):
            prev, _, z, _ = outs[name]
            got = f64(D.p_sample_step(SCHED, jnp.asarray(pred), jnp.asarray(x_t), t, jnp.asarray(z, jnp.float32),
                                      prediction=prediction, variance=variance))
            c1, c2 = REF["coef1"][t], REF["coef2"][t]
            sd = 0.0 if t == 0 else math.sqrt((REF["post_var"] if variance == "fixed_small" else REF["betas"])[t])
            scale = c1 * x0_scale + c2 * np.abs(x_t) + sd * np.abs(z)
            if name == "64":
                worst = max(worst, assert_close_scaled(got, prev, scale, 1e-6, f"step t={t}"))
            else:  # stock float32 diffusers: its 1 - alpha_bar / alpha_bar_prev cancels at small t
                ref = c1 * f64(ours["x0"]) + c2 * x_t + sd * z
                assert np.all(np.abs(got - prev) <= np.abs(prev - ref) + 2e-6 * scale)
    assert worst < 1e-6


def test_p_mean_variance_vs_reference():
    rng, x0, noise = data(3)
    t = TS
    x_t = (bc(REF["alpha"], t, 4) * x0 + bc(REF["sigma"], t, 4) * noise).astype(np.float32)
    pred = rng.standard_normal(SHAPE).astype(np.float32)
    for prediction in ("eps", "x0", "v"):
        for variance, table, log_table in [("fixed_small", REF["post_var"], REF["post_logvar"]),
                                           ("fixed_large", REF["large_var"], np.log(REF["large_var"]))]:
            out = D.p_mean_variance(SCHED, jnp.asarray(pred), jnp.asarray(x_t), jnp.asarray(t),
                                    prediction=prediction, variance=variance, clip_x0=1.0)
            x0_hat = np.clip(ref_x0_from_pred(prediction, pred, x_t, t), -1, 1)
            np.testing.assert_allclose(out["x0"], x0_hat, rtol=2e-5, atol=2e-6)  # x0 from eps at t=999: cond ~160
            c1, c2 = bc(REF["coef1"], t, 4), bc(REF["coef2"], t, 4)
            np.testing.assert_allclose(out["mean"], c1 * f64(out["x0"]) + c2 * x_t, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(out["variance"], bc(table, t, 4), rtol=1e-6)
            np.testing.assert_allclose(out["log_variance"], bc(log_table, t, 4), rtol=1e-6)
    # no clipping without clip_x0
    out = D.p_mean_variance(SCHED, jnp.asarray(3 * pred), jnp.asarray(x_t), jnp.asarray(t), prediction="x0")
    np.testing.assert_array_equal(out["x0"], 3 * pred)
    # p_sample_step: mean + exp(log_var / 2) z, without noise at t = 0
    z = rng.standard_normal(SHAPE).astype(np.float32)
    out = D.p_mean_variance(SCHED, jnp.asarray(pred), jnp.asarray(x_t), jnp.asarray(t))
    step = D.p_sample_step(SCHED, jnp.asarray(pred), jnp.asarray(x_t), jnp.asarray(t), jnp.asarray(z))
    expect = f64(out["mean"]) + (t > 0).reshape(-1, 1, 1, 1) * np.sqrt(bc(REF["post_var"], t, 4)) * z
    np.testing.assert_allclose(step, expect, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(step[0], out["mean"][0])


def test_conversions_round_trip_and_velocity():
    rng, x0, eps = data(4)
    t = np.array([0, 1, 10, 100, 400, 700, 900, 999])
    a, s = bc(REF["alpha"], t, 4), bc(REF["sigma"], t, 4)
    ja, js = (jnp.asarray(v, jnp.float32) for v in (a, s))
    x_t = (a * x0 + s * eps).astype(np.float32)
    # v against Salimans & Ho and against diffusers' get_velocity
    v = f64(D.x0_eps_to_pred("v", x0, eps, ja, js))
    assert_close_scaled(v, a * eps - s * x0, a * np.abs(eps) + s * np.abs(x0), 1e-6, "v")
    dv = f64(diffusers_scheduler().get_velocity(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t)))
    # diffusers' float32 (1 - alphas_cumprod) ** 0.5 has its own rounding: ours is no further from it than that
    assert np.all(np.abs(v - dv) <= np.abs(dv - (a * eps - s * x0)) + 1e-6 * (a * np.abs(eps) + s * np.abs(x0)))
    assert np.max(np.abs(v - dv)) / np.max(np.abs(dv)) < 1e-6  # normwise
    np.testing.assert_array_equal(D.x0_eps_to_pred("eps", x0, eps, ja, js), eps)
    np.testing.assert_array_equal(D.x0_eps_to_pred("x0", x0, eps, ja, js), x0)
    for prediction in ("eps", "x0", "v"):
        target = D.x0_eps_to_pred(prediction, x0, eps, ja, js)
        x0_hat, eps_hat = D.pred_to_x0_eps(prediction, target, x_t, ja, js)
        # x0 from eps divides by alpha (eps from x0 by sigma): error grows like 1/alpha (1/sigma).
        np.testing.assert_allclose(x0_hat, x0, atol=2e-6 / a.min(), rtol=0)
        np.testing.assert_allclose(eps_hat, eps, atol=3e-6 / s.min(), rtol=0)
        back = D.x0_eps_to_pred(prediction, x0_hat, eps_hat, ja, js)
        np.testing.assert_allclose(back, target, atol=1e-5, rtol=1e-5)
        # the same through predict_x0_eps with integer t
        x0_b, eps_b = D.predict_x0_eps(SCHED, target, jnp.asarray(x_t), jnp.asarray(t), prediction)
        np.testing.assert_allclose(x0_b, x0_hat, atol=1e-6 / a.min())


def test_q_sample_monte_carlo_moments():
    n, ts = 20_000, np.array([0, 100, 500, 999])
    x0_row = np.array([-1.0, -0.5, 0.0, 0.3, 0.8, 1.0], np.float32)
    x0 = jnp.tile(x0_row, (n * len(ts), 1))
    t = jnp.repeat(jnp.asarray(ts), n)
    noise = jax.random.normal(jax.random.PRNGKey(1234), x0.shape, jnp.float32)
    x_t = f64(jax.jit(D.q_sample)(SCHED, x0, t, noise)).reshape(len(ts), n, -1)
    for i, ti in enumerate(ts):
        mu, var = REF["alpha"][ti] * x0_row, 1.0 - REF["ab"][ti]  # Ho et al. eq. 4
        m, v = x_t[i].mean(0), x_t[i].var(0, ddof=1)
        assert np.all(np.abs(m - mu) < 5 * math.sqrt(var / n)), (ti, m - mu)
        assert np.all(np.abs(v - var) < 5 * var * math.sqrt(2 / (n - 1))), (ti, v / var)
        cm, cv, _ = D.q_mean_variance(SCHED, jnp.asarray(x0_row)[None], jnp.asarray([ti]))
        assert np.all(np.abs(m - f64(cm)[0]) < 5 * math.sqrt(var / n))
        np.testing.assert_allclose(float(cv.ravel()[0]), var, rtol=1e-6)


# ------------------------------------------------------------------ variational bound
def test_normal_kl_vs_reference_and_torch():
    rng = np.random.default_rng(5)
    m1, m2 = rng.normal(0, 2, 1000), rng.normal(0, 2, 1000)
    lv1, lv2 = rng.uniform(-10, 2, 1000), rng.uniform(-10, 2, 1000)
    ours = f64(D.normal_kl(*(jnp.asarray(a, jnp.float32) for a in (m1, lv1, m2, lv2))))
    ref = ref_normal_kl(*(np.float32(a).astype(np.float64) for a in (m1, lv1, m2, lv2)))
    tor = torch.distributions.kl_divergence(
        torch.distributions.Normal(torch.tensor(m1), torch.tensor(np.exp(0.5 * lv1))),
        torch.distributions.Normal(torch.tensor(m2), torch.tensor(np.exp(0.5 * lv2))),
    ).numpy()
    np.testing.assert_allclose(ref_normal_kl(m1, lv1, m2, lv2), tor, rtol=1e-9, atol=1e-12)
    # each term is O(1)..O(e^12); float32 rounding is relative to the largest term
    terms = 0.5 * (1 + np.abs(lv2 - lv1) + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))
    assert_close_scaled(ours, ref, terms, 2e-6, "normal_kl")
    assert float(D.normal_kl(0.3, -1.0, 0.3, -1.0)) == 0.0


def test_discretized_log_likelihood_vs_scipy():
    rng = np.random.default_rng(6)
    n = 4000
    k = rng.integers(0, 256, n)
    k[:200], k[200:400] = 0, 255  # the open edge bins
    x = k / 255.0 * 2 - 1
    log_scale = rng.uniform(-4.5, 0.5, n)
    mean = x + np.exp(log_scale) * rng.normal(0, 4, n)
    # + all 256 bins for a few Gaussians (their probabilities must sum to 1)
    gauss = [(0.0, -1.0), (0.7, -3.0), (-0.99, -5.0), (1.3, 0.3)]
    grid = np.arange(256) / 255.0 * 2 - 1
    # + far tails (probability ~ e^-1000) where float64 SciPy underflows: checked against mpmath
    tails = [(0.0, 0.5, math.log(0.01)), (0.5, -0.2, math.log(0.02)), (-1.0, 0.6, math.log(0.03)),
             (1.0, -0.6, math.log(0.03)), (-0.2, -0.25, math.log(0.001))]
    xs = np.concatenate([x, np.tile(grid, len(gauss)), [a for a, _, _ in tails]]).astype(np.float32)
    ms = np.concatenate([mean, np.repeat([m for m, _ in gauss], 256), [m for _, m, _ in tails]]).astype(np.float32)
    ls = np.concatenate([log_scale, np.repeat([v for _, v in gauss], 256), [v for _, _, v in tails]]).astype(np.float32)
    ours = f64(jax.jit(D.discretized_gaussian_log_likelihood)(xs, ms, ls))  # one compile for all cases
    assert np.all(np.isfinite(ours))
    ref = ref_disc_loglik(xs[:n], ms[:n], ls[:n])
    assert np.all(np.isfinite(ref))
    np.testing.assert_allclose(ours[:n], ref, rtol=2e-5, atol=2e-5)
    sums = np.exp(ours[n:n + 256 * len(gauss)]).reshape(len(gauss), 256).sum(1)
    np.testing.assert_allclose(sums, 1.0, atol=1e-5)
    with mpmath.workdps(60):  # 60 significant digits, restored afterwards
        for got, xv, m, lsv in zip(ours[-len(tails):], xs[-len(tails):], ms[-len(tails):], ls[-len(tails):]):
            std = mpmath.e ** mpmath.mpf(float(lsv))
            u = (mpmath.mpf(float(xv)) - mpmath.mpf(float(m)) + mpmath.mpf(1) / 255) / std
            lo = (mpmath.mpf(float(xv)) - mpmath.mpf(float(m)) - mpmath.mpf(1) / 255) / std
            if xv < -0.999:
                p = mpmath.ncdf(u)
            elif xv > 0.999:
                p = mpmath.ncdf(-lo)
            else:  # Phi(u) - Phi(lo), written on the side of the mean where it does not cancel
                p = mpmath.ncdf(-lo) - mpmath.ncdf(-u) if lo > 0 else mpmath.ncdf(u) - mpmath.ncdf(lo)
            assert float(mpmath.log(p)) < -100
            np.testing.assert_allclose(got, float(mpmath.log(p)), rtol=2e-5)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_vb_term_bpd_vs_reference(prediction, variance):
    rng, _, noise = data(7)
    x0 = (rng.integers(0, 256, SHAPE) / 255.0 * 2 - 1).astype(np.float32)
    x0[0, 0, 0] = -1.0
    x0[0, 0, 1] = 1.0
    t = np.array([0, 0, 1, 3, 50, 300, 700, 999])
    x_t = (bc(REF["alpha"], t, 4) * x0 + bc(REF["sigma"], t, 4) * noise).astype(np.float32)
    true = {"eps": noise, "x0": x0, "v": bc(REF["alpha"], t, 4) * noise - bc(REF["sigma"], t, 4) * x0}[prediction]
    pred = (true + 0.05 * rng.standard_normal(SHAPE)).astype(np.float32)  # a decent model
    ours = f64(D.vb_term_bpd(SCHED, jnp.asarray(pred), jnp.asarray(x0), jnp.asarray(x_t), jnp.asarray(t),
                             prediction=prediction, variance=variance))
    ref = ref_vb_terms_bpd(pred.astype(np.float64), x0, x_t, t, prediction, variance)
    assert ours.shape == (8,) and np.all(np.isfinite(ours))
    np.testing.assert_allclose(ours, ref, rtol=1e-3 if prediction == "eps" else 2e-4, atol=1e-5)


def test_vlb_oracle_x0_has_zero_kl():
    T_ = 100
    sch = S.make_schedule("linear", T_, beta_start=1e-3, beta_end=0.2)
    rng = np.random.default_rng(8)
    t = jnp.arange(1, T_)
    x0 = jnp.asarray(rng.integers(0, 256, (T_ - 1, 4, 4, 3)) / 255.0 * 2 - 1, jnp.float32)
    noise = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)

    @jax.jit
    def terms(x0, noise, t):
        x_t = D.q_sample(sch, x0, t, noise)
        return (D.vb_term_bpd(sch, x0, x0, x_t, t, prediction="x0"),  # oracle x0, every t >= 1
                D.vb_term_bpd(sch, x0, x0, x_t, t, prediction="x0", variance="fixed_large"))

    kl, kl_large = map(f64, terms(x0, noise, t))
    assert np.max(np.abs(kl)) < 1e-5, np.max(np.abs(kl))
    assert kl_large[0] > 1e-2  # beta_1 != beta-tilde_1 (they meet for large t): a real mismatch shows


def test_prior_bpd_closed_form():
    _, x0, _ = data(9)
    for sch, ab_T in [(SCHED, REF["ab"][-1]), (S.make_schedule("linear", 50), None)]:
        if ab_T is None:
            ab_T = ref_tables(np.linspace(1e-4, 0.02, 50))["ab"][-1]
        ours = f64(D.prior_bpd(sch, jnp.asarray(x0)))
        # KL(N(sqrt(ab) x0, 1 - ab) || N(0, 1)) per dim, averaged, in bits
        kl = 0.5 * (-1.0 - np.log1p(-ab_T) + (1.0 - ab_T) + ab_T * f64(x0) ** 2)
        ref = kl.reshape(len(x0), -1).mean(1) / LN2
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-8)
    zsnr = S.make_schedule("linear", 100, rescale_zero_terminal_snr=True)
    np.testing.assert_allclose(D.prior_bpd(zsnr, jnp.asarray(x0)), 0.0, atol=1e-7)


def test_calc_bpd_uniform_noise_images_jit_vmap():
    sch = S.make_schedule("linear", 100, beta_start=1e-3, beta_end=0.2)  # DDPM's betas scaled by 1000/T
    x0 = jnp.asarray(np.random.default_rng(3).integers(0, 256, (4, 8, 8, 3)) / 255.0 * 2 - 1, jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(4), 2)
    calc = lambda x, k: D.calc_bpd(lambda xt, t: jnp.zeros_like(xt), sch, x, k)  # noqa: E731  (eps = 0 model)
    outs = jax.jit(jax.vmap(calc, in_axes=(None, 0)))(x0, keys)  # vmap over noise keys, under jit
    for i in range(len(keys)):
        out = {k: f64(v[i]) for k, v in outs.items()}
        total = out["total_bpd"]
        assert out["terms_bpd"].shape == (4, 100) and out["x0_mse"].shape == (4, 100)
        assert np.all(np.isfinite(total)) and np.all(out["terms_bpd"][:, 1:] >= -1e-6)
        assert np.all(total >= 8.0) and np.all(total < 30.0), total  # >= the 8 bits of uniform 8-bit data
        np.testing.assert_allclose(total, out["terms_bpd"].sum(1) + out["prior_bpd"], rtol=1e-6)
        np.testing.assert_allclose(out["eps_mse"].mean(), 1.0, atol=0.05)  # eps_hat = 0: mean(eps^2) ~ 1
    assert not np.allclose(outs["total_bpd"][0], outs["total_bpd"][1])  # different noise per key


# ------------------------------------------------------------------ training loss
def linear_model(params, x_t, t, batch, key, record=None):
    if record is not None:
        record.update(x_t=x_t, t=t, key=key)
    return x_t @ params["w"] + params["b"] + params["c"] * (t / T)[:, None, None, None]


def make_params(seed=10, c=3):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.normal(0, 0.5, (c, c)), jnp.float32), "b": jnp.asarray(rng.normal(0, 0.1, c), jnp.float32),
            "c": jnp.float32(0.3)}


def ref_loss_and_grad(params, x0, t, eps, prediction, gamma):
    """NumPy float64 loss and its analytic gradient for the linear model."""
    w, b, c = (f64(params[k]) for k in ("w", "b", "c"))
    a, s = bc(REF["alpha"], t, 4), bc(REF["sigma"], t, 4)
    x_t = a * x0 + s * eps
    tt = (t / T).reshape(-1, 1, 1, 1)
    pred = x_t @ w + b + c * tt
    target = {"eps": eps, "x0": x0, "v": a * eps - s * x0}[prediction]
    wt = np.ones(len(t)) if gamma is None else ref_min_snr_weight(t, prediction, gamma)
    r = pred - target
    loss = np.mean(wt * np.mean(r**2, axis=(1, 2, 3)))
    g = 2 * wt.reshape(-1, 1, 1, 1) * r / r.size
    grads = {"w": np.einsum("bhwi,bhwj->ij", x_t, g), "b": g.sum((0, 1, 2)), "c": np.sum(g * tt)}
    return loss, grads, x_t


def drawn_t_eps(key, shape):
    """t and eps as diffusion_loss draws them: split(key, 3) -> (t, eps, model) keys."""
    t_key, eps_key, model_key = jax.random.split(key, 3)
    return jax.random.randint(t_key, (shape[0],), 0, T), jax.random.normal(eps_key, shape, jnp.float32), model_key


B_LOSS = 16
X0_LOSS = np.random.default_rng(11).uniform(-1, 1, (B_LOSS, 4, 4, 3)).astype(np.float32)


LOSS_COMBOS = [("eps", None), ("x0", 5.0), ("v", 5.0), ("eps", 5.0)]


def test_diffusion_loss_and_grads_vs_numpy():
    """One jit: the model's inputs, loss and grads for each (prediction, min-SNR), vmap over keys."""
    params, key = make_params(), jax.random.PRNGKey(12)
    batch = {"image": jnp.asarray(X0_LOSS)}
    keys = jax.random.split(jax.random.PRNGKey(14), 3)

    @jax.jit
    def run(params, key, keys):
        rec = {}
        D.diffusion_loss(lambda *a: linear_model(*a, record=rec), params, batch, key, schedule=SCHED)
        out = {"rec": rec}
        for prediction, gamma in LOSS_COMBOS:
            fn = lambda p: D.diffusion_loss(linear_model, p, batch, key, schedule=SCHED,  # noqa: E731
                                            prediction=prediction, min_snr_gamma=gamma)
            out[f"{prediction}-{gamma}"] = jax.value_and_grad(fn, has_aux=True)(params)
        out["vmap"] = jax.vmap(lambda k: D.diffusion_loss(linear_model, params, batch, k, schedule=SCHED,
                                                          prediction="v", min_snr_gamma=5.0)[0])(keys)
        out["draws"] = drawn_t_eps(key, X0_LOSS.shape)
        out["vmap_draws"] = jax.vmap(lambda k: drawn_t_eps(k, X0_LOSS.shape)[:2])(keys)
        return out

    out = run(params, key, keys)
    t, eps, model_key = (np.asarray(a) for a in out["draws"])
    t, eps = t.astype(np.int64), f64(eps)
    rec = out["rec"]  # apply_fn sees x_t, float32 t on 0..T-1, and the third split of the key
    assert rec["t"].dtype == jnp.float32 and rec["t"].shape == (B_LOSS,) and np.array_equal(f64(rec["t"]), t)
    np.testing.assert_array_equal(rec["key"], model_key)
    for prediction, gamma in LOSS_COMBOS:
        (loss, aux), grads = out[f"{prediction}-{gamma}"]
        ref_loss, ref_grads, ref_xt = ref_loss_and_grad(params, f64(X0_LOSS), t, eps, prediction, gamma)
        np.testing.assert_allclose(rec["x_t"], ref_xt, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
        if gamma is None:
            np.testing.assert_allclose(float(aux["mse"]), ref_loss, rtol=1e-5)  # unweighted: loss == mse
        for k in params:  # gradients flow, and equal the analytic float64 gradient
            assert np.all(np.isfinite(f64(grads[k]))) and np.any(f64(grads[k]) != 0)
            np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6 * np.abs(ref_grads[k]).max())
    for i, k in enumerate(keys):  # vmap over keys == the NumPy loss for each key
        t_i, eps_i = np.asarray(out["vmap_draws"][0][i]), f64(out["vmap_draws"][1][i])
        np.testing.assert_allclose(out["vmap"][i], ref_loss_and_grad(params, f64(X0_LOSS), t_i, eps_i, "v", 5.0)[0],
                                   rtol=1e-5)


def test_min_snr_weights_vs_paper():
    t = np.arange(T)
    for prediction in ("eps", "x0", "v"):
        for gamma in (1.0, 5.0, 20.0):
            ours = f64(D.loss_weight(SCHED, jnp.asarray(t), prediction, gamma))
            err = np.max(np.abs(ours - ref_min_snr_weight(t, prediction, gamma)) / ref_min_snr_weight(t, prediction, gamma))
            assert err < 1e-6, (prediction, gamma, err)
        np.testing.assert_array_equal(D.loss_weight(SCHED, jnp.asarray(t), prediction, None), np.ones(T, np.float32))
    # zero terminal SNR: the eps weight min(SNR, gamma) / SNR tends to 1, it must not be 0/0
    zsnr = S.make_schedule("linear", T, rescale_zero_terminal_snr=True)
    w = {p: f64(D.loss_weight(zsnr, jnp.asarray([0, T - 1]), p, 5.0)) for p in ("eps", "x0", "v")}
    np.testing.assert_allclose(w["eps"][1], 1.0)
    np.testing.assert_allclose([w["x0"][1], w["v"][1]], 0.0)


# ------------------------------------------------------------------ jit / vmap
COMBOS = [("eps", "fixed_small", None), ("x0", "fixed_large", 1.0), ("v", "fixed_small", 1.0)]


def _outputs(x0, noise, x_t, pred, x0q, t, batched):
    """Every public function on one set of inputs; batched=False is the per-example view (scalar t)."""
    b = (lambda a: a) if batched else (lambda a: a[None])  # noqa: E731  add a batch axis where one is needed
    u = (lambda a: a) if batched else (lambda a: a[0])  # noqa: E731
    full = lambda vs: [jnp.broadcast_to(v, x0.shape) for v in vs]  # noqa: E731
    a, s = D.alpha_sigma(SCHED, t, x0)
    out = {
        "q_sample": D.q_sample(SCHED, x0, t, noise),
        "q_mean_variance": full(D.q_mean_variance(SCHED, x0, t)),
        "q_posterior": full(D.q_posterior(SCHED, x0, x_t, t)),
        "alpha_sigma": full((a, s)),
        "normal_kl": D.normal_kl(x0, pred, x_t, noise),
        "disc_ll": D.discretized_gaussian_log_likelihood(x0q, x_t, 0.3 * pred - 2.0),
        "prior_bpd": u(D.prior_bpd(SCHED, b(x0))),
    }
    for prediction, variance, clip in COMBOS:
        kw = dict(prediction=prediction, variance=variance, clip_x0=clip)
        k = f"{prediction}-{variance}"
        out["predict_x0_eps-" + k] = D.predict_x0_eps(SCHED, pred, x_t, t, prediction)
        out["pred_to_x0_eps-" + k] = D.pred_to_x0_eps(prediction, pred, x_t, a, s)
        out["x0_eps_to_pred-" + k] = D.x0_eps_to_pred(prediction, x0, noise, a, s)
        out["loss_weight-" + k] = D.loss_weight(SCHED, t, prediction, 5.0)
        out["p_mean_variance-" + k] = {n: jnp.broadcast_to(v, x0.shape)
                                       for n, v in D.p_mean_variance(SCHED, pred, x_t, t, **kw).items()}
        out["p_sample_step-" + k] = D.p_sample_step(SCHED, pred, x_t, t, noise, **kw)
        out["vb_term_bpd-" + k] = u(D.vb_term_bpd(SCHED, b(pred), b(x0q), b(x_t), t if batched else t[None], **kw))
    return out


def test_every_function_under_jit_and_vmap():
    rng, x0, noise = data(13)
    t = TS
    x_t = (bc(REF["alpha"], t, 4) * x0 + bc(REF["sigma"], t, 4) * noise).astype(np.float32)
    pred = rng.standard_normal(SHAPE).astype(np.float32)
    x0q = (np.round((x0 + 1) * 127.5) / 127.5 - 1).astype(np.float32)
    args = tuple(map(jnp.asarray, (x0, noise, x_t, pred, x0q, t)))
    eager = _outputs(*args, batched=True)
    jitted, vmapped = jax.jit(lambda *a: (_outputs(*a, batched=True),  # one compile for both
                                          jax.vmap(lambda *e: _outputs(*e, batched=False))(*a)))(*args)
    assert jax.tree.structure(eager) == jax.tree.structure(jitted) == jax.tree.structure(vmapped)
    for path, ref in jax.tree_util.tree_leaves_with_path(eager):
        for got in (jitted, vmapped):
            leaf = got
            for p in path:
                leaf = leaf[p.key if hasattr(p, "key") else p.idx]
            np.testing.assert_allclose(leaf, ref, rtol=2e-6, atol=2e-6, err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------------------ bad input
def test_bad_input_raises_clearly():
    _, x0, noise = data(15)
    x0, noise = jnp.asarray(x0), jnp.asarray(noise)
    for bad_t in ([-1] * 8, [T] * 8, T, -1):
        with pytest.raises(ValueError, match="out of range"):
            D.q_sample(SCHED, x0, jnp.asarray(bad_t), noise)
    with pytest.raises(ValueError, match="out of range"):
        D.q_posterior(SCHED, x0, x0, jnp.full((8,), T))
    with pytest.raises(ValueError, match="out of range"):
        D.p_mean_variance(SCHED, x0, x0, jnp.full((8,), -3))
    with pytest.raises(TypeError, match="integer"):
        D.q_sample(SCHED, x0, jnp.full((8,), 5.0), noise)
    with pytest.raises(TypeError, match="integer"):
        D.vb_term_bpd(SCHED, x0, x0, x0, 5.0)
    for bad_shape in ((7,), (8, 1), (9,)):
        with pytest.raises(ValueError, match="shape"):
            D.q_sample(SCHED, x0, jnp.zeros(bad_shape, jnp.int32), noise)
    with pytest.raises(ValueError, match="[Ss]hape mismatch"):
        D.q_sample(SCHED, x0, jnp.zeros((8,), jnp.int32), noise[:, :2])
    with pytest.raises(ValueError, match="[Ss]hape mismatch"):
        D.q_posterior(SCHED, x0, x0[:4], jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="[Ss]hape mismatch"):
        D.p_sample_step(SCHED, x0, x0, jnp.zeros((8,), jnp.int32), noise[:4])
    t = jnp.zeros((8,), jnp.int32)
    for call in (
        lambda: D.predict_x0_eps(SCHED, x0, x0, t, "epsilon"),
        lambda: D.pred_to_x0_eps("sample", x0, x0, 1.0, 0.0),
        lambda: D.x0_eps_to_pred("v_prediction", x0, x0, 1.0, 0.0),
        lambda: D.p_mean_variance(SCHED, x0, x0, t, prediction="score"),
        lambda: D.loss_weight(SCHED, t, "epsilon", 5.0),
        lambda: D.diffusion_loss(linear_model, make_params(), {"image": x0}, jax.random.PRNGKey(0),
                                 schedule=SCHED, prediction="velocity"),
    ):
        with pytest.raises(ValueError, match="prediction") as e:
            call()
        assert all(p in str(e.value) for p in ("'eps'", "'x0'", "'v'"))
    for call in (
        lambda: D.p_mean_variance(SCHED, x0, x0, t, variance="learned"),
        lambda: D.p_sample_step(SCHED, x0, x0, t, noise, variance="fixed_large_log"),
        lambda: D.vb_term_bpd(SCHED, x0, x0, x0, t, variance="learned_range"),
    ):
        with pytest.raises(ValueError, match="variance") as e:
            call()
        assert "fixed_small" in str(e.value) and "fixed_large" in str(e.value)
