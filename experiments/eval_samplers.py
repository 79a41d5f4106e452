"""Sample quality of a trained digits run under several samplers, measured with ``jaxdiff.eval``.

    python -m experiments.eval_samplers --workdir=runs/ddpm_digits --num=500 \
        --samplers=ddpm:1000,ddim:25,dpmpp_2m:25 [--guidance=1.0] [--json=OUT.json]

For each ``method:steps`` it draws ``num`` samples (labels cycling over the classes, fixed seed),
and prints accuracy on the requested labels, the classifier-feature Frechet distance to the held-out
real digits (next to the real-vs-real floor) and the wall time.
"""
import json
import sys
import time

from absl import app, flags

from experiments import common

_WORKDIR = flags.DEFINE_string("workdir", "runs/ddpm_digits", "Run directory.")
_NUM = flags.DEFINE_integer("num", 500, "Samples per sampler.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")
_SAMPLERS = flags.DEFINE_list("samplers", ["ddpm:1000", "ddim:25", "dpmpp_2m:25"], "method:steps entries.")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (default: the config's).")
_BATCH = flags.DEFINE_integer("batch_size", 250, "Images per compiled sampler call.")
_JSON = flags.DEFINE_string("json", None, "Write the results as JSON here.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    common.start_jax()  # before anything touches the JAX backend
    import jax

    from jaxdiff import generation, runs
    from jaxdiff.eval import evaluate_digits

    run = runs.load_run(_WORKDIR.value)
    if run.config.data.name != "digits":
        print("error: this evaluation needs a model trained on the embedded digits.", file=sys.stderr)
        return 2
    rows = []
    for entry in _SAMPLERS.value:
        method, _, steps = entry.partition(":")
        t0 = time.perf_counter()
        images, labels = generation.generate(
            run.model, run.params, run.schedule, run.config, num=_NUM.value, key=jax.random.key(_SEED.value),
            batch_size=_BATCH.value, method=method, num_steps=int(steps) if steps else None, guidance=_GUIDANCE.value,
        )
        seconds = time.perf_counter() - t0
        m = evaluate_digits(images, labels, data_dir=run.config.data.data_dir)
        rows.append({"sampler": method, "steps": int(steps or run.config.sample_steps), "seconds": seconds, **m})
        print(f"{method:>9} {rows[-1]['steps']:>5} steps  accuracy {m['accuracy']:.3f}  frechet {m['frechet']:.2f} "
              f"(real-vs-real {m['frechet_real_vs_real']:.2f})  {seconds:.1f} s", flush=True)
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump({"workdir": _WORKDIR.value, "step": run.step, "num": _NUM.value, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
