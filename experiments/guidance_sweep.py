"""Classifier-free guidance sweep of a class-conditional digits run (how the main job's default was chosen).

    python -m experiments.guidance_sweep --workdir=runs/ddpm_digits --num=500 --guidance=1,1.5,2,2.5,3,4 \
        [--json=sweep.json] [--svg=docs/figures/guidance_sweep.svg]

For each scale: ``num`` samples (labels 0..9 cycling, the same key for every scale) with the run's
sampler, scored by the project classifier (accuracy on the requested label, Frechet distance of its
features to the real test digits and the real-vs-real floor at the same N) and by an independent
scikit-learn SVM on sklearn's raw digits (accuracy, within-class diversity against real digits).
"""
import json

from absl import app, flags

from experiments import common

_WORKDIR = flags.DEFINE_string("workdir", "runs/ddpm_digits", "Run directory.")
_NUM = flags.DEFINE_integer("num", 500, "Samples per guidance scale.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed (the same for every scale).")
_GUIDANCE = flags.DEFINE_list("guidance", ["1", "1.5", "2", "2.5", "3", "4"], "Guidance scales.")
_SAMPLER = flags.DEFINE_string("sampler", None, "Sampler (default: the config's sample.method).")
_STEPS = flags.DEFINE_integer("steps", None, "Sampling steps (default: the config's sample.num_steps).")
_BATCH = flags.DEFINE_integer("batch_size", 250, "Images per compiled sampler call.")
_JSON = flags.DEFINE_string("json", None, "Write the rows as JSON here.")
_SVG = flags.DEFINE_string("svg", None, "Write a plot of the sweep (SVG) here.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    common.start_jax()
    from jaxdiff import parallel, runs
    from jaxdiff.eval.digits_sweep import guidance_sweep, svg_plot

    try:
        scales = [float(g) for g in _GUIDANCE.value]
    except ValueError:
        return common.fail(f"--guidance takes numbers separated by commas, got {','.join(_GUIDANCE.value)!r}.", 2)
    try:
        run = runs.load_run(_WORKDIR.value)
        rows = guidance_sweep(run, scales, num=_NUM.value, seed=_SEED.value, batch_size=_BATCH.value,
                              log=print if parallel.is_writer() else None, method=_SAMPLER.value,
                              num_steps=_STEPS.value)
    except (FileNotFoundError, runs.CheckpointError, ValueError) as e:
        return common.fail(" ".join(str(e).split()), 2)
    if not parallel.is_writer():
        return 0
    print(f"\n| guidance | accuracy (classifier) | accuracy (SVM judge) | Frechet | real-vs-real | ratio | diversity |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['guidance']:g} | {r['accuracy']:.3f} | {r['judge_accuracy']:.3f} | {r['frechet']:.2f} | "
              f"{r['frechet_real_vs_real']:.2f} | {r['frechet_ratio']:.2f} | {r['diversity_ratio']:.2f} |")
    print(f"SVM judge on the 300 held-out real digits: {rows[0]['judge_held_out_accuracy']:.3f}; project classifier: "
          f"{rows[0]['classifier_test_accuracy']:.3f}")
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump({"workdir": _WORKDIR.value, "step": run.step, "seed": _SEED.value, "rows": rows}, f, indent=2)
        print(f"wrote {_JSON.value}")
    if _SVG.value:
        with open(_SVG.value, "w") as f:
            f.write(svg_plot(rows, title=f"{_WORKDIR.value}: {_NUM.value} samples per scale"))
        print(f"wrote {_SVG.value}")
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
