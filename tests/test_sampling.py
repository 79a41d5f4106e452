"""Samplers against diffusers' schedulers, driven by one analytic model written in torch and in JAX.

The model is a smooth nonlinear function of x_t and t with a per-channel spatial mean (so NHWC vs
NCHW layout matters). Both sides start from the same x_T; errors are max|ours - ref| / max|ref|.
"""
from __future__ import annotations

import collections
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxdiff import sampling  # noqa: E402
from jaxdiff.schedules import (  # noqa: E402
    karras_ve_sigmas,
    make_schedule,
    timestep_to_ve_sigma,
    timesteps,
    ve_sigma_to_timestep,
    ve_sigmas_np,
)

T = 1000
SHAPE = (2, 8, 8, 3)  # NHWC
TOL = 1e-5
SCHED_KW = {
    "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
}
DIFFUSERS_PRED = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
# diffusers 0.42 + NumPy 2: "__array__ implementation doesn't accept a copy keyword" in set_timesteps.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
ERRORS = collections.defaultdict(float)  # max relative error per sampler, printed at the end


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print("\nmax relative error vs reference:", {k: f"{v:.2e}" for k, v in sorted(ERRORS.items())})


def schedule(kind):
    kw = SCHED_KW[kind]
    return make_schedule(kind, T, beta_start=kw["beta_start"], beta_end=kw["beta_end"])


SCHEDULES = {k: schedule(k) for k in SCHED_KW}


# ----------------------------------------------------------------------------- the analytic model
def jax_model(x, t):
    """x: [B, H, W, C], t: [B] float32."""
    a = (t / T)[:, None, None, None]
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    return jnp.tanh(0.5 * x) * jnp.cos(1.3 * a) + 0.1 * x * jnp.sin(2.0 * a) + 0.05 * mean


def torch_model(x, t):
    """x: [B, C, H, W], t: scalar timestep."""
    a = torch.as_tensor(t, dtype=torch.float32) / T
    mean = x.mean(dim=(2, 3), keepdim=True)
    return torch.tanh(0.5 * x) * torch.cos(1.3 * a) + 0.1 * x * torch.sin(2.0 * a) + 0.05 * mean


def numpy_model(x, t):
    """float64 twin of jax_model."""
    a = t / T
    return np.tanh(0.5 * x) * np.cos(1.3 * a) + 0.1 * x * np.sin(2.0 * a) + 0.05 * x.mean(axis=(1, 2), keepdims=True)


def noise(seed=0, shape=SHAPE):
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def to_nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def rel_err(ours, ref, name=None):
    err = float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())
    if name is not None:
        ERRORS[name] = max(ERRORS[name], err)
    return err


def run_diffusers(scheduler, x_T, num_steps, init_sigma=None, step_kwargs=None):
    """The diffusers pipeline loop; returns (x_0 NHWC, number of model calls)."""
    scheduler.set_timesteps(num_steps)
    x = to_nchw(x_T) * (scheduler.init_noise_sigma if init_sigma is None else init_sigma)
    calls = 0
    for i, t in enumerate(scheduler.timesteps):
        out = torch_model(scheduler.scale_model_input(x, t), t)
        calls += 1
        x = scheduler.step(out, t, x, **(step_kwargs(i) if step_kwargs else {})).prev_sample
    return x.permute(0, 2, 3, 1).numpy().astype(np.float64), calls


def init_sigma_ours(scheduler, num_steps):
    """jaxdiff's Euler/Heun start at sqrt(sigma_max^2 + 1) for every spacing (diffusers: leading only)."""
    scheduler.set_timesteps(num_steps)
    return math.sqrt(float(scheduler.sigmas.max()) ** 2 + 1.0)


# ----------------------------------------------------------------------------- grids
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps", [1, 7, 10, 25, 30, 50, 999, 1000])
def test_timesteps_match_diffusers(spacing, num_steps):
    offset = 1 if spacing == "leading" else 0
    ddim = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    ddim.set_timesteps(num_steps)
    np.testing.assert_array_equal(np.round(timesteps(T, num_steps, spacing, offset)), ddim.timesteps.numpy())
    euler = diffusers.EulerDiscreteScheduler(timestep_spacing=spacing, steps_offset=offset)
    euler.set_timesteps(num_steps)
    np.testing.assert_allclose(timesteps(T, num_steps, spacing, offset), euler.timesteps.numpy(), rtol=1e-6)


