"""End to end on this CPU: captioned image folders -> a tiny Stable-Diffusion-layout pipeline ->
full fine-tuning -> LoRA -> prompt adherence read off the pixels.

    nice -n 5 python -m benchmarks.sd_folder_lora --workdir=/tmp/sd_folder_lora --json sd_folder_lora.json
    python -m benchmarks.sd_folder_lora --workdir=/tmp/smoke --smoke      # every stage, tiny (~1 min)

A LoRA on a random U-Net with a random VAE draws nothing a checker can score, so the base model is
made first, every part of it through jaxdiff's own paths:

1. **Folders.** The embedded ``shapes`` data (:func:`jaxdiff.data.shapes.generate`, split seed 0) is
   rendered to PNG files with a ``metadata.jsonl`` of captions. Folder **A** (pretraining): every
   image whose colour is not ``--new_color`` (cyan by default; 6 of the 7 colours). Folder **B**
   (fine-tuning): the images of the new colour, mixed 1:1 with images of A (replay, as DreamBooth's
   prior preservation, so the adapters learn the colour without overwriting the others). The base
   never sees the word or the colour; whether a rank-4 LoRA on the U-Net's attention (frozen text
   encoder, frozen VAE) can teach it is a question the checkers answer: colour accuracy on the
   new colour's prompts before and after, and on the other prompts (forgetting).
2. **Init folder** (diffusers layout, written without torch): ``vae/`` = a KL autoencoder trained by
   jaxdiff on a third folder, ``all`` (every rendered image, the new colour included:
   ``experiments/configs/vae_shapes.py``, ``data.name=folder:all``) and exported with
   :func:`jaxdiff.interop.export.export_vae`. Not on A: SD's VAE is trained on far broader data than
   any fine-tuning set, and a VAE that never saw cyan cannot draw it (measured: one trained on A for
   800 steps reconstructs every cyan shape of B as magenta, about RGB (200, 88, 255); the checkers'
   colour accuracy on those reconstructions is 0.000), so no adapter on the U-Net could either.
   ``text_encoder/``: a random CLIP text transformer (transformers ``CLIPTextModel`` layout);
   ``tokenizer/``: a CLIP byte-level BPE vocabulary whose merges make each of the dataset's words
   one token (``vocab.json`` + ``merges.txt``; transformers' CLIPTokenizer reads it); ``unet/``: a
   random ``UNet2DConditionModel`` (the ``t2i_shapes`` U-Net's sizes); ``scheduler/``:
   DDPMScheduler (cosine, v-prediction); ``model_index.json``.
3. **Base**: full fine-tuning of the init folder's U-Net *and text encoder* (``train.text_encoder``)
   on folder A with ``experiments/configs/sd_finetune.py`` through ``python -m experiments.train``,
   exported with :func:`jaxdiff.interop.export.export_sd_pipeline` (EMA params) -> ``base/``, a
   whole pipeline folder. The exported weights are checked bit-equal to the run's EMA params.
4. **LoRA**: ``python -m experiments.train --config=experiments/configs/sd_finetune.py
   --config.model.pretrained=base --config.data.name=folder:B --config.model.lora_rank=4``; the
   adapters are exported with :func:`jaxdiff.interop.export.export_sd_lora` (float32 and float16).
   The base folder's files are hashed before and after: they must be bit-identical.
5. **Adherence**: every (shape, colour, position) prompt in two caption templates (378 prompts,
   54 of the new colour), DPM-Solver++ 25 steps, guidance ``--guidance``, the same noise for base
   and LoRA, scored by :func:`jaxdiff.eval.shapes.adherence` (colour, position, shape from pixels).
   The VAE's ceiling (the checkers on its reconstructions of folder B) is reported too.

Every stage's wall time (training stages: the CLI process from start to exit, XLA compile and
latent caching included), steps/s (median of the loop's logged rates), parameter counts and
checkpoint bytes are printed and written to ``--json``. Folder datasets are built in
``WORKDIR/tfds`` and XLA's persistent cache is ``WORKDIR/xla_cache`` (a fresh workdir = cold
compiles). ``--base_from=EARLIER_WORKDIR`` reuses an earlier run's stages 1-3 and runs only the LoRA
and the scoring. ``--smoke`` runs every stage at toy sizes with XLA at -O0 (the test
``tests/test_sd_folder_lora.py``); its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = [sys.executable, "-m", "experiments.train"]

# The t2i_shapes U-Net (experiments/configs/t2i_shapes.py) as a diffusers UNet2DConditionModel config.
UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64, 64], layers_per_block=1,
            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            mid_block_type="UNetMidBlock2DCrossAttn", attention_head_dim=2, cross_attention_dim=64,
            norm_num_groups=8, use_linear_projection=True)
# A CLIP text transformer of t2i_shapes' text encoder sizes, with SD's 77 positions.
TEXT = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, max_position_embeddings=77,
            hidden_act="quick_gelu")
# --smoke: one 8x8 level with one cross-attention transformer, no middle block (XLA compile time is the cost).
SMOKE_UNET = dict(UNET, block_out_channels=[8], down_block_types=["CrossAttnDownBlock2D"], up_block_types=["UpBlock2D"],
                  mid_block_type=None, cross_attention_dim=16, norm_num_groups=4)
SMOKE_TEXT = dict(TEXT, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# What the measured run uses (README/BENCHMARKS.md numbers); --smoke replaces them with SMOKE.
DEFAULTS = dict(num_images=10_000, vae_steps=800, vae_batch=32, base_steps=1200, base_batch=64, base_lr=1.5e-3,
                lora_steps=400, lora_batch=32, lora_lr=2e-3, lora_rank=4, eval_templates=2, eval_steps=25,
                eval_stride=1, unet=UNET, text=TEXT, vae_channels=(16, 32, 64), log_every=50)
SMOKE = dict(num_images=240, vae_steps=2, vae_batch=8, base_steps=2, base_batch=8, base_lr=1e-3,
             lora_steps=2, lora_batch=8, lora_lr=1e-3, lora_rank=2, eval_templates=1, eval_steps=2,
             eval_stride=9, unet=SMOKE_UNET, text=SMOKE_TEXT, vae_channels=(8, 8, 8), log_every=1)


def log(msg: str) -> None:
    print(msg, flush=True)


def digest(folder: str) -> str:
    """SHA-256 over every file's relative path and bytes under ``folder`` (sorted walk)."""
    h = hashlib.sha256()
    for d, dirs, files in os.walk(folder):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(d, f)
            h.update(os.path.relpath(p, folder).encode() + b"\0")
            with open(p, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def du(path: str) -> int:
    """Bytes of the files under ``path``."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


# ------------------------------------------------------------------------------------ 1. folders
def write_folder(folder: str, images: np.ndarray, captions) -> None:
    """uint8 [N, H, W, 3] + N captions -> ``folder/00000.png ...`` and ``folder/metadata.jsonl``."""
    from PIL import Image

    os.makedirs(folder)
    with open(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as f:
        for i, (img, cap) in enumerate(zip(images, captions)):
            name = f"{i:05d}.png"
            Image.fromarray(img).save(os.path.join(folder, name))
            f.write(json.dumps({"file_name": name, "text": str(cap)}) + "\n")


def make_folders(work: str, num_images: int, new_color: str) -> dict:
    """Folders A (every colour but ``new_color``), B (``new_color`` + as many images of A) and ``all``
    (every image: the VAE's)."""
    from jaxdiff.data import shapes

    ex = shapes.generate(num_images, seed=0)
    new = ex["color"] == shapes.COLORS.index(new_color)
    a = np.flatnonzero(~new)
    b_new = np.flatnonzero(new)
    b = np.concatenate([b_new, a[:len(b_new)]])
    b = b[np.random.default_rng(0).permutation(len(b))]
    folders = {k: os.path.join(work, f"folder_{k}") for k in ("A", "B", "all")}
    for key, idx in (("A", a), ("B", b), ("all", np.arange(num_images))):
        write_folder(folders[key], ex["image"][idx], ex["caption"][idx])
    return {**folders, "num_A": int(len(a)), "num_B": int(len(b)), "num_B_new_color": int(len(b_new))}


# ---------------------------------------------------------------------------------- 2. init folder
def _bpe(symbols: list, ranks: dict) -> list:
    """CLIP's BPE on one word's symbols: merge the lowest-ranked adjacent pair until none is ranked."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, 1 << 30), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def clip_bpe_vocab(words) -> tuple[dict, list]:
    """A CLIP byte-level BPE vocabulary and merges under which each of ``words`` (lower-case ASCII) is
    one token: the 256 byte symbols, each with ``</w>``, then per word the merges that join its first two
    symbols (as BPE leaves them) until one remains (a merge added later ranks lower, so it never changes
    how an earlier word splits), then the start and end tokens. Any other text still tokenizes."""
    from jaxdiff.tokenizers import bytes_to_unicode

    base = list(bytes_to_unicode().values())
    vocab = base + [c + "</w>" for c in base]
    merges, ranks = [], {}
    for w in dict.fromkeys(words):
        while len(syms := _bpe(list(w[:-1]) + [w[-1] + "</w>"], ranks)) > 1:
            ranks[(syms[0], syms[1])] = len(merges)
            merges.append((syms[0], syms[1]))
            if syms[0] + syms[1] not in vocab:
                vocab.append(syms[0] + syms[1])
    vocab += [BOS, EOS]
    return {t: i for i, t in enumerate(vocab)}, merges


def write_tokenizer(folder: str, words) -> int:
    """``folder/``: vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json (SD 1.x's
    layout: pads with the end token, 77 positions). Returns the vocabulary size."""
    vocab, merges = clip_bpe_vocab(words)
    os.makedirs(folder)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
                   "clean_up_tokenization_spaces": True, **special}, f, indent=2)
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)
    return len(vocab)


def make_init_folder(out: str, vae_workdir: str, unet_cfg: dict, text_cfg: dict, seed: int = 0) -> dict:
    """The diffusers-layout pipeline folder the base is fine-tuned from (see the module docstring)."""
    import jax
    import jax.numpy as jnp

    from jaxdiff.data import shapes
    from jaxdiff.interop import export
    from jaxdiff.interop.unet2d_cond import unet2d_condition_config_from_diffusers
    from jaxdiff.nn.text import CLIPTextTransformer
    from jaxdiff.nn.unet_cond import UNetCondition
    from jaxdiff.train import build

    os.makedirs(out)
    ae = build.load_vae(vae_workdir)
    export.export_vae(os.path.join(out, "vae"), ae.vae.module, jax.device_get(ae.params),
                      image_shape=ae.vae.image_shape, scaling_factor=ae.scale_factor,
                      source={"workdir": vae_workdir, "step": int(ae.step)})
    n_vocab = write_tokenizer(os.path.join(out, "tokenizer"), shapes.vocabulary() + list(shapes.COLORS))
    k_text, k_unet = jax.random.split(jax.random.key(seed))
    text = CLIPTextTransformer(vocab_size=n_vocab, eos_token_id=n_vocab - 1, **text_cfg)
    text_params = jax.jit(lambda k: text.init({"params": k}, jnp.zeros((1, 77), jnp.int32))["params"])(k_text)
    export.save_clip_text(os.path.join(out, "text_encoder"), text, jax.device_get(text_params),
                          bos_token_id=n_vocab - 2, pad_token_id=n_vocab - 1)
    cfg = {"_class_name": "UNet2DConditionModel", **unet_cfg}
    unet = UNetCondition(**unet2d_condition_config_from_diffusers(cfg))
    s, c = int(cfg["sample_size"]), int(cfg["in_channels"])
    unet_params = jax.jit(lambda k: unet.init({"params": k}, jnp.zeros((1, s, s, c)), jnp.zeros((1,)), jnp.zeros(
        (1, 77, int(cfg["cross_attention_dim"]))))["params"])(k_unet)  # one program, not op by op
    export.save_unet2d_condition(os.path.join(out, "unet"), unet, jax.device_get(unet_params), sample_size=s)
    export.save_scheduler(os.path.join(out, "scheduler"),
                          export.ddpm_scheduler_config("cosine", 1000, prediction="v", clip_x0=0.0))
    with open(os.path.join(out, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "_diffusers_version": export.DIFFUSERS_VERSION,
                   "feature_extractor": [None, None], "image_encoder": [None, None],
                   "requires_safety_checker": False, "safety_checker": [None, None],
                   "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
                   "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"]}, f, indent=2)
    count = lambda t: int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(t)))  # noqa: E731
    return {"unet_params": count(unet_params), "text_encoder_params": count(text_params),
            "vae_params": count(ae.params), "vocab_size": n_vocab, "vae_scaling_factor": float(ae.scale_factor)}


def vae_ceiling(vae_workdir: str, folder_b: str, new_color: str) -> dict:
    """The checkers and PSNR on the VAE's reconstructions of folder B (its mean latents, decoded)."""
    import jax.numpy as jnp

    from jaxdiff.data import folder as folder_lib, shapes
    from jaxdiff.eval.psnr import psnr
    from jaxdiff.eval.shapes import adherence_to_captions
    from jaxdiff.train import build

    ae = build.load_vae(vae_workdir)
    layout = folder_lib.scan(folder_b)
    images = np.stack([folder_lib.load_image(os.path.join(folder_b, f), 32) for f in layout["files"]])
    mean, _ = ae.encode(images)
    rec = np.asarray(jnp.clip(jnp.round((ae.decode(mean) + 1) * 127.5), 0, 255)).astype(np.uint8)
    caps = layout["captions"]
    new = np.array([shapes.COLORS[shapes.parse_caption(c)[1]] == new_color for c in caps])
    out = {"psnr_db": float(psnr(images, rec)["psnr"])}
    for part, m in (("new_color", new), ("other_colors", ~new)):
        r = adherence_to_captions(rec[m], [c for c, k in zip(caps, m) if k])
        out[part] = {k: float(r[k]) for k in ("color_accuracy", "position_accuracy", "shape_accuracy",
                                              "all_accuracy")}
    return out


# ------------------------------------------------------------------------------------ training
def run_cli(argv: list, env: dict, log_path: str) -> float:
    """Runs ``python -m experiments.train ...`` (output to ``log_path``); returns its wall seconds."""
    t0 = time.perf_counter()
    with open(log_path, "w") as fh:
        r = subprocess.run(argv, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if r.returncode:
        with open(log_path) as fh:
            tail = fh.read()[-3000:]
        raise SystemExit(f"error: {' '.join(argv[2:4])} failed (exit {r.returncode}); {log_path} ends with:\n{tail}")
    return seconds


def steps_per_sec(workdir: str) -> float:
    """Median of the loop's logged ``steps_per_sec`` (the first log, compile included, left out)."""
    rates = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "steps_per_sec" in row and np.isfinite(row["steps_per_sec"]):
                rates.append(float(row["steps_per_sec"]))
    rates = rates[1:] or rates
    return float(statistics.median(rates)) if rates else float("nan")


def last_checkpoint_bytes(workdir: str) -> int:
    ck = os.path.join(workdir, "checkpoints")
    steps = sorted(int(d) for d in os.listdir(ck) if d.isdigit())
    return du(os.path.join(ck, str(steps[-1])))


def sd_args(pretrained: str, folder: str, workdir: str, p: dict, *, steps: int, batch: int, lr: float,
            lora_rank: int = 0, text_encoder: bool = False, ema_decay: float = 0.999) -> list:
    over = {
        "model.pretrained": pretrained, "data.name": f"folder:{folder}", "data.image_size": 32,
        "data.encode_batch_size": 64, "model.dtype": "float32", "model.remat": False,
        "model.lora_rank": lora_rank, "model.lora_alpha": float(lora_rank or 1),
        "train.text_encoder": text_encoder, "train.num_steps": steps, "train.batch_size": batch,
        "train.lr": lr, "train.warmup_steps": min(100, steps // 10), "train.cosine_decay": True,
        "train.weight_decay": 0.0, "train.ema_decay": ema_decay, "train.checkpoint_every": steps,
        "train.log_every": p["log_every"], "train.num_samples": 0, "diffusion.p_uncond": 0.1,
    }
    return TRAIN + ["--config=experiments/configs/sd_finetune.py", f"--workdir={workdir}"] + [
        f"--config.{k}={v}" for k, v in over.items()]


# ---------------------------------------------------------------------------------- adherence
def score(run, labels: np.ndarray, prompts: list, new_color: int, *, guidance: float, num_steps: int,
          seed: int = 0) -> dict:
    """Samples one image per prompt and scores it: overall, the new colour's prompts, the others."""
    import jax

    from jaxdiff import generation

    t0 = time.perf_counter()
    images = generation.generate_text(run.model, run.params, run.schedule, run.config, prompts=prompts,
                                      key=jax.random.key(seed), batch_size=189, guidance=guidance,
                                      method="dpmpp_2m", num_steps=num_steps)
    return _scored(images, labels, new_color, time.perf_counter() - t0), images


def _scored(images: np.ndarray, labels: np.ndarray, new_color: int, seconds: float) -> dict:
    from jaxdiff.eval.shapes import adherence

    new = labels[:, 1] == new_color
    out = {"seconds": seconds}
    for part, m in (("all", np.ones(len(labels), bool)), ("new_color", new), ("other_colors", ~new)):
        if not m.any():
            continue
        r = adherence(images[m], labels[m, 0], labels[m, 1], labels[m, 2])
        out[part] = {"num_prompts": int(m.sum()), **{k: float(r[k]) for k in (
            "color_accuracy", "position_accuracy", "shape_accuracy", "all_accuracy")}}
    return out


def score_diffusers(base: str, lora_dir: str, labels: np.ndarray, prompts: list, new_color: int, *,
                    guidance: float, num_steps: int, seed: int = 0) -> dict:
    """The exported folders in diffusers (torch, CPU): ``StableDiffusionPipeline.from_pretrained(base)``
    with DPMSolverMultistepScheduler (the folder's schedule and prediction type), without and with
    ``load_lora_weights(lora_dir)``; the same prompts and seed for both, scored like :func:`score`."""
    import diffusers
    import torch

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = {}
    for name in ("base", "lora"):
        if name == "lora":
            pipe.load_lora_weights(lora_dir)
        t0 = time.perf_counter()
        with torch.no_grad():
            x = pipe(prompts, num_inference_steps=num_steps, guidance_scale=guidance, output_type="np",
                     generator=torch.Generator().manual_seed(seed)).images
        images = np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
        out[name] = _scored(images, labels, new_color, time.perf_counter() - t0)
    return out


def _leaves_equal(a, b) -> bool:
    import jax

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


# ------------------------------------------------------------------------------------------ main
def build_base(work: str, p: dict, new_color: str, env: dict, stages: dict) -> dict:
    """Stages 1-3: folders, VAE, init folder, full fine-tuning, export. Returns the paths."""
    import jax

    from jaxdiff import runs
    from jaxdiff.interop import export
    from jaxdiff.text_to_image import load_stable_diffusion

    t0 = time.perf_counter()
    folders = make_folders(work, p["num_images"], new_color)
    stages["folders"] = {"seconds": time.perf_counter() - t0, **folders}
    log(f"[folders] A: {folders['num_A']} images, B: {folders['num_B']} ({folders['num_B_new_color']} "
        f"{new_color}), all (the VAE's): {p['num_images']}, in {stages['folders']['seconds']:.1f} s")

    # ---- VAE on every image (vae_shapes; see the module docstring), exported into the init folder
    vae_dir = os.path.join(work, "vae_run")
    vae_over = {"data.name": f"folder:{folders['all']}", "data.image_size": 32, "train.num_steps": p["vae_steps"],
                "train.batch_size": p["vae_batch"], "train.checkpoint_every": p["vae_steps"],
                "train.log_every": p["log_every"], "train.warmup_steps": min(100, p["vae_steps"] // 10),
                "model.block_out_channels": tuple(p["vae_channels"])}
    secs = run_cli(TRAIN + ["--config=experiments/configs/vae_shapes.py", f"--workdir={vae_dir}"] +
                   [f"--config.{k}={v}" for k, v in vae_over.items()], env, os.path.join(work, "vae_run.log"))
    stages["vae"] = {"seconds": secs, "steps": p["vae_steps"], "batch": p["vae_batch"],
                     "steps_per_sec": steps_per_sec(vae_dir), **vae_ceiling(vae_dir, folders["B"], new_color)}
    v = stages["vae"]
    log(f"[vae] {p['vae_steps']} steps in {secs:.0f} s ({v['steps_per_sec']:.2f} steps/s); on folder B's "
        f"reconstructions: PSNR {v['psnr_db']:.1f} dB, checkers all-three {v['new_color']['all_accuracy']:.3f} "
        f"({new_color}) / {v['other_colors']['all_accuracy']:.3f} (others)")

    t0 = time.perf_counter()
    init = os.path.join(work, "sd_init")
    stages["init_folder"] = make_init_folder(init, vae_dir, p["unet"], p["text"])
    stages["init_folder"]["seconds"] = time.perf_counter() - t0
    log(f"[init] {init}: U-Net {stages['init_folder']['unet_params']:,} params, text encoder "
        f"{stages['init_folder']['text_encoder_params']:,}, VAE {stages['init_folder']['vae_params']:,}")

    # ---- base: full fine-tuning (U-Net + text encoder) on A, exported
    full_dir = os.path.join(work, "full_run")
    secs = run_cli(sd_args(init, folders["A"], full_dir, p, steps=p["base_steps"], batch=p["base_batch"],
                           lr=p["base_lr"], text_encoder=True, ema_decay=0.999), env,
                   os.path.join(work, "full_run.log"))
    t0 = time.perf_counter()
    base = os.path.join(work, "base")
    full = runs.load_run(full_dir)
    full_params = jax.device_get(full.params)
    export.export_sd_pipeline(init, full_params["unet"], base, text_encoder_params=full_params["text_encoder"],
                              source={"workdir": full_dir, "step": int(full.step), "params": "ema"})
    exported = jax.device_get(load_stable_diffusion(base).params)
    export_exact = (_leaves_equal(exported["unet"], full_params["unet"])
                    and _leaves_equal(exported["text_encoder"], full_params["text_encoder"]))
    stages["full"] = {"seconds": secs, "steps": p["base_steps"], "batch": p["base_batch"], "lr": p["base_lr"],
                      "steps_per_sec": steps_per_sec(full_dir), "trainable_params": _count(full_params),
                      "checkpoint_bytes": last_checkpoint_bytes(full_dir),
                      "export_seconds": time.perf_counter() - t0, "export_bit_exact": bool(export_exact),
                      "unet_file_bytes": du(os.path.join(base, "unet"))}
    f_ = stages["full"]
    log(f"[full] {p['base_steps']} steps x {p['base_batch']} in {secs:.0f} s ({f_['steps_per_sec']:.2f} steps/s), "
        f"{f_['trainable_params']:,} trainable params, checkpoint {f_['checkpoint_bytes']:,} B; exported to {base} "
        f"(weights equal to the run's EMA params: {export_exact})")
    return {"workdir": work, "folder_A": folders["A"], "folder_B": folders["B"], "init": init, "full_run": full_dir,
            "base": base}


def _count(tree) -> int:
    import jax

    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def train_lora(work: str, paths: dict, p: dict, env: dict, stages: dict):
    """Stage 4: LoRA on folder B from the exported base (the CLI), adapters exported; the base checked."""
    import jax

    from jaxdiff import runs
    from jaxdiff.interop import export
    from jaxdiff.nn import lora as lora_lib
    from jaxdiff.text_to_image import load_stable_diffusion

    base = paths["base"]
    base_hash = digest(base)
    base_unet = jax.device_get(load_stable_diffusion(base).params["unet"])
    lora_dir = os.path.join(work, "lora_run")
    rank = int(p["lora_rank"])
    secs = run_cli(sd_args(base, paths["folder_B"], lora_dir, p, steps=p["lora_steps"], batch=p["lora_batch"],
                           lr=p["lora_lr"], lora_rank=rank, ema_decay=0.99), env, os.path.join(work, "lora_run.log"))
    lora_run = runs.load_run(lora_dir)
    adapters = jax.device_get(lora_run.trainable["lora"])
    sizes = {}
    for name, dtype in (("f32", np.float32), ("f16", np.float16)):
        out = os.path.join(work, f"lora_{name}")
        export.export_sd_lora(out, adapters, rank=rank, alpha=float(rank), base_folder=base, dtype=dtype)
        sizes[f"file_bytes_{name}"] = os.path.getsize(os.path.join(out, "pytorch_lora_weights.safetensors"))
    base_identical = digest(base) == base_hash and _leaves_equal(
        jax.device_get(load_stable_diffusion(base).params["unet"]), base_unet)
    stages["lora"] = {"seconds": secs, "steps": p["lora_steps"], "batch": p["lora_batch"], "lr": p["lora_lr"],
                      "rank": rank, "alpha": float(rank), "steps_per_sec": steps_per_sec(lora_dir),
                      "trainable_params": lora_lib.count_lora_params(adapters),
                      "adapter_bytes_f32": lora_lib.lora_nbytes(adapters),
                      "checkpoint_bytes": last_checkpoint_bytes(lora_dir), **sizes,
                      "base_bit_identical": bool(base_identical)}
    lr_, full_ck = stages["lora"], stages["full"]["checkpoint_bytes"]
    log(f"[lora] rank {rank}: {p['lora_steps']} steps x {p['lora_batch']} in {secs:.0f} s "
        f"({lr_['steps_per_sec']:.2f} steps/s), {lr_['trainable_params']:,} trainable params, checkpoint "
        f"{lr_['checkpoint_bytes']:,} B (full: {full_ck:,} B), file {sizes['file_bytes_f32']:,} B f32 / "
        f"{sizes['file_bytes_f16']:,} B f16; base folder bit-identical after: {base_identical}")
    paths.update(workdir=work, lora_run=lora_dir, lora_f32=os.path.join(work, "lora_f32"),
                 lora_f16=os.path.join(work, "lora_f16"))
    return lora_run


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sd_folder_lora", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="a new (or empty) folder for every artifact")
    ap.add_argument("--json", default=None, help="also write the results here (always: WORKDIR/result.json)")
    ap.add_argument("--smoke", action="store_true", help="toy sizes, XLA -O0: checks the machinery only")
    ap.add_argument("--new_color", default="cyan", help="the colour left out of folder A and taught by the LoRA")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--diffusers", action="store_true",
                    help="also score the exported base folder and LoRA file in diffusers (needs torch, diffusers, peft)")
    ap.add_argument("--base_from", default=None,
                    help="the workdir of an earlier run: reuse its folders, VAE and base (stages 1-3), run "
                         "only the LoRA and the scoring (to try other LoRA settings)")
    for k, v in DEFAULTS.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            ap.add_argument(f"--{k}", type=type(v), default=None, help=f"default {v} (smoke: {SMOKE[k]})")
    a = ap.parse_args(argv)
    p = dict(SMOKE if a.smoke else DEFAULTS)
    p.update({k: getattr(a, k) for k in DEFAULTS if getattr(a, k, None) is not None})

    work = os.path.abspath(os.path.expanduser(a.workdir))
    if os.path.isdir(work) and os.listdir(work):
        raise SystemExit(f"error: --workdir={work} is not empty: give a new folder (every stage starts fresh)")
    earlier = None
    if a.base_from:
        try:
            with open(os.path.join(a.base_from, "result.json")) as f:
                earlier = json.load(f)
        except OSError as e:
            raise SystemExit(f"error: --base_from={a.base_from}: no result.json of an earlier run ({e})") from None
        if earlier["new_color"] != a.new_color:
            raise SystemExit(f"error: --base_from={a.base_from} taught {earlier['new_color']!r}, not {a.new_color!r}")
    os.makedirs(work, exist_ok=True)
    # Folder datasets and XLA's cache of the earlier run are reused with its base.
    root = os.path.abspath(a.base_from) if a.base_from else work
    env = dict(os.environ, JAXDIFF_DATA_DIR=os.path.join(root, "tfds"),
               JAX_COMPILATION_CACHE_DIR=os.path.join(root, "xla_cache"), PYTHONUNBUFFERED="1")
    if a.smoke:
        env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    os.environ.update({k: env[k] for k in ("JAXDIFF_DATA_DIR", "JAX_COMPILATION_CACHE_DIR")})
    import jax

    if a.smoke:
        jax.config.update("jax_disable_most_optimizations", True)
    jax.config.update("jax_compilation_cache_dir", env["JAX_COMPILATION_CACHE_DIR"])
    from benchmarks.harness import load_average, machine_info
    from jaxdiff import runs
    from jaxdiff.data import shapes

    if a.new_color not in shapes.COLORS:
        raise SystemExit(f"error: --new_color must be one of {shapes.COLORS}, got {a.new_color!r}")
    res = {"machine": machine_info(), "settings": dict(p), "new_color": a.new_color, "guidance": a.guidance,
           "stages": {}}
    stages = res["stages"]
    t_all = time.perf_counter()
    if earlier:
        stages.update({k: earlier["stages"][k] for k in ("folders", "vae", "init_folder", "full")})
        paths = {k: earlier["paths"][k] for k in ("folder_A", "folder_B", "init", "full_run", "base")}
        res["base_from"] = os.path.abspath(a.base_from)
        for k in ("num_images", "vae_steps", "vae_batch", "base_steps", "base_batch", "base_lr", "unet", "text",
                  "vae_channels"):
            res["settings"][k] = earlier["settings"][k]
        log(f"[base] reusing {paths['base']} (stages 1-3 of {a.base_from})")
    else:
        paths = build_base(work, p, a.new_color, env, stages)
    lora_run = train_lora(work, paths, p, env, stages)

    # ---- adherence, base vs LoRA, same prompts and noise
    labels = np.concatenate([shapes.all_labels()] * p["eval_templates"])
    prompts = [q for t in range(p["eval_templates"]) for q in shapes.all_prompts(t)]
    labels, prompts = labels[::p["eval_stride"]], prompts[::p["eval_stride"]]  # smoke: 21 prompts
    new_id = shapes.COLORS.index(a.new_color)
    res["adherence"] = {}
    for name, run in (("base", runs.load_run(paths["full_run"])), ("lora", lora_run)):
        r, images = score(run, labels, prompts, new_id, guidance=a.guidance, num_steps=p["eval_steps"])
        res["adherence"][name] = r
        np.savez_compressed(os.path.join(work, f"samples_{name}.npz"), images=images, labels=labels,
                            prompts=np.array(prompts))
        log(f"[adherence {name}] " + "; ".join(
            f"{part} ({r[part]['num_prompts']}): colour {r[part]['color_accuracy']:.3f}, position "
            f"{r[part]['position_accuracy']:.3f}, shape {r[part]['shape_accuracy']:.3f}, all {r[part]['all_accuracy']:.3f}"
            for part in ("new_color", "other_colors")) + f" ({r['seconds']:.0f} s)")
    if a.diffusers:
        res["adherence_diffusers"] = d = score_diffusers(paths["base"], paths["lora_f32"], labels, prompts, new_id,
                                                         guidance=a.guidance, num_steps=p["eval_steps"])
        for name, r in d.items():
            log(f"[diffusers {name}] {a.new_color} prompts: colour {r['new_color']['color_accuracy']:.3f}, all "
                f"{r['new_color']['all_accuracy']:.3f}; others: colour {r['other_colors']['color_accuracy']:.3f}, all "
                f"{r['other_colors']['all_accuracy']:.3f} ({r['seconds']:.0f} s)")
    res["total_seconds"] = time.perf_counter() - t_all
    res["machine"]["loadavg_end"] = load_average()
    res["paths"] = paths
    log(f"total {res['total_seconds']:.0f} s ({res['machine']['cpu']}, {res['machine']['cpu_cores']} cores)")
    for path in [os.path.join(work, "result.json")] + ([a.json] if a.json else []):
        with open(path, "w") as f:
            json.dump(res, f, indent=2, default=float)
    return res


if __name__ == "__main__":
    main()
