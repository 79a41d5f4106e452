"""Stable Diffusion text-to-image (jaxdiff.text_to_image; experiments/txt2img.py is a thin CLI over it).

Reference: diffusers' StableDiffusionPipeline (torch, CPU, fp32) on a tiny randomly initialised
(and perturbed) SD 1.x folder written here with ``save_pretrained``: UNet2DConditionModel
(32/64 channels), AutoencoderKL (f = 2), CLIPTextModel (width 32, 2 layers) and a tiny BPE
vocabulary; both sides load the same folder and start from the same latents. The scheduler is
SD 1.x's (scaled_linear 0.00085..0.012, steps_offset 1, set_alpha_to_one False, leading spacing).
All tests but one share a single compiled generation (B = 2, 16x16, DDIM 4 steps, guided).
"""
import json
import os

import jax
import numpy as np
import pytest

from jaxdiff import generation
from jaxdiff import text_to_image as t2i
from jaxdiff.tokenizers import bytes_to_unicode

pytestmark = pytest.mark.slow  # Stable Diffusion pipeline parity with diffusers

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

PROMPTS = ["a photo of a cat", "hello the dog"]
B, SIZE, LATENT = 2, 16, 8
STEPS, GUIDANCE = 4, 3.0
TOL = 1e-4
_MERGES = ["h e", "l l", "he ll", "hell o</w>", "t h", "th e</w>", "c a", "ca t</w>", "a t</w>", "o n",
           "d o", "do g</w>", "p h", "ph o", "pho t", "phot o</w>", "o f</w>"]


def _tiny_tokenizer(d):
    base = list(bytes_to_unicode().values())
    vocab = base + [c + "</w>" for c in base] + [m.replace(" ", "") for m in _MERGES]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(d / "vocab.json", "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(d / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(_MERGES) + "\n")
    return transformers.CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=77), len(vocab)


@pytest.fixture(scope="module", autouse=True)
def _cheap_cpu(xla_o0, torch_one_thread):
    """XLA -O0 for this module's programs and one torch thread (see conftest)."""


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A tiny SD 1.x folder saved by StableDiffusionPipeline.save_pretrained."""
    tok_dir = tmp_path_factory.mktemp("bpe")
    tokenizer, n_vocab = _tiny_tokenizer(tok_dir)
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=LATENT, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, layers_per_block=1,
        sample_size=SIZE)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=n_vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=n_vocab - 2, eos_token_id=n_vocab - 1, pad_token_id=n_vocab - 1))
    for model, scale in ((unet, 0.1), (vae, 0.05), (text_encoder, 0.1)):  # off the default init
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * torch.randn_like(p))
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("sd") / "tiny-sd"
    pipe.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def ref_pipe(sd_folder):
    """diffusers' pipeline read back from the folder (so both sides see the same saved configs)."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.saved_scheduler_config = pipe.scheduler.config
    return pipe


@pytest.fixture(scope="module")
def sd(sd_folder):
    return t2i.load_stable_diffusion(sd_folder)


def _latents(seed=0):
    return np.random.RandomState(seed).randn(B, 4, LATENT, LATENT).astype(np.float32)  # NCHW, as diffusers


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _ours(sd, method="ddim", **kw):
    kw = dict(dict(key=jax.random.key(0), num_steps=STEPS, guidance_scale=GUIDANCE, method=method,
                   latents=_latents().transpose(0, 2, 3, 1)), **kw)
    return np.asarray(t2i.text_to_image(sd, kw.pop("prompts", PROMPTS), **kw))


def _theirs(pipe, scheduler=None, **kw):
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.saved_scheduler_config)
    kw = dict(dict(prompt=PROMPTS, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   latents=torch.from_numpy(_latents()), output_type="np"), **kw)
    with torch.no_grad():
        return pipe(**kw).images