def test_karras_ve_sigmas_and_ve_sigma_timestep_maps():
    s = ve_sigmas_np(np.asarray(SCHEDULES["scaled_linear"].alphas_cumprod, np.float64))
    euler = diffusers.EulerDiscreteScheduler(**SCHED_KW["scaled_linear"], use_karras_sigmas=True)
    ref = euler._convert_to_karras(torch.tensor([s[-1], s[0]]), 20)
    np.testing.assert_allclose(karras_ve_sigmas(s[0], s[-1], 20), ref, rtol=1e-12)
    t = np.array([0.0, 0.5, 17.25, 998.9, 999.0])
    np.testing.assert_allclose(ve_sigma_to_timestep(timestep_to_ve_sigma(np.round(t), s), s), np.round(t), atol=1e-9)
    np.testing.assert_allclose(ve_sigma_to_timestep(karras_ve_sigmas(s[0], s[-1], 9), s),
                               euler._sigma_to_t(karras_ve_sigmas(s[0], s[-1], 9), np.log(s)), atol=1e-9)


# ----------------------------------------------------------------------------- ODE samplers vs diffusers
ODE_SAMPLERS = {
    "ddim": (diffusers.DDIMScheduler, dict(clip_sample=False)),
    "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2)),
    "euler": (diffusers.EulerDiscreteScheduler, {}),
    "heun": (diffusers.HeunDiscreteScheduler, {}),
}
CASES = [(m, k) for m in ODE_SAMPLERS for k in ([False, True] if m in sampling.KARRAS_METHODS else [False])]


def compare_ode(method, kind, num_steps, spacing, prediction, karras, scheduler_extra=None, **ours_extra):
    cls, cfg = ODE_SAMPLERS[method]
    cfg = dict(SCHED_KW[kind], **cfg, timestep_spacing=spacing, prediction_type=DIFFUSERS_PRED[prediction],
               **(scheduler_extra or {}))
    if karras:
        cfg["use_karras_sigmas"] = True
    scheduler = cls(**cfg)
    x_T = noise(num_steps)
    init = init_sigma_ours(cls(**cfg), num_steps) if method in ("euler", "heun") else None
    ref, calls = run_diffusers(scheduler, x_T, num_steps, init_sigma=init)
    ours = sampling.sample(jax_model, SCHEDULES[kind], jnp.asarray(x_T), method=method, num_steps=num_steps,
                           timestep_spacing=spacing, prediction=prediction, use_karras_sigmas=karras, **ours_extra)
    assert ours.dtype == jnp.float32 and ours.shape == SHAPE
    return rel_err(ours, ref, method + ("+karras" if karras else "")), calls


# diffusers' DDIM steps to t - T // N, off the linspace grid, so DDIM+linspace is compared with a
# float64 reference instead (test_ddim_linspace) and is not generated here.
ODE_PARITY = [
    (m, k, n, sp, kind)
    for m, k in CASES
    for n in (10, 25, 50)
    for sp in ("leading", "trailing", "linspace")
    for kind in ("linear", "scaled_linear")
    if not (m == "ddim" and sp == "linspace")
]


@pytest.mark.parametrize("method,karras,num_steps,spacing,kind", ODE_PARITY,
                         ids=[f"{m}{'-karras' if k else ''}-{n}-{sp}-{kind}" for m, k, n, sp, kind in ODE_PARITY])
def test_ode_sampler_matches_diffusers(method, karras, num_steps, spacing, kind):
    for prediction in ("eps", "v") if kind == "scaled_linear" else ("eps",):
        err, calls = compare_ode(method, kind, num_steps, spacing, prediction, karras)
        assert err < TOL, (prediction, err)
    if method == "heun":
        assert calls == 2 * num_steps - 1


@pytest.mark.parametrize("method,karras", CASES, ids=[m + ("-karras" if k else "") for m, k in CASES])
def test_x0_prediction_matches_diffusers(method, karras):
    spacing = "trailing" if method == "ddim" else "linspace"
    err, _ = compare_ode(method, "linear", 10, spacing, "x0", karras)
    assert err < TOL


