"""Loop overhead of the compiled samplers: N sampling steps vs N x one model forward.

    python -m benchmarks.sampling_overhead --workdir=runs/ddpm_digits [--batch=100] [--steps=50]

Times (after compilation, block_until_ready, median of repeats) one jitted U-Net forward on a
batch, and ``jaxdiff.sampling.sample`` with DDIM for N steps on the same batch, and prints the
ratio time(N steps) / (N x time(forward)). 1.00 means the lax.scan loop adds nothing.
"""
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", "runs/ddpm_digits", "A trained run.")
_BATCH = flags.DEFINE_integer("batch", 100, "Batch size.")
_STEPS = flags.DEFINE_list("steps", ["25", "100"], "Sampling step counts.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats (median).")


def _median_time(fn, repeats):
    jax.block_until_ready(fn())  # compile + warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main(argv):
    logging.set_verbosity(logging.WARNING)
    from jaxdiff import pipelines, sampling

    run = pipelines.load_run(_WORKDIR.value)
    model, params, B = run.model, run.params, _BATCH.value
    x = jax.random.normal(jax.random.key(0), (B, *model.image_shape), jnp.float32)
    labels = jnp.arange(B, dtype=jnp.int32) % model.num_classes if model.conditional else None
    extra = {"params": params, **({"labels": labels} if labels is not None else {})}
    fn = model.label_model_fn if model.conditional else model.uncond_model_fn
    forward = jax.jit(lambda x, t, extra: fn(x, t, **extra))
    t = jnp.full((B,), 500.0, jnp.float32)
    t_fwd = _median_time(lambda: forward(x, t, extra), _REPEATS.value * 4)
    print(f"machine: {platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}, "
          f"jax {jax.__version__}; batch {B}, image {model.image_shape}")
    print(f"one forward: {t_fwd * 1e3:.2f} ms")
    print("| steps | N x forward (ms) | sample() (ms) | ratio |")
    print("| --- | --- | --- | --- |")
    for n in map(int, _STEPS.value):
        t_s = _median_time(lambda: sampling.sample(fn, run.schedule, x, method="ddim", num_steps=n,
                                                   extra_args=extra), _REPEATS.value)
        print(f"| {n} | {n * t_fwd * 1e3:.1f} | {t_s * 1e3:.1f} | {t_s / (n * t_fwd):.3f} |")


if __name__ == "__main__":
    app.run(main)
