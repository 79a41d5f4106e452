"""Sample from a trained run with its EMA params.

    python -m experiments.sample --workdir=runs/ddpm_digits --num=100 --seed=0 --out=samples
    python -m experiments.sample --workdir=runs/ddpm_digits --labels=3,3,7,7 --sampler=ddim --steps=25 --out=s

Latent diffusion runs (``ldm_*`` configs) need no extra flag: the run's metadata names its VAE run,
checkpoint step and latent scale factor, and the samples are decoded to pixels.

Text-to-image runs (``t2i_*`` configs) take prompts; images cycle through them (without --prompt,
through the config's ``sample.prompts``):

    python -m experiments.sample --workdir=runs/t2i_shapes --prompt "a red circle at the top left" \
        --prompt "a blue square in the center" --num=8 --guidance=3 --out=shapes

Writes ``OUT.png`` (a grid) and ``OUT.npz`` (``images`` uint8 [N, H, W, C], and ``labels`` for a
class-conditional model, ``prompts`` for a text-to-image one). Without --labels a conditional model
cycles through the classes.
"""
import os
import time

from absl import app, flags

from experiments import common

_WORKDIR = flags.DEFINE_string("workdir", "runs/ddpm_digits", "Run directory with checkpoints/.")
_NUM = flags.DEFINE_integer("num", 100, "Number of images.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed (same seed, same images).")
_LABELS = flags.DEFINE_list("labels", None, "Class labels: one per image, or one to repeat (conditional models).")
_OUT = flags.DEFINE_string("out", "samples", "Output path without extension: writes OUT.png and OUT.npz.")
_SAMPLER = flags.DEFINE_string("sampler", None, "Sampler (default: the config's sample.method): "
                               "ddpm, ddim, dpmpp_2m, euler, heun, euler_ancestral.")
_STEPS = flags.DEFINE_integer("steps", None, "Sampling steps (default: the config's sample.num_steps).")
_ETA = flags.DEFINE_float("eta", None, "DDIM eta (0 = deterministic).")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (1 = off).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Images per compiled sampler call (default: all).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt (text-to-image runs); repeat the flag for several: "
                                    "the images cycle through them.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    common.start_jax()  # before anything touches the JAX backend
    try:
        return _sample()
    except Exception as e:  # in a multi-process job: traceback, tell the other processes, leave
        common.fail_unexpected(e)
        raise


def _sample():
    import jax

    from jaxdiff import generation, parallel
    from jaxdiff import images as imgs
    from jaxdiff import runs
    from jaxdiff.train.checkpoint import CheckpointError

    try:
        run = runs.load_run(_WORKDIR.value, _STEP.value)
    except (FileNotFoundError, CheckpointError, ValueError) as e:  # missing run / VAE run, a VAE run given
        return common.fail(f"{e}", 2)
    sampler = dict(method=_SAMPLER.value, num_steps=_STEPS.value, eta=_ETA.value, guidance=_GUIDANCE.value)
    if run.model.text_conditional:
        if _LABELS.value:
            return common.fail("this is a text-to-image run: give --prompt, not --labels", 2)
        prompts = generation.cycle_prompts(_PROMPT.value or list(run.config.sample.prompts), _NUM.value)
        t0 = time.perf_counter()
        try:
            images = generation.generate_text(run.model, run.params, run.schedule, run.config, prompts=prompts,
                                             key=jax.random.key(_SEED.value), batch_size=_BATCH.value, **sampler)
        except ValueError as e:
            return common.fail(f"{e}", 2)
        ncol = len(dict.fromkeys(prompts))
        common.done()
        if not parallel.is_writer():  # every process sampled its share; process 0 writes
            return 0
        imgs.save_samples(_OUT.value, images, ncol=ncol, prompts=prompts)
        s = generation.sampler_settings(run.config, **sampler)
        print(f"Wrote {os.path.abspath(_OUT.value)}.png and .npz: {images.shape[0]} images {images.shape[1:]} "
              f"(one column per prompt) from step {run.step}, {s['method']} {s['num_steps']} steps, guidance "
              f"{s['guidance']}, {time.perf_counter() - t0:.1f} s")
        return 0
    if _PROMPT.value:
        return common.fail("--prompt needs a text-to-image run (model.type='text_unet'); this run is "
              + ("class-conditional: use --labels" if run.model.conditional else "unconditional"), 2)
    labels = None
    if _LABELS.value:
        try:
            labels = [int(v) for v in _LABELS.value]
        except ValueError:
            return common.fail(f"--labels must be integers, got {_LABELS.value}", 2)
        if len(labels) == 1:
            labels = labels * _NUM.value
    t0 = time.perf_counter()
    try:
        images, labels = generation.generate(
            run.model, run.params, run.schedule, run.config, num=_NUM.value, key=jax.random.key(_SEED.value),
            labels=labels, batch_size=_BATCH.value, method=_SAMPLER.value, num_steps=_STEPS.value,
            eta=_ETA.value, guidance=_GUIDANCE.value,
        )
    except ValueError as e:
        return common.fail(f"{e}", 2)
    common.done()
    if not parallel.is_writer():  # every process sampled its share; process 0 writes
        return 0
    imgs.save_samples(_OUT.value, images, labels)
    s = generation.sampler_settings(run.config, method=_SAMPLER.value, num_steps=_STEPS.value,
                                   eta=_ETA.value, guidance=_GUIDANCE.value)
    print(f"Wrote {os.path.abspath(_OUT.value)}.png and .npz: {images.shape[0]} images {images.shape[1:]} from "
          f"step {run.step}, {s['method']} {s['num_steps']} steps, guidance {s['guidance']}, "
          + (f"latents {tuple(run.model.image_shape)} decoded by the VAE {run.model.autoencoder.workdir} "
             f"(step {run.model.autoencoder.step}), " if run.model.autoencoder is not None else "") +
          f"{time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