@pytest.mark.parametrize("method", ["ddim", "dpmpp_2m", "euler", "heun"])
def test_steps_offset_matches_diffusers(method):
    """Stable Diffusion's configs: leading spacing with steps_offset=1."""
    cls, cfg = ODE_SAMPLERS[method]
    cfg = dict(SCHED_KW["scaled_linear"], **cfg, timestep_spacing="leading", steps_offset=1)
    init = init_sigma_ours(cls(**cfg), 10) if method in ("euler", "heun") else None
    x_T = noise(9)
    ref, _ = run_diffusers(cls(**cfg), x_T, 10, init_sigma=init)
    ours = sampling.sample(jax_model, SCHEDULES["scaled_linear"], jnp.asarray(x_T), method=method, num_steps=10,
                           timestep_spacing="leading", steps_offset=1)
    assert rel_err(ours, ref, method) < TOL


def test_default_spacing_is_diffusers_default():
    classes = dict(ddpm=diffusers.DDPMScheduler, euler_ancestral=diffusers.EulerAncestralDiscreteScheduler,
                   pndm=diffusers.PNDMScheduler, **{m: cls for m, (cls, _) in ODE_SAMPLERS.items()})
    assert set(classes) == set(sampling.METHODS)
    for method, cls in classes.items():
        assert sampling.DEFAULT_SPACING[method] == cls().config.timestep_spacing, method


def ddim_reference_f64(x_T, kind, num_steps, spacing):
    """DDIM (eta = 0) in float64 NumPy stepping along the grid itself: t_i -> t_{i+1} -> ... -> clean."""
    ab = np.asarray(SCHEDULES[kind].alphas_cumprod, np.float64)
    t = np.round(timesteps(T, num_steps, spacing)).astype(int)
    x = x_T.astype(np.float64)
    for i, t_i in enumerate(t):
        ab_prev = ab[t[i + 1]] if i + 1 < len(t) else 1.0
        eps = numpy_model(x, float(t_i))
        x0 = (x - np.sqrt(1 - ab[t_i]) * eps) / np.sqrt(ab[t_i])
        x = np.sqrt(ab_prev) * x0 + np.sqrt(1 - ab_prev) * eps
    return x


@pytest.mark.parametrize("num_steps", [10, 25, 50])
def test_ddim_linspace(num_steps):
    x_T = noise(3)
    ref = ddim_reference_f64(x_T, "scaled_linear", num_steps, "linspace")
    ours = sampling.sample(jax_model, SCHEDULES["scaled_linear"], jnp.asarray(x_T), method="ddim",
                           num_steps=num_steps, timestep_spacing="linspace")
    assert rel_err(ours, ref, "ddim (linspace, f64 ref)") < TOL
    # diffusers' DDIMScheduler jumps to t - T // N instead, which is off this grid.
    d = diffusers.DDIMScheduler(**SCHED_KW["scaled_linear"], clip_sample=False, timestep_spacing="linspace")
    assert rel_err(ours, run_diffusers(d, x_T, num_steps)[0]) > 1e-3
    # ... and on leading grids the float64 reference agrees with diffusers: the same DDIM.
    ref_leading = ddim_reference_f64(x_T, "scaled_linear", num_steps, "leading")
    d = diffusers.DDIMScheduler(**SCHED_KW["scaled_linear"], clip_sample=False)
    assert rel_err(run_diffusers(d, x_T, num_steps)[0], ref_leading) < TOL


# ----------------------------------------------------------------------------- x0 clipping / thresholding
def test_clip_and_dynamic_threshold_match_diffusers():
    # DDIM: clip with eps recomputed from the clipped x0 (use_clipped_model_output=True).
    for extra, ours in [
        (dict(clip_sample=True, clip_sample_range=1.0), dict(clip_x0=1.0)),
        (dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=3.0),
         dict(dynamic_threshold=(0.9, 3.0))),
    ]:
        d = diffusers.DDIMScheduler(**SCHED_KW["linear"], **extra)
        x_T = noise(5)
        ref, _ = run_diffusers(d, x_T, 25, step_kwargs=lambda i: dict(use_clipped_model_output=True))
        got = sampling.sample(jax_model, SCHEDULES["linear"], jnp.asarray(x_T), method="ddim", num_steps=25, **ours)
        assert rel_err(got, ref, "ddim (clip/threshold)") < TOL
        no_clip = sampling.sample(jax_model, SCHEDULES["linear"], jnp.asarray(x_T), method="ddim", num_steps=25)
        assert rel_err(no_clip, ref) > 1e-3  # the clipping is active in this test
    err, _ = compare_ode("dpmpp_2m", "linear", 25, "linspace", "eps", False,
                         scheduler_extra=dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=3.0),
                         dynamic_threshold=(0.9, 3.0))
    assert err < TOL
    err, _ = compare_ode("heun", "linear", 10, "linspace", "eps", False,
                         scheduler_extra=dict(clip_sample=True, clip_sample_range=1.0), clip_x0=1.0)
    assert err < TOL


