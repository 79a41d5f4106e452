"""Text-to-image with a Stable Diffusion 1.x folder in diffusers layout.

    python -m experiments.txt2img --model=stable-diffusion-v1-5 --prompt "a photo of a cat" \
        --num=4 --steps=25 --guidance=7.5 --sampler=dpmpp_2m --seed=0 --out=cat

Writes ``OUT.png`` (a grid) and ``OUT.npz`` (``images`` uint8 [N, H, W, 3], ``prompts`` [N] str,
``seed``). The folder holds ``unet/ vae/ text_encoder/ tokenizer/ scheduler/`` (safetensors
weights), e.g. a snapshot of the Hub repository or ``StableDiffusionPipeline.save_pretrained``.
Same seed and settings, same images. :func:`run_txt2img` is the whole command as a function.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Optional, Sequence, Union

from absl import app, flags

from experiments import common

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags. Defined only when run as a script, so that another script (with its own
    --num, --seed, ...) can import :func:`run_txt2img` without clashing flag names."""
    flags.DEFINE_string("model", None, "Stable Diffusion 1.x folder (diffusers layout).")
    flags.DEFINE_multi_string("prompt", None, "Prompt; repeat the flag for several (images cycle through them).")
    flags.DEFINE_string("negative_prompt", "", "Negative prompt (the unconditional branch of guidance).")
    flags.DEFINE_integer("num", 4, "Number of images.")
    flags.DEFINE_integer("steps", 25, "Sampling steps.")
    flags.DEFINE_float("guidance", 7.5, "Classifier-free guidance scale (<= 1: no guidance).")
    flags.DEFINE_string("sampler", None, "Sampler: ddim, dpmpp_2m, euler, heun, ddpm, euler_ancestral, pndm "
                        "(default: the folder's scheduler, scheduler/scheduler_config.json).")
    flags.DEFINE_integer("seed", 0, "PRNG seed (same seed, same images).")
    flags.DEFINE_string("out", "txt2img", "Output path without extension: writes OUT.png and OUT.npz.")
    flags.DEFINE_integer("height", None, "Image height in pixels (default: the model's, 512 for SD 1.x).")
    flags.DEFINE_integer("width", None, "Image width in pixels (default: the model's).")
    flags.DEFINE_integer("batch_size", None, "Images per compiled call (default: all).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of the networks.")


def run_txt2img(model: Union[str, Any], prompt: Union[str, Sequence[str]], *, num: int = 4, steps: int = 25,
                guidance: float = 7.5, sampler: Optional[str] = None, seed: int = 0, out: Optional[str] = "txt2img",
                negative_prompt: str = "", height: Optional[int] = None, width: Optional[int] = None,
                batch_size: Optional[int] = None, dtype: Optional[str] = None, verbose: bool = True):
    """Generate ``num`` images and write ``out.png`` / ``out.npz`` (nothing written if ``out`` is None).

    ``model`` is a folder or an already loaded :class:`jaxdiff.text_to_image.StableDiffusion`.
    ``prompt``: one string, or several that the images cycle through. The images are
    :func:`jaxdiff.generation.generate_sd` with ``key(seed)`` (batch ``i``: ``fold_in(key, i)``).
    Returns ``(images uint8 [num, H, W, 3], prompts list[str])``; raises FileNotFoundError /
    ValueError for a bad folder or settings.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff import generation
    from jaxdiff import text_to_image as t2i

    if not isinstance(prompt, str) and not list(prompt):
        raise ValueError("Give at least one prompt.")
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}.")
    t0 = time.perf_counter()
    if isinstance(model, t2i.StableDiffusion):
        sd = model
    else:
        sd = t2i.load_stable_diffusion(model, dtype={"bfloat16": jnp.bfloat16}.get(dtype or "float32"))
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    images, per_image = generation.generate_sd(sd, prompt, num=num, key=jax.random.key(seed), batch_size=batch_size,
                                               num_steps=steps, guidance_scale=guidance, method=sampler,
                                               height=height, width=width, negative_prompt=negative_prompt)
    t_gen = time.perf_counter() - t1
    if out is not None:
        from PIL import Image

        from jaxdiff.images import make_grid

        path = out[:-4] if out.endswith((".png", ".npz")) else out
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        Image.fromarray(make_grid(images)).save(path + ".png")
        np.savez(path + ".npz", images=images, prompts=np.array(per_image), seed=np.int64(seed))
        if verbose:
            used = sampler or f"{sd.scheduler.method} (the folder's {sd.scheduler.scheduler_class})"
            print(f"Wrote {os.path.abspath(path)}.png and .npz: {num} images {images.shape[1:]}, {used} {steps} "
                  f"steps, guidance {guidance}, seed {seed}; load {t_load:.1f} s, generate {t_gen:.1f} s "
                  "(first call includes compilation)")
    return images, per_image


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = FLAGS
    if not f.model or not f.prompt:
        print("error: --model=FOLDER and --prompt \"...\" are required", file=sys.stderr)
        return 2
    common.start_jax()  # before anything touches the JAX backend
    import jax

    if jax.process_count() > 1:
        return common.fail("txt2img runs on one process (a Stable Diffusion folder's pipeline is not sharded "
                           "yet); start it without JAX_COORDINATOR_ADDRESS / the launcher.", 2)
    try:
        run_txt2img(f.model, f.prompt, num=f.num, steps=f.steps, guidance=f.guidance, sampler=f.sampler,
                    seed=f.seed, out=f.out, negative_prompt=f.negative_prompt, height=f.height, width=f.width,
                    batch_size=f.batch_size, dtype=f.dtype)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=common.parse_flags)
