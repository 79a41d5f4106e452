"""Loop overhead of the compiled samplers: N sampling steps vs N x one model forward.

    python -m benchmarks.sampling_overhead --workdir=runs/ddpm_digits [--batch=100] [--steps=50]

Times (after compilation, block_until_ready, median of repeats) one jitted U-Net forward on a
batch, and ``jaxdiff.sampling.sample`` with DDIM for N steps on the same batch, and prints the
ratio time(N steps) / (N x time(forward)). 1.00 means the lax.scan loop adds nothing.
For each N the forward and the sampler are timed in alternating blocks
(``benchmarks.harness.interleave``) so that a drift of the machine's load hits both alike.
"""
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from benchmarks.harness import cpu_info, interleave

_WORKDIR = flags.DEFINE_string("workdir", "runs/ddpm_digits", "A trained run.")
_BATCH = flags.DEFINE_integer("batch", 100, "Batch size.")
_STEPS = flags.DEFINE_list("steps", ["25", "100"], "Sampling step counts.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats (median).")


def _timed_pair(forward, sampler, repeats, num_steps):
    """Median seconds of one forward and of one whole sampling call, measured interleaved."""
    runs = {"forward": lambda: jax.block_until_ready(forward()),
            "sample": lambda: jax.block_until_ready(sampler())}
    for fn in runs.values():
        fn()  # compile + warm up
    # Per block: as many forwards as the sampler makes model calls, then one sampling call.
    times = interleave(runs, steps=repeats * num_steps, blocks=repeats, pause=0.2,
                       calls={"sample": 1})
    return float(np.median(times["forward"])), float(np.median(times["sample"]))


def main(argv):
    logging.set_verbosity(logging.WARNING)
    from jaxdiff import parallel, runs, sampling, xla

    parallel.initialize_distributed()  # before anything touches the backend (no-op on one host)

    run = runs.load_run(_WORKDIR.value)
    model, params, B = run.model, run.params, _BATCH.value
    x = jax.random.normal(jax.random.key(0), (B, *model.image_shape), jnp.float32)
    labels = jnp.arange(B, dtype=jnp.int32) % model.num_classes if model.conditional else None
    extra = {"params": params, **({"labels": labels} if labels is not None else {})}
    fn = model.label_model_fn if model.conditional else model.uncond_model_fn
    # compiled as the sampler's loop is (jaxdiff.xla's options), or the ratio would compare two compilers
    forward = xla.jit(lambda x, t, extra: fn(x, t, **extra))
    t = jnp.full((B,), 500.0, jnp.float32)
    cpu = cpu_info()
    print(f"machine: {cpu['cpu']} ({cpu['cpu_cores']} cores, {cpu['cpu_isa']}), "
          f"{jax.devices()[0].device_kind}, jax {jax.__version__}; batch {B}, "
          f"image {model.image_shape}; median of {_REPEATS.value}")
    print("| steps | one forward (ms) | N x forward (ms) | sample() (ms) | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for n in map(int, _STEPS.value):
        t_fwd, t_s = _timed_pair(
            lambda: forward(x, t, extra),
            lambda: sampling.sample(fn, run.schedule, x, method="ddim", num_steps=n, extra_args=extra),
            _REPEATS.value, n)
        print(f"| {n} | {t_fwd * 1e3:.1f} | {n * t_fwd * 1e3:.1f} | {t_s * 1e3:.1f} | "
              f"{t_s / (n * t_fwd):.3f} |", flush=True)


if __name__ == "__main__":
    app.run(main)