def test_dynamic_threshold_imagen():
    x0 = jnp.asarray(noise(1) * 3.0)
    out = sampling.dynamic_threshold(x0, 0.9)
    s = np.quantile(np.abs(np.asarray(x0)).reshape(2, -1), 0.9, axis=1)
    s = s[:, None, None, None]
    np.testing.assert_allclose(out, np.clip(x0, -s, s) / s, rtol=1e-6)
    small = jnp.asarray(noise(1) * 0.1)  # s clamps to 1: plain clipping, here the identity
    np.testing.assert_allclose(sampling.dynamic_threshold(small, 0.9), small)


# ----------------------------------------------------------------------------- stochastic samplers
def rbg_key(seed):
    """Parity tests use rbg keys: on CPU they compile ~4x faster than threefry inside the scan (the
    default threefry key is exercised by test_stochastic_samplers_use_the_key)."""
    return jax.random.key(seed, impl="rbg")


def our_noise(key, num_steps):
    """The documented per-step noise: normal(split(key, num_steps)[i], x.shape)."""
    return [np.asarray(jax.random.normal(k, SHAPE, jnp.float32)) for k in jax.random.split(key, num_steps)]


def ddpm_reference(monkeypatch, x_T, zs, num_steps, variance, spacing, clip, float64=False):
    """diffusers' DDPMScheduler loop with its internal noise draws replaced by ``zs``, step by step.

    ``float64=True`` runs the same diffusers code on float64 betas / alphas_cumprod / samples.
    """
    d = diffusers.DDPMScheduler(**SCHED_KW["linear"], variance_type=variance, clip_sample=clip,
                                timestep_spacing=spacing)
    dtype = torch.float64 if float64 else torch.float32
    if float64:
        from jaxdiff.schedules import betas_np

        d.betas = torch.from_numpy(betas_np("linear", T))
        d.alphas = 1.0 - d.betas
        d.alphas_cumprod = torch.cumprod(d.alphas, dim=0)
        d.one = torch.tensor(1.0, dtype=dtype)
    d.set_timesteps(num_steps)
    step = {"i": 0}

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        i = step["i"]
        # jaxdiff adds no noise at the last step; diffusers draws there when the grid ends at t > 0.
        z = np.zeros(SHAPE, np.float32) if i == num_steps - 1 else zs[i]
        return to_nchw(z).to(dtype)

    monkeypatch.setattr(importlib.import_module("diffusers.schedulers.scheduling_ddpm"), "randn_tensor", fake_randn)
    x = to_nchw(x_T).to(dtype)
    for i, t in enumerate(d.timesteps):
        step["i"] = i
        x = d.step(torch_model(x, t).to(dtype), t, x).prev_sample
    return x.permute(0, 2, 3, 1).numpy().astype(np.float64)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("spacing,num_steps,clip", [("leading", 10, True), ("trailing", 25, False),
                                                    ("linspace", 50, True), ("leading", 1000, True)])
