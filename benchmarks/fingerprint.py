"""Behaviour fingerprint for refactors: hashes of what a change must not move.

    python -m benchmarks.fingerprint --out=before.json      # on the old commit
    python -m benchmarks.fingerprint --out=after.json       # on the new one, same machine
    diff before.json after.json                              # identical = bit for bit unchanged

Trains the digits config (``experiments/configs/ddpm_digits.py``) for ``--steps`` steps from seed 0
in a temporary workdir, then hashes (sha256, first 16 hex digits) the EMA params of the last
checkpoint, the uint8 samples of ``jaxdiff.generation.generate`` for every sampler of the config
path (ddpm, ddim, dpmpp_2m, euler, heun, euler_ancestral; 8 images, labels 0..7, key 1), and the
float32 output of ``jaxdiff.sampling.sample`` with Karras sigmas (dpmpp_2m, euler, heun) and
pndm. About 80 s on a 2-core CPU. Hashes depend on the CPU's instruction set and the jax/XLA
version: compare two commits on the same machine and environment, never against another machine.
"""
import hashlib
import json
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

_OUT = flags.DEFINE_string("out", None, "Write the JSON here too (it is always printed).")
_STEPS = flags.DEFINE_integer("steps", 30, "Training steps before the params are hashed.")

GENERATE = (("ddpm", 20), ("ddim", 10), ("dpmpp_2m", 10), ("euler", 10), ("heun", 6), ("euler_ancestral", 10))
DIRECT = ("dpmpp_2m", "euler", "heun", "pndm")  # Karras sigmas for all but pndm


def _digest(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.asarray(a).tobytes())
    return h.hexdigest()[:16]


def fingerprint(num_steps: int) -> dict:
    from experiments.configs import ddpm_digits
    from jaxdiff import generation, runs, sampling
    from jaxdiff.train.loop import train

    c = ddpm_digits.get_config()
    c.train.num_steps, c.train.checkpoint_every, c.train.log_every = num_steps, num_steps, max(1, num_steps // 3)
    c.train.eval_every, c.train.num_samples = 0, 0
    with tempfile.TemporaryDirectory() as workdir:
        train(c, workdir)
        run = runs.load_run(workdir)
        out = {"params": _digest(jax.tree.leaves(run.params))}
        for method, steps in GENERATE:
            images, _ = generation.generate(run.model, run.params, run.schedule, run.config, num=8,
                                            key=jax.random.key(1), labels=list(range(8)), method=method,
                                            num_steps=steps)
            out[method] = _digest([images])

        def model_fn(x, t, *, params):
            return run.model.apply(params, x, t, jnp.full((x.shape[0],), 3, jnp.int32))

        x_T = jax.random.normal(jax.random.key(2), (4, *run.model.image_shape))
        for method in DIRECT:
            x = sampling.sample(model_fn, run.schedule, x_T, method=method, num_steps=8,
                                use_karras_sigmas=method != "pndm", extra_args={"params": run.params})
            out[method + ("" if method == "pndm" else "_karras")] = _digest([x])
    return out


def main(argv):
    del argv
    out = fingerprint(_STEPS.value)
    text = json.dumps(out, indent=1)
    print(text)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