def test_loads_folder(sd, sd_folder):
    assert sd.scheduler == t2i.SchedulerConfig(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction="eps",
        timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, scheduler_class="DDIMScheduler",
        method="ddim")
    assert sd.default_size == SIZE and sd.vae_scale_factor == 2 and sd.scaling_factor == pytest.approx(0.18215)
    assert sorted(os.listdir(os.path.join(sd_folder, "tokenizer"))) == ["tokenizer.json", "tokenizer_config.json"]
    ref = transformers.CLIPTokenizer.from_pretrained(os.path.join(sd_folder, "tokenizer"))
    want = ref(PROMPTS + [""], padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert t2i.tokenize(sd, PROMPTS + [""])[0].tolist() == want


def test_sd15_hub_layout(tmp_path):
    """SD 1.5's Hub files: a PNDM scheduler config without timestep_spacing (each sampler then takes
    diffusers' default) and a tokenizer folder with vocab.json + merges.txt."""
    hub = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
           "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
           "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
           "clip_sample": False}
    cfg = t2i.SchedulerConfig.from_diffusers(hub)
    assert cfg == t2i.SchedulerConfig(steps_offset=1, set_alpha_to_one=False,  # eps, spacing per method
                                      scheduler_class="PNDMScheduler", method="pndm")
    assert t2i.SchedulerConfig.from_diffusers({**hub, "skip_prk_steps": False}).method is None  # no PRK warm-up
    ref = diffusers.DDIMScheduler.from_config(hub)
    np.testing.assert_allclose(t2i.build_schedule(cfg).alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="prediction_type"):
        t2i.SchedulerConfig.from_diffusers(dict(hub, prediction_type="flow"))
    ref_tok, _ = _tiny_tokenizer(tmp_path)
    ref_tok.save_pretrained(str(tmp_path / "saved"))  # tokenizer.json only (transformers >= 5)
    texts = PROMPTS + ["Hello, the CAT's photo!", ""]
    for folder in (tmp_path, tmp_path / "saved"):
        got = t2i.load_clip_tokenizer(str(folder))(texts)["input_ids"]
        assert got.tolist() == ref_tok(texts, padding="max_length", max_length=77, truncation=True)["input_ids"]


def test_encode_prompts_matches_diffusers(sd, ref_pipe):
    context, mask = t2i.encode_prompts(sd, PROMPTS)
    with torch.no_grad():
        want, _ = ref_pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    assert mask is None and context.shape == (B, 77, 32)
    assert _rel(context, want.numpy()) < 1e-5


@pytest.mark.parametrize("method", ["ddim", "dpmpp_2m"])
def test_matches_diffusers(sd, ref_pipe, method):
    """Same folder, prompts and latents: the images agree (DDIM also with negative prompts)."""
    scheduler = {"ddim": diffusers.DDIMScheduler, "dpmpp_2m": diffusers.DPMSolverMultistepScheduler}[method]
    extra = {"eta": 0.0} if method == "ddim" else {}
    want = _theirs(ref_pipe, scheduler, **extra)
    got = _ours(sd, method)
    assert got.shape == (B, SIZE, SIZE, 3) and got.dtype == np.float32
    assert 0.05 < want.std() and 0.0 <= got.min() and got.max() <= 1.0
    errs = {"default negative": _rel(got, want)}
    if method == "ddim":  # a second call with other texts reuses the compiled program
        neg = ["the cat", "photo"]
        errs["negative prompts"] = _rel(_ours(sd, method, negative_prompt=neg),
                                        _theirs(ref_pipe, negative_prompt=neg, **extra))
    print(f"\n[{method}] max relative error vs diffusers: {errs}")
    assert max(errs.values()) < TOL, errs


def test_no_retrace_on_new_prompts_keys_guidance_params(sd):
    """One compiled program: new prompts, negative prompts, keys, guidance and even new params
    (they are arguments, not constants) do not retrace."""
    base = _ours(sd)
    n = t2i._generate._cache_size()
    a = _ours(sd, prompts=["the dog", "a photo of the cat!"], negative_prompt="blurry", guidance_scale=5.0,
              key=jax.random.key(3))
    b = _ours(sd, latents=None, key=jax.random.key(1))
    other = jax.tree.map(lambda p: p, sd)  # the params are the pytree's leaves (containers are rebuilt)
    assert isinstance(other, t2i.StableDiffusion) and other.unet is sd.unet
    other.params["unet"]["conv_out"]["bias"] = other.params["unet"]["conv_out"]["bias"] + 0.5
    c = _ours(other)
    assert t2i._generate._cache_size() == n
    assert np.abs(a - base).max() > 1e-3 and np.abs(b - base).max() > 1e-3 and np.abs(c - base).max() > 1e-4