def test_ddpm_trajectory_matches_diffusers(monkeypatch, variance, spacing, num_steps, clip):
    """Full ancestral trajectory, fed the same per-step noise on both sides."""
    key, x_T = rbg_key(7), noise(11)
    zs = our_noise(key, num_steps)
    ours = sampling.sample(jax_model, SCHEDULES["linear"], jnp.asarray(x_T), method="ddpm", num_steps=num_steps,
                           key=key, variance=variance, timestep_spacing=spacing, clip_x0=1.0 if clip else None)
    ref32 = ddpm_reference(monkeypatch, x_T, zs, num_steps, variance, spacing, clip)
    if num_steps <= 50:
        assert rel_err(ours, ref32, "ddpm") < TOL
    else:
        # Over 1000 steps float32 round-off accumulates on both sides (diffusers also recomputes each
        # beta as 1 - alpha_bar_t / alpha_bar_{t-1} from a float32 cumprod): compare with the same
        # diffusers loop in float64, which we must track at least as well as diffusers' float32 run.
        ref64 = ddpm_reference(monkeypatch, x_T, zs, num_steps, variance, spacing, clip, float64=True)
        assert rel_err(ours, ref64, "ddpm (1000 steps, f64 ref)") < 3e-5
        assert rel_err(ours, ref64) < rel_err(ref32, ref64)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_set_alpha_to_one_false_matches_diffusers(eta):
    """Stable Diffusion's DDIM config: the last step lands on alphas_cumprod[0], not on x0."""
    key, num_steps = rbg_key(5), 10
    zs = our_noise(key, num_steps)
    cfg = dict(SCHED_KW["scaled_linear"], clip_sample=False, timestep_spacing="leading", steps_offset=1,
               set_alpha_to_one=False)
    x_T = noise(6)
    ref, _ = run_diffusers(diffusers.DDIMScheduler(**cfg), x_T, num_steps,
                           step_kwargs=lambda i: dict(eta=eta, variance_noise=to_nchw(zs[i])))
    final = float(np.asarray(SCHEDULES["scaled_linear"].alphas_cumprod)[0])
    ours = sampling.sample(jax_model, SCHEDULES["scaled_linear"], jnp.asarray(x_T), method="ddim",
                           num_steps=num_steps, eta=eta, key=key if eta else None, timestep_spacing="leading",
                           steps_offset=1, final_alpha_cumprod=final)
    assert rel_err(ours, ref, "ddim (set_alpha_to_one=False)") < TOL
    clean = sampling.sample(jax_model, SCHEDULES["scaled_linear"], jnp.asarray(x_T), method="ddim",
                            num_steps=num_steps, eta=eta, key=key if eta else None, timestep_spacing="leading",
                            steps_offset=1)
    assert rel_err(clean, ref) > 100 * TOL  # the option matters at this tolerance


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_eta_matches_diffusers(spacing):
    key, num_steps = rbg_key(3), 25
    zs = our_noise(key, num_steps)
    d = diffusers.DDIMScheduler(**SCHED_KW["scaled_linear"], clip_sample=False, timestep_spacing=spacing)
    x_T = noise(4)
    ref, _ = run_diffusers(d, x_T, num_steps, step_kwargs=lambda i: dict(eta=0.7, variance_noise=to_nchw(zs[i])))
    ours = sampling.sample(jax_model, SCHEDULES["scaled_linear"], jnp.asarray(x_T), method="ddim",
                           num_steps=num_steps, eta=0.7, key=key, timestep_spacing=spacing)
    assert rel_err(ours, ref, "ddim (eta=0.7)") < TOL


@pytest.mark.parametrize("method,kw", [("ddpm", {}), ("ddim", dict(eta=1.0))])
def test_stochastic_samplers_use_the_key(method, kw):
    x_T, s = jnp.asarray(noise(0)), SCHEDULES["linear"]
    a = sampling.sample(jax_model, s, x_T, method=method, num_steps=10, key=jax.random.key(0), **kw)
    b = sampling.sample(jax_model, s, x_T, method=method, num_steps=10, key=jax.random.key(0), **kw)
    c = sampling.sample(jax_model, s, x_T, method=method, num_steps=10, key=jax.random.key(1), **kw)
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-2
    with pytest.raises(ValueError, match="key"):
        sampling.sample(jax_model, s, x_T, method=method, num_steps=10, **kw)


