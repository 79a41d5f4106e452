"""Prompt adherence of a text-to-image run on ``shapes``, at several guidance scales.

    python -m experiments.eval_t2i --workdir=runs/t2i_shapes            # guidance 1, 3, 7; 378 prompts

Prompts: every (shape, colour, position) combination (189) in each of the first ``--templates``
caption templates (default 2: 378 prompts). Each guidance scale samples the same prompts from the
same noise (``--seed``), so the columns of the grid differ only in the guidance. The images are
read by :func:`jaxdiff.eval.shapes.adherence` (colour, position and shape from pixels); the sweep
is :func:`jaxdiff.eval.t2i.evaluate`.

Prints a table (attribute, chance, accuracy per guidance scale) and writes ``--out``.json (the
figures), ``--out``.png (one row per guidance scale, the same ``--grid_prompts`` prompts in the
columns) and ``--out``.npz (``images`` uint8 [G, N, H, W, 3], ``prompts`` [N], ``guidance`` [G]).
"""
import json
import os
import sys

from absl import app, flags

from experiments import common

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags; defined only when run as a script."""
    flags.DEFINE_string("workdir", "runs/t2i_shapes", "Text-to-image run directory.")
    flags.DEFINE_list("guidance", ["1", "3", "7"], "Guidance scales (1 = no guidance).")
    flags.DEFINE_integer("templates", 2, "Caption templates per combination (189 prompts each).")
    flags.DEFINE_string("sampler", None, "Sampler (default: the config's).")
    flags.DEFINE_integer("steps", None, "Sampling steps (default: the config's).")
    flags.DEFINE_integer("seed", 0, "PRNG seed of the sampling noise.")
    flags.DEFINE_integer("batch_size", 189, "Images per compiled sampler call.")
    flags.DEFINE_integer("grid_prompts", 12, "Prompts (columns) in the PNG grid.")
    flags.DEFINE_string("out", None, "Output path without extension (default: WORKDIR/eval_t2i).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    common.start_jax()  # before anything touches the JAX backend
    import numpy as np

    from jaxdiff import generation, parallel
    from jaxdiff import images as imgs
    from jaxdiff import runs
    from jaxdiff.eval.t2i import evaluate
    from jaxdiff.train.checkpoint import CheckpointError

    try:
        guidance = [float(g) for g in FLAGS.guidance]
    except ValueError:
        print(f"error: --guidance must be numbers, got {FLAGS.guidance}", file=sys.stderr)
        return 2
    try:
        run = runs.load_run(FLAGS.workdir)
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not run.model.text_conditional or run.config.data.name != "shapes":
        print(f"error: {FLAGS.workdir} is not a text-to-image run on 'shapes' (see experiments/configs/t2i_shapes.py)",
              file=sys.stderr)
        return 2
    try:
        prompts, images, results = evaluate(run, guidance, templates=FLAGS.templates, seed=FLAGS.seed,
                                            batch_size=FLAGS.batch_size, method=FLAGS.sampler, num_steps=FLAGS.steps,
                                            log=lambda line: print(line, flush=True) if parallel.is_writer() else None)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = generation.sampler_settings(run.config, method=FLAGS.sampler, num_steps=FLAGS.steps)
    out = FLAGS.out or os.path.join(FLAGS.workdir, "eval_t2i")
    first = results[guidance[0]]
    print(f"\n{FLAGS.workdir} step {run.step}, {s['method']} {s['num_steps']} steps, {len(prompts)} prompts")
    print(f"{'attribute':<10} {'chance':>8} " + " ".join(f"{'w=' + format(g, 'g'):>7}" for g in guidance))
    for k in ("color", "position", "shape", "all"):
        print(f"{k:<10} {first[k + '_chance']:>8.3f} " + " ".join(f"{results[g][k + '_accuracy']:>7.3f}" for g in guidance))
    print(f"{'empty':<10} {'':>8} " + " ".join(f"{results[g]['empty_fraction']:>7.3f}" for g in guidance))
    if "held_out" in first:
        n = first["held_out"]["num_prompts"]
        print(f"combinations held out of training ({run.config.data.holdout}): {n} of {len(prompts)} prompts")
        for part in ("held_out", "seen"):
            for k in ("color", "position", "shape", "all"):
                name = f"{k} ({part.replace('_', '-')})"
                print(f"{name:<19} " + " ".join(f"{results[g][part][k + '_accuracy']:>7.3f}" for g in guidance))
    common.done()
    if not parallel.is_writer():  # every process sampled its share; process 0 writes
        return 0
    # The grid: rows = guidance scales, columns = prompts spread over the combinations.
    cols = np.linspace(0, len(prompts) // FLAGS.templates - 1, min(FLAGS.grid_prompts, len(prompts))).round().astype(int)
    grid = images[:, cols].reshape(-1, *images.shape[2:])
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    imgs.save_png(out + ".png", imgs.make_grid(grid, ncol=len(cols)), scale=2)
    np.savez(out + ".npz", images=images, prompts=np.asarray(prompts, dtype=str), guidance=np.asarray(guidance))
    with open(out + ".json", "w") as f:
        json.dump({"workdir": os.path.abspath(FLAGS.workdir), "step": run.step, "sampler": s,
                   "holdout": run.config.data.holdout,
                   "num_prompts": len(prompts), "templates": FLAGS.templates, "seed": FLAGS.seed,
                   "grid_columns": [prompts[i] for i in cols],
                   "results": {format(g, "g"): r for g, r in results.items()}}, f, indent=2)
    print(f"Wrote {out}.json, {out}.png (rows: guidance {', '.join(format(g, 'g') for g in guidance)}; columns: "
          f"{'; '.join(prompts[i] for i in cols[:3])}; ...) and {out}.npz")
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=common.parse_flags)
