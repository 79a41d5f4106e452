"""Memory of one Stable Diffusion 1.5 fine-tuning step, from XLA's buffer assignment (no weights).

    python -m benchmarks.sd_finetune_memory                       # full vs LoRA rank 4, remat off/on
    python -m benchmarks.sd_finetune_memory --variants full-remat,lora4-remat --batch 1 --json out.json
    python -m benchmarks.sd_finetune_memory --variants lora4 --size 256     # 32x32x4 latents

The step is the one ``python -m experiments.train --config=experiments/configs/sd_finetune.py`` jits
(:func:`jaxdiff.train.step.make_train_step` over
:meth:`jaxdiff.models.PretrainedTextDiffusionModel.train_apply_fn`: frozen CLIP text encoder in the
step, AdamW + clip + EMA + non-finite guard, the state donated), bf16 compute with float32 params,
on SD 1.5's U-Net (``benchmarks.unet_configs.SD15``, 859.5M params) and CLIP ViT-L/14's text encoder
(123.1M), at ``--batch`` x 64 x 64 x 4 latents (``--size`` 512 px; 256 px: 32 x 32 x 4) and 77
tokens. Everything is abstract (``jax.eval_shape``; ``lower(...).compile()`` on ShapeDtypeStructs),
so no weights are needed or allocated. Per variant it reports ``compiled.memory_analysis()``:
arguments (train state + frozen weights + batch), outputs, aliased (the donated state), temporaries
(activations, gradients, workspace) and peak = arguments + outputs - aliased + temporaries, in GiB;
plus the trainable and frozen parameter counts and the compile time. The numbers are XLA's for the
backend it runs on (name it with the result: the CPU and GPU compilers assign buffers differently).
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.unet_configs import SD15
from jaxdiff import schedules
from jaxdiff.interop.unet2d_cond import unet2d_condition_config_from_diffusers
from jaxdiff.models import PretrainedTextDiffusionModel
from jaxdiff.nn.text import CLIPTextTransformer
from jaxdiff.nn.unet_cond import UNetCondition
from jaxdiff.train.step import create_train_state, make_optimizer, make_train_step

# CLIP ViT-L/14's text tower (openai/clip-vit-large-patch14, SD 1.x's text_encoder/config.json).
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12,
              max_position_embeddings=77, eos_token_id=49407, hidden_act="quick_gelu")
VARIANTS = ("full", "full-remat", "lora4", "lora4-remat")
GiB = 2.0 ** 30


class _Tokenizer:
    """Stands in for the CLIP tokenizer: only the empty caption (CFG dropout's null ids) is asked for."""
    model_max_length = 77

    def __call__(self, prompts, max_length, **_):
        ids = np.full((len(prompts), max_length), 49407, np.int32)
        ids[:, 0] = 49406
        mask = np.zeros_like(ids)
        mask[:, :2] = 1
        return {"input_ids": ids, "attention_mask": mask}


def build(variant: str, dtype=jnp.bfloat16, size: int = 512) -> PretrainedTextDiffusionModel:
    remat = variant.endswith("-remat")
    rank = int(variant.split("-")[0][4:] or 0) if variant.startswith("lora") else 0
    unet = UNetCondition(**unet2d_condition_config_from_diffusers(SD15), dtype=dtype, remat=remat)
    text = CLIPTextTransformer(**CLIP_L, dtype=dtype)
    latent = (size // 8, size // 8, SD15["in_channels"])
    base = jax.eval_shape(lambda k: {
        "unet": unet.init({"params": k}, jnp.zeros((1, *latent)), jnp.zeros((1,)), jnp.zeros((1, 77, 768)))["params"],
        "text_encoder": text.init({"params": k}, jnp.zeros((1, 77), jnp.int32))["params"]}, jax.random.key(0))
    return PretrainedTextDiffusionModel(unet, latent, None, None, text_encoder=text, tokenizer=_Tokenizer(),
                                        base=base, folder="(abstract SD 1.5)", lora_rank=rank,
                                        lora_alpha=float(rank or 1), lora_targets=("to_k", "to_q", "to_v", "to_out.0"))


def measure(variant: str, batch: int, size: int = 512) -> dict:
    model = build(variant, size=size)
    optimizer = make_optimizer(learning_rate=1e-5)
    schedule = schedules.schedule_from_betas(schedules.betas_np("scaled_linear", 1000, beta_start=0.00085,
                                                                beta_end=0.012))
    step = make_train_step(model.train_apply_fn(0.1), optimizer, schedule, prediction="eps")
    state = jax.eval_shape(lambda b: create_train_state(model.init_trainable(jax.random.key(0), b), optimizer),
                           model.base)
    frozen = model.frozen_params(model.base)
    h, w, c = model.image_shape
    batch_spec = {"image": jax.ShapeDtypeStruct((batch, h, w, c), jnp.float32),
                  "input_ids": jax.ShapeDtypeStruct((batch, 77), jnp.int32),
                  "attention_mask": jax.ShapeDtypeStruct((batch, 77), jnp.int32)}
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, batch_spec, frozen).compile()
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))  # noqa: E731
    args, out, alias, temp = (float(getattr(m, k)) / GiB for k in (
        "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes"))
    return {"variant": variant, "batch": batch, "size": size, "trainable_params": count(state.params),
            "frozen_params": count(frozen), "arguments_gib": args, "outputs_gib": out, "aliased_gib": alias,
            "temporaries_gib": temp, "peak_gib": args + out - alias + temp, "compile_s": seconds,
            "backend": jax.default_backend(), "device": jax.devices()[0].device_kind}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated of {VARIANTS}")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=512, help="image size in pixels (latents: size / 8), a multiple of 64")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    a = p.parse_args(argv)
    if a.size % 64:
        raise SystemExit(f"error: --size must be a multiple of 64, got {a.size}")
    rows = []
    print(f"{jax.devices()[0].device_kind} ({jax.default_backend()}, {platform.processor() or platform.machine()}); "
          f"SD 1.5 U-Net + CLIP-L text encoder, bf16 compute, fp32 params, batch {a.batch}, "
          f"{a.size // 8}x{a.size // 8}x4 latents ({a.size} px)")
    print(f"{'variant':<12} {'trainable':>12} {'args GiB':>9} {'temp GiB':>9} {'peak GiB':>9} {'compile s':>9}")
    for v in a.variants.split(","):
        if v not in VARIANTS:
            raise SystemExit(f"error: unknown variant {v!r}; choose from {VARIANTS}")
        r = measure(v, a.batch, a.size)
        rows.append(r)
        print(f"{v:<12} {r['trainable_params']:>12,} {r['arguments_gib']:>9.2f} {r['temporaries_gib']:>9.2f} "
              f"{r['peak_gib']:>9.2f} {r['compile_s']:>9.1f}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