# ----------------------------------------------------------------------------- compilation and calls
def test_heun_makes_2n_minus_1_model_calls():
    calls = []

    def counted(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return jax_model(x, t)

    for n in (1, 2, 10):
        calls.clear()
        sampling.sample_heun(counted, SCHEDULES["linear"], jnp.asarray(noise(0)), num_steps=n).block_until_ready()
        assert len(calls) == 2 * n - 1
    calls.clear()
    sampling.sample_euler(counted, SCHEDULES["linear"], jnp.asarray(noise(0)), num_steps=10).block_until_ready()
    assert len(calls) == 10


def test_no_retrace_on_new_noise_key_labels_guidance():
    traces = []

    def cond_fn(x, t, labels, *, params):
        traces.append(x.shape)  # runs at trace time only
        return jax_model(x, t) * params["scale"] + 0.01 * labels[:, None, None, None]

    guided = sampling.cfg_model_fn(cond_fn)
    assert sampling.cfg_model_fn(cond_fn) is guided  # cached: rebuilding it is free
    s = SCHEDULES["linear"]
    for method, kw in [("ddpm", {}), ("ddim", dict(eta=0.5)), ("dpmpp_2m", {}), ("heun", {})]:
        traces.clear()
        for seed, w in [(0, 1.0), (1, 7.5), (2, 3.0)]:
            extra = dict(labels=jnp.full((2,), float(seed)), null_cond=jnp.zeros((1,)), guidance_scale=w,
                         params={"scale": jnp.float32(1.0 + seed)})
            extra["cond"] = extra.pop("labels")
            sampling.sample(guided, s, jnp.asarray(noise(seed)), method=method, num_steps=10, key=rbg_key(seed),
                            extra_args=extra, **kw).block_until_ready()
        # one trace of the model per call site in the scan body (heun: 2), never again
        assert len(traces) == (2 if method == "heun" else 1), (method, traces)
        assert all(shape[0] == 4 for shape in traces)  # [x; x]: one batched forward for both branches


def test_cfg_equals_two_forward_formula():
    def cond_fn(x, t, c):
        return jax_model(x, t) + 0.3 * c[:, None, None, None] * jnp.sin(x)

    x, t = jnp.asarray(noise(2)), jnp.array([500.0, 20.0])
    c, null = jnp.array([1.0, -2.0]), jnp.zeros((2,))
    w = 4.0
    got = sampling.cfg_model_fn(cond_fn)(x, t, cond=c, null_cond=null, guidance_scale=w)
    eps_c, eps_u = cond_fn(x, t, c), cond_fn(x, t, null)
    np.testing.assert_allclose(got, eps_u + w * (eps_c - eps_u), rtol=1e-6, atol=1e-6)


def test_bf16_model_keeps_float32_sampler_arithmetic():
    def bf16_model(x, t):
        return jax_model(x.astype(jnp.bfloat16), t.astype(jnp.bfloat16))

    s = SCHEDULES["scaled_linear"]
    for method in ("ddim", "dpmpp_2m", "euler"):
        ref = sampling.sample(jax_model, s, jnp.asarray(noise(0)), method=method, num_steps=10)
        out = sampling.sample(bf16_model, s, jnp.asarray(noise(0)).astype(jnp.bfloat16), method=method, num_steps=10)
        assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
        assert rel_err(out, np.asarray(ref, np.float64)) < 0.1


def test_return_trajectory():
    x_T = jnp.asarray(noise(0))
    for method in ("ddim", "dpmpp_2m", "heun"):
        x0, traj = sampling.sample(jax_model, SCHEDULES["linear"], x_T, method=method, num_steps=7,
                                   return_trajectory=True)
        assert traj.shape == (7,) + SHAPE
        np.testing.assert_array_equal(traj[-1], x0)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs,match", [
    (dict(method="plms"), "ddpm.*ddim.*dpmpp_2m.*euler.*heun"),
    (dict(timestep_spacing="uniform"), "leading.*trailing.*linspace"),
    (dict(prediction="epsilon"), "eps.*x0.*v"),
    (dict(num_steps=0), r"num_steps.*\[1, T=1000\]"),
    (dict(num_steps=1001), r"num_steps.*\[1, T=1000\]"),
    (dict(eta=0.5, method="euler"), "eta applies to ddim"),
    (dict(use_karras_sigmas=True, method="ddim"), "use_karras_sigmas"),
    (dict(variance="learned", method="ddpm", key=jax.random.key(0)), "fixed_small.*fixed_large"),
    (dict(clip_x0=1.0, dynamic_threshold=0.99), "at most one"),
])
def test_clear_errors(kwargs, match):
    args = dict(method="ddim", num_steps=10) | kwargs
    with pytest.raises(ValueError, match=match):
        sampling.sample(jax_model, SCHEDULES["linear"], jnp.asarray(noise(0)), **args)


