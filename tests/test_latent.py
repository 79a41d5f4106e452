"""Latent diffusion: the KL autoencoder's loss and train step (vs float64 NumPy), the PatchGAN
hinge losses and their start step, VAE resume, the latent scale factor, a latent U-Net end to end,
and the error for a missing VAE run. Tiny configs (8x8 digits, f = 2 -> 4x4x4 latents).

Compilation dominates the time on a CPU: the tests share one tiny VAE run (with a discriminator)
and call the loop's own jitted steps, so each program compiles once (the persistent compilation
cache of conftest.py serves the repeats)."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _testutil import assert_trees_equal, leaves, override
from experiments.configs import ldm_digits, vae_digits
from jaxdiff import generation, parallel, runs
from jaxdiff.data.latent import LatentDataset
from jaxdiff.train import build
from jaxdiff.eval.psnr import psnr
from jaxdiff.nn.vae import DiagonalGaussian
from jaxdiff.train import Checkpointer, CheckpointError
from jaxdiff.train.loop import build_vae_training, train
from jaxdiff.train.vae_step import adaptive_weight, generator_adv_loss, hinge_d_loss, kl_loss, reconstruction_loss

pytestmark = pytest.mark.slow  # end-to-end VAE and latent training runs

VAE_TINY = {
    "data.image_size": 8,
    "model.block_out_channels": (8, 8),
    "model.layers_per_block": 1,
    "model.latent_channels": 4,
    "model.norm_num_groups": 4,
    "model.mid_block_add_attention": False,
    "disc.weight": 0.5,
    "disc.start": 2,
    "disc.ndf": 8,
    "disc.n_layers": 1,
    "disc.num_groups": 4,
    "train.num_steps": 4,
    "train.batch_size": 8,
    "train.warmup_steps": 0,
    "train.cosine_decay": False,
    "train.log_every": 1,
    "train.checkpoint_every": 2,
    "train.keep_checkpoints": 5,
}
LDM_TINY = {
    "train.eval_every": 0,
    "data.image_size": 8,
    "model.ch": 16,
    "model.ch_mult": (1,),
    "model.num_res_blocks": 1,
    "model.attn_resolutions": (),
    "model.num_groups": 8,
    "diffusion.num_timesteps": 100,
    "train.num_steps": 3,
    "train.batch_size": 8,
    "train.warmup_steps": 0,
    "train.cosine_decay": False,
    "train.log_every": 1,
    "train.checkpoint_every": 3,
    "train.num_samples": 0,
}


def vae_config(**kw):
    return override(vae_digits.get_config(), {**VAE_TINY, **kw})


def ldm_config(vae_workdir, **kw):
    return override(ldm_digits.get_config(), {**LDM_TINY, "vae.workdir": str(vae_workdir), **kw})


@pytest.fixture(scope="module", autouse=True)
def _cheap_compiles(xla_o0):
    """XLA -O0 for this module's programs (see conftest.xla_o0): compilation dominates here."""


# ---------------------------------------------------------------------------- float64 references
def np_recon(x, x_rec, kind):
    d = x_rec.astype(np.float64) - x.astype(np.float64)
    e = np.abs(d) if kind == "l1" else d * d
    return e.reshape(len(x), -1).sum(1)


def np_kl(mean, logvar):
    mean, logvar = mean.astype(np.float64), logvar.astype(np.float64)
    return 0.5 * (mean ** 2 + np.exp(logvar) - 1.0 - logvar).reshape(len(mean), -1).sum(1)