def test_missing_pieces(sd_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        t2i.load_stable_diffusion(str(tmp_path / "nope"))
    broken = tmp_path / "broken"
    broken.mkdir()
    for sub in ("unet", "vae", "scheduler"):
        os.symlink(os.path.join(sd_folder, sub), broken / sub)
    with pytest.raises(FileNotFoundError, match=r"lacks text_encoder/, tokenizer/"):
        t2i.load_stable_diffusion(str(broken))
    os.symlink(os.path.join(sd_folder, "text_encoder"), broken / "text_encoder")
    (broken / "tokenizer").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        t2i.load_stable_diffusion(str(broken))
    os.unlink(broken / "scheduler")
    (broken / "scheduler").mkdir()
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        t2i.load_stable_diffusion(str(broken))


def test_bad_arguments(sd):
    with pytest.raises(ValueError, match="multiples of 4"):
        t2i.text_to_image(sd, PROMPTS, key=jax.random.key(0), height=18, width=16)
    with pytest.raises(ValueError, match="latents must be"):
        t2i.text_to_image(sd, PROMPTS, key=jax.random.key(0), latents=_latents())  # NCHW, not NHWC
    with pytest.raises(ValueError, match="Unknown sampling method"):
        t2i.text_to_image(sd, PROMPTS, key=jax.random.key(0), method="plms")
    with pytest.raises(ValueError, match="negative_prompt has 1 entries for 2"):
        t2i.text_to_image(sd, PROMPTS, key=jax.random.key(0), negative_prompt=["x"])


def test_generate_sd_batches(sd):
    """The batch loop of experiments.txt2img (generation.generate_sd): batch i is text_to_image with
    fold_in(key, i), the last batch padded with its last prompt and the padding dropped, prompts cycled,
    pixels rounded as diffusers' numpy_to_pil."""
    key = jax.random.key(3)
    images, prompts = generation.generate_sd(sd, PROMPTS, num=3, key=key, batch_size=2, num_steps=STEPS,
                                             guidance_scale=GUIDANCE, method="ddim")
    assert images.shape == (3, SIZE, SIZE, 3) and images.dtype == np.uint8 and prompts == PROMPTS + PROMPTS[:1]
    kw = dict(num_steps=STEPS, guidance_scale=GUIDANCE, method="ddim")
    first = np.asarray(t2i.text_to_image(sd, PROMPTS, key=jax.random.fold_in(key, 0), **kw))
    last = np.asarray(t2i.text_to_image(sd, PROMPTS[:1] * 2, key=jax.random.fold_in(key, 1), **kw))
    want = (np.concatenate([first, last[:1]]) * 255).round().astype(np.uint8)  # diffusers' numpy_to_pil
    np.testing.assert_array_equal(images, want)
    with pytest.raises(ValueError, match="at least one prompt"):
        generation.generate_sd(sd, [], num=1, key=key)
    with pytest.raises(ValueError, match="batch_size"):
        generation.generate_sd(sd, PROMPTS, num=1, key=key, batch_size=0)


@pytest.mark.slow
def test_txt2img_cli(sd, sd_folder, tmp_path):
    """python -m experiments.txt2img writes OUT.png and OUT.npz holding generate_sd's images."""
    import subprocess
    import sys

    out = str(tmp_path / "grid")
    r = subprocess.run([sys.executable, "-m", "experiments.txt2img", f"--model={sd_folder}", "--prompt",
                        PROMPTS[0], "--num=2", f"--steps={STEPS}", f"--guidance={GUIDANCE}", "--sampler=ddim",
                        "--seed=5", f"--out={out}"], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    saved = np.load(out + ".npz")
    want, _ = generation.generate_sd(sd, PROMPTS[0], num=2, key=jax.random.key(5), num_steps=STEPS,
                                     guidance_scale=GUIDANCE, method="ddim")
    np.testing.assert_array_equal(saved["images"], want)
    assert list(saved["prompts"]) == [PROMPTS[0]] * 2 and int(saved["seed"]) == 5
    assert os.path.getsize(out + ".png") > 0 and "Wrote" in r.stdout


def test_no_sampler_given_uses_the_folders_scheduler(sd, ref_pipe):
    """Stable Diffusion 1.x folders name PNDMScheduler (skip_prk_steps, set_alpha_to_one=False):
    with no method, jaxdiff samples with PNDM and matches diffusers' pipeline with that scheduler."""
    import dataclasses

    pndm = {**ref_pipe.saved_scheduler_config, "_class_name": "PNDMScheduler", "skip_prk_steps": True}
    sd_pndm = dataclasses.replace(sd, scheduler=t2i.SchedulerConfig.from_diffusers(pndm))
    assert sd_pndm.scheduler.method == "pndm"
    ours = _ours(sd_pndm, method=None)
    ref_pipe.scheduler = diffusers.PNDMScheduler.from_config(pndm)
    try:
        theirs = _theirs(ref_pipe)
    finally:
        ref_pipe.scheduler = diffusers.DDIMScheduler.from_config(ref_pipe.saved_scheduler_config)
    assert _rel(ours, theirs) < 1e-5
    assert _rel(ours, _ours(sd_pndm, method="ddim")) > 1e-3  # a different sampler gives other images
    no_match = dataclasses.replace(sd, scheduler=t2i.SchedulerConfig.from_diffusers({**pndm, "skip_prk_steps": False}))
    with pytest.raises(ValueError, match=r"The folder's scheduler \(PNDMScheduler\) has no jaxdiff sampler"):
        _ours(no_match, method=None)