def test_x_T_must_be_floating():
    with pytest.raises(TypeError, match="floating"):
        sampling.sample(jax_model, SCHEDULES["linear"], jnp.zeros(SHAPE, jnp.int32), method="ddim", num_steps=10)


@pytest.mark.parametrize("spacing,num_steps,prediction", [("linspace", 10, "eps"), ("leading", 25, "v"),
                                                          ("trailing", 7, "eps")])
def test_euler_ancestral_trajectory_matches_diffusers(monkeypatch, spacing, num_steps, prediction):
    """EulerAncestralDiscreteScheduler fed the same per-step noise: normal(split(key, N)[i])."""
    key, x_T = rbg_key(3), noise(5)
    zs = our_noise(key, num_steps)
    ours = sampling.sample(jax_model, SCHEDULES["scaled_linear"], jnp.asarray(x_T), method="euler_ancestral",
                           num_steps=num_steps, key=key, timestep_spacing=spacing, prediction=prediction)
    d = diffusers.EulerAncestralDiscreteScheduler(**SCHED_KW["scaled_linear"], timestep_spacing=spacing,
                                                  prediction_type=DIFFUSERS_PRED[prediction])
    step = {"i": 0}

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        return to_nchw(zs[step["i"]]).to(dtype)

    monkeypatch.setattr(importlib.import_module("diffusers.schedulers.scheduling_euler_ancestral_discrete"),
                        "randn_tensor", fake_randn)
    d.set_timesteps(num_steps)
    x = to_nchw(x_T) * init_sigma_ours(d, num_steps)
    for i, t in enumerate(d.timesteps):
        step["i"] = i
        x = d.step(torch_model(d.scale_model_input(x, t), t), t, x).prev_sample
    ref = x.permute(0, 2, 3, 1).numpy().astype(np.float64)
    assert rel_err(ours, ref, "euler_ancestral") < TOL
    # The noise matters: another key gives other images; the same key the same ones.
    other = sampling.sample(jax_model, SCHEDULES["scaled_linear"], jnp.asarray(x_T), method="euler_ancestral",
                            num_steps=num_steps, key=rbg_key(4), timestep_spacing=spacing, prediction=prediction)
    assert rel_err(other, ref) > 1e-2
    with pytest.raises(ValueError, match="euler_ancestral is stochastic"):
        sampling.sample(jax_model, SCHEDULES["scaled_linear"], jnp.asarray(x_T), method="euler_ancestral",
                        num_steps=num_steps)


@pytest.mark.parametrize("spacing,num_steps,prediction,offset,alpha_to_one", [
    ("leading", 10, "eps", 1, False), ("leading", 25, "v", 0, True), ("linspace", 7, "eps", 0, False),
    ("trailing", 12, "v", 0, False), ("leading", 2, "eps", 1, False), ("leading", 1, "eps", 1, False)])
def test_pndm_matches_diffusers(spacing, num_steps, prediction, offset, alpha_to_one):
    """PNDMScheduler with skip_prk_steps (Stable Diffusion 1.x's scheduler): the same images, and
    num_steps + 1 model calls (one for a single step)."""
    d = diffusers.PNDMScheduler(**SCHED_KW["scaled_linear"], skip_prk_steps=True, set_alpha_to_one=alpha_to_one,
                                steps_offset=offset, timestep_spacing=spacing, prediction_type=DIFFUSERS_PRED[prediction])
    x_T = noise(num_steps)
    ref, calls = run_diffusers(d, x_T, num_steps)
    final = None if alpha_to_one else float(SCHEDULES["scaled_linear"].alphas_cumprod[0])
    ours = sampling.sample(jax_model, SCHEDULES["scaled_linear"], jnp.asarray(x_T), method="pndm",
                           num_steps=num_steps, timestep_spacing=spacing, steps_offset=offset, prediction=prediction,
                           final_alpha_cumprod=final)
    assert rel_err(ours, ref, "pndm") < TOL
    assert calls == (num_steps + 1 if num_steps > 1 else 1)
    with pytest.raises(ValueError, match="pndm takes eps or v predictions"):
        sampling.sample(jax_model, SCHEDULES["scaled_linear"], jnp.asarray(x_T), method="pndm", num_steps=3,
                        prediction="x0")