def test_losses_match_float64_numpy():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (3, 8, 8, 1)).astype(np.float32)
    x_rec = (x + 0.3 * rng.normal(size=x.shape)).astype(np.float32)
    mean = rng.normal(size=(3, 2, 2, 4)).astype(np.float32)
    logvar = rng.uniform(-4, 1, (3, 2, 2, 4)).astype(np.float32)
    for kind in ("l1", "l2"):
        got = np.asarray(reconstruction_loss(jnp.asarray(x), jnp.asarray(x_rec), kind))
        np.testing.assert_allclose(got, np_recon(x, x_rec, kind), rtol=1e-5)
    got = np.asarray(kl_loss(DiagonalGaussian(jnp.asarray(mean), jnp.asarray(logvar))))
    np.testing.assert_allclose(got, np_kl(mean, logvar), rtol=1e-5)
    with pytest.raises(ValueError, match="l1"):
        reconstruction_loss(jnp.asarray(x), jnp.asarray(x_rec), "l3")

    # Hinge losses of the PatchGAN and the adaptive weight.
    real = rng.normal(size=(4, 3, 3, 1)).astype(np.float32) * 2
    fake = rng.normal(size=(4, 3, 3, 1)).astype(np.float32) * 2
    r64, f64 = real.astype(np.float64), fake.astype(np.float64)
    want_d = 0.5 * (np.maximum(0, 1 - r64).mean() + np.maximum(0, 1 + f64).mean())
    np.testing.assert_allclose(float(hinge_d_loss(real, fake)), want_d, rtol=1e-6)
    np.testing.assert_allclose(float(generator_adv_loss(fake)), -f64.mean(), rtol=1e-6, atol=1e-7)
    assert float(hinge_d_loss(np.full(4, 2.0), np.full(4, -2.0))) == 0.0  # confident and right: no loss
    g1, g2 = rng.normal(size=(3, 3, 8, 1)), rng.normal(size=(3, 3, 8, 1)) * 1e-3
    want_w = min(np.linalg.norm(g1) / (np.linalg.norm(g2) + 1e-4), 1e4)
    np.testing.assert_allclose(float(adaptive_weight(jnp.asarray(g1, jnp.float32), jnp.asarray(g2, jnp.float32))),
                               want_w, rtol=1e-5)
    assert float(adaptive_weight(jnp.ones(3), jnp.zeros(3))) == 1e4  # clipped

    # PSNR on uint8 images vs the formula.
    a = rng.integers(0, 256, (5, 4, 4, 1)).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-3, 4, a.shape), 0, 255).astype(np.uint8)
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    assert psnr(a, b)["psnr"] == pytest.approx(10 * np.log10(255 ** 2 / mse), rel=1e-12)
    assert psnr(a, a)["psnr"] == np.inf and psnr(a, a)["num_exact"] == 5


def test_vae_step_matches_numpy_and_decreases_loss_on_fixed_batch(data_dir):
    c = vae_config()  # the config of the shared runs below: the same programs
    ds = build.make_dataset(c)
    mesh = parallel.make_mesh(1)
    t = build_vae_training(c, ds.image_shape, mesh)  # the loop's own jitted steps
    assert t.vae.latent_shape == (4, 4, 4) and t.step_for(1) is t.plain_step and t.step_for(2) is t.gan_step
    state = jax.jit(t.init_state, out_shardings=t.state_shardings)()
    batch = ds.batch(0)
    # The first step's loss, recomputed in float64 NumPy from the same posterior sample.
    x_rec, post = jax.jit(t.vae.train_apply)(state.params, batch["image"], jax.random.fold_in(jax.random.key(c.seed), 0))
    want = np_recon(batch["image"], np.asarray(x_rec), c.loss.recon).mean() + c.loss.kl_weight * np_kl(
        np.asarray(post.mean), np.asarray(post.logvar)).mean()
    losses = []
    for _ in range(8):
        state, m = t.plain_step(state, parallel.shard_batch(batch, mesh))
        losses.append(float(m["loss"]))
        assert bool(m["finite"]) and float(m["adv_weight"]) == 0.0
    assert losses[0] == pytest.approx(want, rel=1e-5)
    assert int(state.step) == 8
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.fixture(scope="module")
def vae_runs(data_dir, tmp_path_factory):
    """Tiny VAE runs with a discriminator from step 2: 'a' uninterrupted to step 4, 'r' stopped at 2, resumed."""
    d = tmp_path_factory.mktemp("vae")
    a = train(vae_config(), str(d / "a"))
    train(vae_config(**{"train.num_steps": 2}), str(d / "r"))
    r = train(vae_config(), str(d / "r"))
    return d, a, r


