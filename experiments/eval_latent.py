"""Latent vs pixel-space diffusion on the 32x32 digits: VAE reconstruction PSNR, sample quality and
the cost of a training step.

    python -m experiments.eval_latent --vae=runs/vae_digits --ldm=runs/ldm_digits \
        --pixel=runs/ddpm_digits32 --num=100 [--json=OUT.json]

Prints (and writes as JSON):
- the VAE's reconstruction PSNR on the held-out digits ``test`` split (300 images, decoded posterior
  means rounded to uint8), and its latent scale factor;
- for each diffusion run: ``num`` samples (labels cycling 0..9, the run's sampler, fixed seed)
  scored by ``jaxdiff.eval.evaluate_digits`` at 32x32 (the classifier trained on the real digits
  resized to 32x32 as the training data are) and, downsampled to 8x8 with the data pipeline's
  resize (PIL bicubic, antialiased), at the digits' native 8x8;
- the median ms per jitted train step of each run's config at its batch size (or --timing_batch;
  same process, interleaved, after compilation); the latent step excludes the one-off encoding of
  the dataset (timed separately: ``encode_seconds``).
"""
import json
import sys
import time

from absl import app, flags

from experiments import common

_VAE = flags.DEFINE_string("vae", "runs/vae_digits", "VAE run directory.")
_LDM = flags.DEFINE_string("ldm", "runs/ldm_digits", "Latent diffusion run directory ('' to skip).")
_PIXEL = flags.DEFINE_string("pixel", "runs/ddpm_digits32", "Pixel-space 32x32 run directory ('' to skip).")
_NUM = flags.DEFINE_integer("num", 100, "Samples per model.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")
_TIMING_STEPS = flags.DEFINE_integer("timing_steps", 10, "Timed train steps per model (0 = skip timing).")
_TIMING_BATCH = flags.DEFINE_integer("timing_batch", None, "Batch size of the timed steps (default: each run's).")
_JSON = flags.DEFINE_string("json", None, "Write the results as JSON here.")


def _train_step_ms(loaded, steps, batch_size=None):
    """Median / min ms per train step of each run's config, interleaved so load hits both alike."""
    import jax
    import numpy as np

    from jaxdiff import xla
    from jaxdiff.train import create_train_state, make_optimizer, make_train_step

    fns = {}
    for name, run in loaded.items():
        c = run.config
        opt = make_optimizer(learning_rate=c.train.lr)
        state = create_train_state(run.params, opt)
        step = xla.jit(make_train_step(run.model.train_apply_fn(c.diffusion.p_uncond), opt, run.schedule,
                                       ema_decay=c.train.ema_decay), donate_argnums=0)
        b = batch_size or c.train.batch_size
        rng = np.random.default_rng(0)
        batch = {"image": rng.standard_normal((b, *run.model.image_shape)).astype(np.float32),
                 "label": (np.arange(b) % 10).astype(np.int32)}
        for _ in range(2):  # compile + warm up
            state, _m = step(state, batch)
        jax.block_until_ready(state)
        fns[name] = [step, state, batch, []]
    for _ in range(steps):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f[1], _m = f[0](f[1], f[2])
            jax.block_until_ready(f[1])
            f[3].append(time.perf_counter() - t0)
    return {name: {"batch_size": int(f[2]["image"].shape[0]), "input_shape": list(f[2]["image"].shape[1:]),
                   "ms_median": 1e3 * float(np.median(f[3])), "ms_min": 1e3 * float(np.min(f[3])), "steps": steps}
            for name, f in fns.items()}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    common.start_jax()  # before anything touches the JAX backend
    import jax
    import numpy as np

    from jaxdiff import generation, runs
    from jaxdiff.train import build
    from jaxdiff.data import real_images, resize_image
    from jaxdiff.eval import evaluate_digits
    from jaxdiff.eval.psnr import digits_reconstruction_psnr

    out = {}
    try:
        ae = build.load_vae(_VAE.value)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = ae.vae.image_shape[0]
    data_dir = ae.config.data.data_dir
    t0 = time.perf_counter()
    r = digits_reconstruction_psnr(lambda x: ae.vae.reconstruct(ae.params, x), size, data_dir=data_dir)
    train_images, _ = real_images("digits", "train", size, data_dir)
    ae.encode(np.array(train_images[:1]))  # compile
    t1 = time.perf_counter()
    ae.encode(np.array(train_images))
    out["vae"] = {"workdir": ae.workdir, "step": ae.step, "scale_factor": ae.scale_factor,
                  "latent_shape": list(ae.vae.latent_shape), "seconds": t1 - t0,
                  "encode_seconds": time.perf_counter() - t1, "encode_num": len(train_images), **r}
    print(f"VAE {ae.workdir} step {ae.step}: test PSNR {r['psnr']:.2f} dB (per-image mean {r['psnr_per_image_mean']:.2f}), "
          f"MAE {r['mae']:.2f}/255, scale factor {ae.scale_factor:.5f}, latents {tuple(ae.vae.latent_shape)}; "
          f"encoding the {len(train_images)} training images once: {out['vae']['encode_seconds']:.2f} s", flush=True)

    loaded = {}
    for name, wd in (("latent", _LDM.value), ("pixel", _PIXEL.value)):
        if not wd:
            continue
        run = runs.load_run(wd)
        loaded[name] = run
        t0 = time.perf_counter()
        images, labels = generation.generate(run.model, run.params, run.schedule, run.config, num=_NUM.value,
                                            key=jax.random.key(_SEED.value))
        seconds = time.perf_counter() - t0
        small = np.stack([resize_image(im, 8) for im in images])
        m32 = evaluate_digits(images, labels, data_dir=data_dir)
        m8 = evaluate_digits(small, labels, data_dir=data_dir)
        s = generation.sampler_settings(run.config)
        out[name] = {"workdir": wd, "step": run.step, "batch_size": run.config.train.batch_size,
                     "train_steps": run.config.train.num_steps, "sampler": f"{s['method']}:{s['num_steps']}",
                     "sample_seconds": seconds, "eval_32px": m32, "eval_8px": m8}
        print(f"{name:>6} {wd} (step {run.step}, batch {run.config.train.batch_size}, {s['method']} {s['num_steps']} "
              f"steps): 32px accuracy {m32['accuracy']:.3f} frechet {m32['frechet']:.2f} (real {m32['frechet_real_vs_real']:.2f}); "
              f"8px accuracy {m8['accuracy']:.3f} frechet {m8['frechet']:.2f} (real {m8['frechet_real_vs_real']:.2f}); "
              f"sampling {seconds:.1f} s", flush=True)
    if loaded and _TIMING_STEPS.value > 0:
        out["train_step"] = _train_step_ms(loaded, _TIMING_STEPS.value, _TIMING_BATCH.value)
        for name, t in out["train_step"].items():
            print(f"train step {name:>6}: input {tuple(t['input_shape'])} batch {t['batch_size']}: "
                  f"{t['ms_median']:.1f} ms median ({t['ms_min']:.1f} min) over {t['steps']} steps", flush=True)
    out["device"] = str(jax.devices()[0].device_kind)
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