# ----------------------------------------------------------------------------- the bound parameterisation
def _toy_model(x, t, *, scale):
    """A smooth stand-in for a network: some function of x and t, the same whatever it is read as."""
    return jnp.tanh(x * scale) * (1.0 + t[:, None, None, None] / T)


@pytest.mark.parametrize("method", ["ddpm", "ddim", "dpmpp_2m", "euler", "pndm"])
def test_a_denoiser_brings_its_prediction_type(method):
    """sample(Denoiser(f, p)) is sample(f, prediction=p), bit for bit; a different explicit prediction
    is refused; CFG of a Denoiser is a Denoiser of the same type."""
    from jaxdiff.diffusion import Denoiser

    s = SCHEDULES["linear"]
    x_T = jax.random.normal(jax.random.key(0), SHAPE)
    kw = dict(method=method, num_steps=6, key=jax.random.key(1), extra_args={"scale": np.float32(0.7)})
    bound = Denoiser(_toy_model, "v")
    np.testing.assert_array_equal(np.asarray(sampling.sample(bound, s, x_T, **kw)),
                                  np.asarray(sampling.sample(_toy_model, s, x_T, prediction="v", **kw)))
    assert not np.array_equal(np.asarray(sampling.sample(bound, s, x_T, **kw)),
                              np.asarray(sampling.sample(_toy_model, s, x_T, **kw)))  # eps by default: differs
    np.testing.assert_array_equal(np.asarray(sampling.sample(bound, s, x_T, prediction="v", **kw)),
                                  np.asarray(sampling.sample(bound, s, x_T, **kw)))
    with pytest.raises(ValueError, match="bound to prediction 'v'; got prediction='eps'"):
        sampling.sample(bound, s, x_T, prediction="eps", **kw)
    def cond_fn(x, t, c, *, scale):
        return _toy_model(x, t, scale=scale) * c[:, None, None, None]

    guided = sampling.cfg_model_fn(Denoiser(cond_fn, "x0"))
    assert isinstance(guided, Denoiser) and guided.prediction == "x0"
    assert sampling.cfg_model_fn(cond_fn) is not guided and not isinstance(sampling.cfg_model_fn(cond_fn), Denoiser)


def test_loss_and_train_step_read_the_bound_prediction():
    from jaxdiff import diffusion
    from jaxdiff.models import DiffusionModel
    from jaxdiff.train.step import create_train_state, make_optimizer, make_train_step

    s = SCHEDULES["linear"]

    def apply_fn(params, x_t, t, batch, key):
        return jnp.tanh(x_t * params["w"]) + params["b"]

    params = {"w": jnp.float32(0.5), "b": jnp.zeros(SHAPE[1:], jnp.float32)}
    batch = {"image": jax.random.uniform(jax.random.key(2), SHAPE, minval=-1, maxval=1)}
    key = jax.random.key(3)
    for p in ("eps", "x0", "v"):
        want = diffusion.diffusion_loss(apply_fn, params, batch, key, schedule=s, prediction=p)[0]
        got = diffusion.diffusion_loss(diffusion.Denoiser(apply_fn, p), params, batch, key, schedule=s)[0]
        assert float(got) == float(want)
    opt = make_optimizer(learning_rate=1e-2)
    state = create_train_state(params, opt)
    a = make_train_step(diffusion.Denoiser(apply_fn, "v"), opt, s)(state, batch)[0]
    b = make_train_step(apply_fn, opt, s, prediction="v")(state, batch)[0]
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
    # The adapters hand out Denoisers of their own type and refuse an unknown one.
    from jaxdiff.nn.unet import UNet

    unet = UNet(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4)
    m = DiffusionModel(unet, (8, 8, 3), num_classes=10, prediction="v")
    assert (m.label_model_fn.prediction, m.uncond_model_fn.prediction, m.train_apply_fn().prediction) == ("v",) * 3
    assert m.label_model_fn is m.label_model_fn  # one object: the samplers' compile cache hits
    with pytest.raises(ValueError, match="diffusion.prediction must be one of"):
        DiffusionModel(unet, (8, 8, 3), prediction="epsilon")