def test_vae_run_disc_start_resume_and_scale_factor(vae_runs):
    tmp_path, a, r = vae_runs
    assert a["step"] == 4 and np.isfinite(a["loss"])
    # Interrupted at step 2 (== disc.start), resumed to 4: identical to the uninterrupted run,
    # discriminator params and optimiser state included.
    for field in ("params", "ema_params", "opt_state", "disc_params", "disc_opt_state"):
        assert_trees_equal(getattr(a["state"], field), getattr(r["state"], field))

    # The discriminator starts after disc.start steps: no adversarial term and a frozen
    # discriminator for steps 1..2, both active for steps 3..4.
    lines = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl") if '"loss"' in l]
    assert [l["step"] for l in lines] == [1, 2, 3, 4]
    for l in lines:
        active = l["step"] > 2
        assert (l["adv_weight"] > 0) == active and (l["d_loss"] > 0) == active, l
    ck = Checkpointer(str(tmp_path / "a"), read_only=True)
    at2, meta2 = ck.restore(a["state"], step=2)
    meta4 = ck.restore_meta(4)
    ck.close()
    c = vae_config()
    t = build_vae_training(c, (8, 8, 1), parallel.make_mesh(1))
    init_disc = jax.jit(t.init_state, out_shardings=t.state_shardings)().disc_params  # the loop's init program
    assert_trees_equal(at2.disc_params, init_disc)
    assert any(not np.array_equal(x, y) for x, y in zip(leaves(init_disc), leaves(a["state"].disc_params)))

    # The latent scale factor: stored with every checkpoint, reloaded with the VAE, and equal to
    # 1 / std of posterior samples of the EMA autoencoder over the training split.
    assert meta2["latent"]["scale_factor"] != meta4["latent"]["scale_factor"]
    ae = build.load_vae(str(tmp_path / "a"))
    assert ae.step == 4 and ae.scale_factor == meta4["latent"]["scale_factor"]
    assert_trees_equal(ae.params, a["state"].ema_params)
    ds = build.make_dataset(c)
    images, _ = ds.examples(np.arange(ds.num_examples))
    mean, std = ae.vae.encode_images(ae.params, images)
    z = mean.astype(np.float64) + std * np.random.default_rng(c.seed).standard_normal(mean.shape)
    assert ae.scale_factor == pytest.approx(1.0 / z.std(), rel=1e-5)
    assert meta4["eval"]["split"] == "test" and np.isfinite(meta4["eval"]["psnr"])
    assert os.path.exists(tmp_path / "a" / "reconstructions.png")


@pytest.fixture(scope="module")
def vae_run(vae_runs):
    return vae_runs[0] / "a"


def test_latent_diffusion_end_to_end(vae_run, tmp_path):
    ae = build.load_vae(str(vae_run))
    out = train(ldm_config(vae_run), str(tmp_path / "ldm"))
    assert out["step"] == 3 and np.isfinite(out["loss"])
    # The cached data are the scaled posterior of each training image.
    ds = build.make_dataset(ldm_config(vae_run))
    assert isinstance(ds, LatentDataset) and ds.image_shape == (4, 4, 4)
    pixels, _ = ds.images.examples(ds.images.indices(5))
    mean, std = ae.vae.encode_images(ae.params, pixels)
    eps = np.random.Generator(np.random.PCG64([0, 5, 2])).standard_normal(mean.shape, np.float32)
    np.testing.assert_allclose(ds.batch(5)["image"], ae.scale_factor * (mean + std * eps), rtol=1e-5, atol=1e-6)
    # The run's metadata names the VAE; sampling as experiments.sample does decodes to pixels.
    meta = Checkpointer(str(tmp_path / "ldm"), read_only=True).restore_meta()
    assert meta["vae"]["workdir"] == str(vae_run) and meta["vae"]["step"] == 4
    assert meta["vae"]["scale_factor"] == ae.scale_factor
    run = runs.load_run(str(tmp_path / "ldm"))
    assert run.model.image_shape == (4, 4, 4) and run.model.output_shape == (8, 8, 1)
    images, labels = generation.generate(run.model, run.params, run.schedule, run.config, num=4,
                                        key=jax.random.key(0), method="ddim", num_steps=2)
    assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, [0, 1, 2, 3])
    # Resuming against another VAE run is refused.
    other = tmp_path / "other_vae"
    shutil.copytree(vae_run, other)
    with pytest.raises(CheckpointError, match="latents of the VAE run"):
        train(ldm_config(other, **{"train.num_steps": 4}), str(tmp_path / "ldm"))


def test_missing_or_wrong_vae_run_gives_clear_error(vae_run, data_dir, tmp_path):
    missing = tmp_path / "no_vae_here"
    with pytest.raises(build.VAENotReadyError) as e:
        train(ldm_config(missing), str(tmp_path / "ldm"))
    msg = str(e.value)
    assert str(missing) in msg and "python -m experiments.train --config=experiments/configs/vae_digits.py" in msg
    assert not (tmp_path / "ldm" / "checkpoints").exists()
    (missing / "checkpoints").mkdir(parents=True)
    with pytest.raises(build.VAENotReadyError, match="no checkpoint yet"):
        train(ldm_config(missing), str(tmp_path / "ldm"))
    with pytest.raises(build.VAENotReadyError, match="no checkpoint at step 7"):
        train(ldm_config(vae_run, **{"vae.step": 7}), str(tmp_path / "ldm"))
    with pytest.raises(ValueError, match="VAE .* was trained on"):
        train(ldm_config(vae_run, **{"data.image_size": 16}), str(tmp_path / "ldm"))
    # A VAE run is no diffusion model to sample from.
    with pytest.raises(ValueError, match="is a VAE"):
        runs.load_run(str(vae_run))
