"""Fine-tuning a Stable Diffusion 1.x folder (experiments/configs/sd_finetune.py, model.pretrained).

Reference: diffusers' UNet2DConditionModel, DDPMScheduler (``add_noise`` / ``get_velocity``) and
transformers' CLIPTextModel (torch, CPU, fp32) loaded from a tiny random SD 1.x folder written here
with ``save_pretrained`` (as tests/test_text_to_image.py); jaxdiff loads the same folder. The loss
of one jaxdiff train step equals the torch loss on the same latents, noise, timesteps and token ids
(the torch side encodes the ids with its own text encoder); the gradient norm too. The rest runs the
library's training loop on a tiny captioned image folder: steps, resume, sampling, LoRA, frozen
weights, one-line config errors.
"""
import hashlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxdiff.tokenizers import bytes_to_unicode

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, LATENT = 16, 8  # pixels; the VAE's f = 2
CAPTIONS = ["a photo of a cat", "the dog", "hello the cat", "a photo of the dog"]
_MERGES = ["h e", "l l", "he ll", "hell o</w>", "t h", "th e</w>", "c a", "ca t</w>", "a t</w>", "o n",
           "d o", "do g</w>", "p h", "ph o", "pho t", "phot o</w>", "o f</w>"]


pytestmark = pytest.mark.slow  # Stable Diffusion parity with diffusers, training runs, subprocesses


@pytest.fixture(scope="module", autouse=True)
def _cheap_cpu(xla_o0, torch_one_thread):
    """XLA -O0 for this module's programs and one torch thread (see conftest)."""


def _tiny_tokenizer(d):
    base = list(bytes_to_unicode().values())
    vocab = base + [c + "</w>" for c in base] + [m.replace(" ", "") for m in _MERGES]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(d / "vocab.json", "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(d / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(_MERGES) + "\n")
    return transformers.CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=77), len(vocab)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A tiny SD 1.x folder (StableDiffusionPipeline.save_pretrained), SD's scheduler (eps)."""
    tokenizer, n_vocab = _tiny_tokenizer(tmp_path_factory.mktemp("bpe"))
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
    scheduler = diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("sd") / "tiny-sd"
    pipe.save_pretrained(str(folder))
    with open(folder / "vae" / "config.json") as f:  # a scaling factor that is not SD's default
        cfg = json.load(f)
    with open(folder / "vae" / "config.json", "w") as f:
        json.dump({**cfg, "scaling_factor": 0.5}, f)
    return str(folder)


@pytest.fixture(scope="module")
def v_folder(sd_folder, tmp_path_factory):
    """The same weights with a v-prediction scheduler (SD 2.x style)."""
    folder = tmp_path_factory.mktemp("sdv") / "tiny-sd-v"
    folder.mkdir()
    for sub in ("unet", "vae", "text_encoder", "tokenizer"):
        os.symlink(os.path.join(sd_folder, sub), folder / sub)
    (folder / "scheduler").mkdir()
    with open(os.path.join(sd_folder, "scheduler", "scheduler_config.json")) as f:
        cfg = json.load(f)
    with open(folder / "scheduler" / "scheduler_config.json", "w") as f:
        json.dump({**cfg, "prediction_type": "v_prediction"}, f)
    return str(folder)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A captioned image folder: 4 PNGs and metadata.jsonl."""
    root = tmp_path_factory.mktemp("captioned")
    rng = np.random.RandomState(0)
    with open(root / "metadata.jsonl", "w") as f:
        for i, caption in enumerate(CAPTIONS):
            x = np.clip(rng.randn(SIZE, SIZE, 3) * 40 + 128 + 30 * np.arange(3), 0, 255).astype(np.uint8)
            Image.fromarray(x).save(root / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": caption}) + "\n")
    return str(root)


def _config(folder, images, **overrides):
    from experiments.configs import sd_finetune

    c = sd_finetune.get_config()
    c.model.pretrained = folder
    c.data.name = f"folder:{images}"
    c.data.image_size = SIZE
    c.model.dtype = "float32"
    c.model.remat = False
    c.train.batch_size = 2
    c.train.num_steps = 2
    c.train.checkpoint_every = 2
    c.train.log_every = 1
    c.train.num_samples = 0
    c.train.lr = 1e-3
    c.sample.num_steps = 3
    c.sample.guidance = 2.0
    c.sample.prompts = ["a photo of a cat", "the dog"]
    for k, v in overrides.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def _digest(folder):
    h = hashlib.sha256()
    for d, _, files in sorted(os.walk(folder, followlinks=True)):
        for f in sorted(files):
            with open(os.path.join(d, f), "rb") as fh:
                h.update(f.encode() + fh.read())
    return h.hexdigest()


# ----------------------------------------------------------------------------- parity with diffusers
@pytest.mark.parametrize("kind,compute", [("epsilon", "float32_remat"), ("v_prediction", "float32"),
                                          ("epsilon", "bfloat16_remat")])
def test_one_step_loss_matches_diffusers(sd_folder, v_folder, images, kind, compute):
    """One jaxdiff train step vs diffusers (fp32): the same latents, noise, timesteps and token ids give
    the same MSE against the eps or v target (diffusers' add_noise / get_velocity), and the same
    gradient norm over the U-Net's params. Gradient checkpointing (model.remat) recomputes the same
    float32 arithmetic, so it matches as tightly; bf16 compute (the config's default, with remat) keeps
    float32 master params and Adam state and lands within bf16 rounding."""
    from jaxdiff.train import build
    from jaxdiff.train.step import create_train_state, make_optimizer, make_train_step

    folder = sd_folder if kind == "epsilon" else v_folder
    over = {"diffusion.p_uncond": 0.0, "model.remat": compute.endswith("_remat"),
            "model.dtype": compute.split("_")[0]}
    config, model = build.load_pretrained(_config(folder, images, **over))
    assert config.diffusion.prediction == {"epsilon": "eps", "v_prediction": "v"}[kind]
    schedule = build.build_schedule(config)
    optimizer = make_optimizer(learning_rate=1e-4, grad_clip=None)
    step = make_train_step(model.train_apply_fn(0.0), optimizer, schedule, prediction=config.diffusion.prediction,
                           seed=config.seed)
    b = 2
    rng = np.random.RandomState(1)
    x0 = rng.randn(b, LATENT, LATENT, 4).astype(np.float32)  # scaled latents, NHWC
    ids, mask = model.tokenize(["a photo of a cat", "hello the dog"])
    frozen = model.frozen_params(model.base)
    state = create_train_state(model.init_trainable(jax.random.key(0), model.base), optimizer)
    new_state, metrics = jax.jit(step)(state, {"image": x0, "input_ids": ids, "attention_mask": mask}, frozen)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(new_state.params))  # master params stay fp32
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(new_state.opt_state) if a.dtype.kind == "f")

    # The timesteps and noise jaxdiff's step drew (diffusion_loss: t, eps, model keys from the step key).
    t_key, eps_key, _ = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 0), 3)
    t = np.asarray(jax.random.randint(t_key, (b,), 0, schedule.num_timesteps))
    eps = np.asarray(jax.random.normal(eps_key, x0.shape, jnp.float32))

    unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    te = transformers.CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"))
    sched = diffusers.DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    assert sched.config.prediction_type == kind
    lat, noise = (torch.from_numpy(a.transpose(0, 3, 1, 2).copy()) for a in (x0, eps))
    tt = torch.from_numpy(t.astype(np.int64))
    with torch.no_grad():
        context = te(torch.from_numpy(ids.astype(np.int64)))[0]
    noisy = sched.add_noise(lat, noise, tt)
    target = noise if kind == "epsilon" else sched.get_velocity(lat, noise, tt)
    pred = unet(noisy, tt, encoder_hidden_states=context).sample
    loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean")
    loss.backward()
    grad_norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in unet.parameters())))

    got, want = float(metrics["loss"]), float(loss)
    print(f"\n[{kind}, {compute}] loss jaxdiff {got:.8f} diffusers {want:.8f} rel {abs(got - want) / want:.2e}; "
          f"grad norm {float(metrics['grad_norm']):.6f} vs {grad_norm:.6f}")
    loss_tol, grad_tol = (1e-2, 1e-2) if compute.startswith("bfloat16") else (1e-5, 1e-4)
    assert abs(got - want) <= loss_tol * abs(want)
    assert abs(float(metrics["grad_norm"]) - grad_norm) <= grad_tol * grad_norm
    if compute.startswith("bfloat16"):
        assert abs(got - want) > 1e-6 * abs(want)  # bf16 really ran


# ----------------------------------------------------------------------------- the training loop
def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_finetune_resume_sample(sd_folder, images, data_dir, tmp_path, lora_rank):
    """A captioned folder fine-tunes through the library's loop (2 steps) and loads with load_run; the
    folder's files, the frozen VAE and text encoder (and, under LoRA, the base U-Net) stay
    bit-identical. The LoRA run (the loop is the same for both) also resumes to 3 steps, samples, holds
    only the adapters in its checkpoints, and exports a LoRA file (python -m experiments.export) that
    diffusers' load_lora_weights + fuse_lora turn into the U-Net jaxdiff merged."""
    from jaxdiff import generation, runs
    from jaxdiff.train import build
    from jaxdiff.train.checkpoint import Checkpointer
    from jaxdiff.train.loop import train

    before = _digest(sd_folder)
    workdir = str(tmp_path / "run")
    # LoRA on the U-Net; or full fine-tuning of the U-Net and the text encoder (train.text_encoder)
    over = {"model.lora_rank": lora_rank, "model.lora_alpha": 3.0} if lora_rank else {"train.text_encoder": True}
    s1 = train(_config(sd_folder, images, **over), workdir)
    assert s1["step"] == 2 and np.isfinite(s1["loss"])
    last = 2
    if lora_rank:
        s2 = train(_config(sd_folder, images, **over, **{"train.num_steps": 3}), workdir)
        assert s2["step"] == 3 and s2["checkpoint_step"] == 3
        last = 3
    else:
        s2 = s1

    _, fresh = build.load_pretrained(_config(sd_folder, images, **over))
    trained = jax.device_get(s2["state"].params)
    assert sorted(trained) == (["lora"] if lora_rank else ["text_encoder", "unet"])
    if lora_rank:  # the base U-Net and text encoder the step saw are the folder's, unchanged
        assert _leaves_equal(s2["frozen"]["unet"], fresh.base["unet"])
        assert _leaves_equal(s2["frozen"]["text_encoder"], fresh.base["text_encoder"])
    else:  # training moved both; nothing is frozen
        assert not _leaves_equal(trained["unet"], fresh.base["unet"])
        assert not _leaves_equal(trained["text_encoder"], fresh.base["text_encoder"])
        assert not s2["frozen"]

    ck = Checkpointer(workdir, read_only=True)
    try:
        meta = ck.restore_meta(last)
    finally:
        ck.close()
    assert meta["pretrained"]["folder"] == os.path.abspath(sd_folder)
    assert meta["pretrained"]["scaling_factor"] == 0.5 and meta["pretrained"]["trainable"] == sorted(trained)
    assert meta["config"]["diffusion"]["prediction"] == "eps"
    if lora_rank:
        assert meta["pretrained"]["lora"] == {"rank": 2, "alpha": 3.0, "targets": ["to_k", "to_q", "to_v", "to_out.0"]}
        saved = os.path.join(workdir, "checkpoints", "3")
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(saved) for f in fs)
        unet_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(fresh.base["unet"]))
        assert size < unet_bytes / 2  # adapters (+ EMA, Adam), not the U-Net

    run = runs.load_run(workdir)
    assert sorted(run.params) == ["text_encoder", "unet"] and run.model.autoencoder.scale_factor == 0.5
    assert _leaves_equal(run.model.autoencoder.params, fresh.autoencoder.params)
    ema = jax.device_get(s2["state"].ema_params)
    if lora_rank:  # merged once: the same as merging the EMA adapters by hand
        from jaxdiff.nn import lora

        want = lora.merge(fresh.base["unet"], ema["lora"], alpha=3.0, rank=2)
        assert max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                   for a, b in zip(jax.tree.leaves(run.params["unet"]), jax.tree.leaves(want))) < 1e-6
        assert _leaves_equal(run.params["text_encoder"], fresh.base["text_encoder"])
    else:
        assert _leaves_equal(run.params["unet"], ema["unet"])
        assert _leaves_equal(run.params["text_encoder"], ema["text_encoder"])
        # Export: the whole pipeline, the trained unet/ and text_encoder/ in diffusers / transformers files.
        exported = tmp_path / "pipeline"
        r = subprocess.run([sys.executable, "-m", "experiments.export", f"--workdir={workdir}", f"--out={exported}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        from jaxdiff.interop.clip import clip_text_params_to_transformers
        from jaxdiff.interop.unet2d_cond import unet2d_condition_params_to_diffusers

        pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(exported), safety_checker=None)
        te_state = pipe.text_encoder.state_dict()  # transformers 5 names its keys without "text_model."
        prefix = "text_model." if any(k.startswith("text_model.") for k in te_state) else ""
        for theirs, ours in (
                (pipe.unet.state_dict(), unet2d_condition_params_to_diffusers(ema["unet"], dict(pipe.unet.config))),
                (te_state, clip_text_params_to_transformers(ema["text_encoder"], prefix=prefix))):
            assert set(ours) <= set(theirs)
            for k in ours:
                np.testing.assert_array_equal(ours[k], theirs[k].numpy(), err_msg=k)
        assert _digest(os.path.join(exported, "vae")) == _digest(os.path.join(sd_folder, "vae"))
        assert _digest(sd_folder) == before
        return
    out = generation.generate_text(run.model, run.params, run.schedule, run.config, prompts=["a photo of a cat", "the dog"],
                                   key=jax.random.key(0))
    assert out.shape == (2, SIZE, SIZE, 3) and out.dtype == np.uint8 and out.std() > 0

    # Export: the LoRA file, applied by diffusers/peft to the base pipeline, gives jaxdiff's merged U-Net.
    exported = tmp_path / "lora"
    r = subprocess.run([sys.executable, "-m", "experiments.export", f"--workdir={workdir}", f"--out={exported}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(exported)) == ["jaxdiff_export.json", "pytorch_lora_weights.safetensors"], r.stdout
    assert "LoRA rank 2, alpha 3" in r.stdout
    from jaxdiff.interop.unet2d_cond import unet2d_condition_params_to_diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)
    pipe.load_lora_weights(str(exported))
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # the fused weights stay
    theirs = {k: v.detach().numpy() for k, v in pipe.unet.state_dict().items()}
    ours = unet2d_condition_params_to_diffusers(jax.device_get(run.params["unet"]), dict(pipe.unet.config))
    assert sorted(ours) == sorted(theirs)
    moved = [k for k in ours if "to_q" in k or "to_k" in k or "to_v" in k or "to_out.0" in k]
    base_sd = diffusers.UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet").state_dict()
    assert max(float(np.max(np.abs(theirs[k] - base_sd[k].numpy()))) for k in moved) > 0  # the adapters did something
    for k in ours:
        np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-6, err_msg=k)
    r = subprocess.run([sys.executable, "-m", "experiments.export", f"--workdir={workdir}", f"--out={exported}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "not empty" in r.stderr and "Traceback" not in r.stderr
    # --no-ema: the file holds the raw (optimizer's) adapters of the last checkpoint.
    raw_out = tmp_path / "lora_raw"
    r = subprocess.run([sys.executable, "-m", "experiments.export", f"--workdir={workdir}", f"--out={raw_out}",
                        "--no-ema"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    from jaxdiff.interop.lora import load_diffusers_lora

    back, alpha, rank = load_diffusers_lora(str(raw_out / "pytorch_lora_weights.safetensors"))
    assert (alpha, rank) == (3.0, 2)
    assert _leaves_equal(back, trained["lora"]) and not _leaves_equal(back, ema["lora"])
    assert _digest(sd_folder) == before


def test_config_errors_are_one_line(sd_folder, images, data_dir, tmp_path):
    from jaxdiff.train.loop import train

    cases = [({"model.pretrained": ""}, "model.pretrained is not set"),
             ({"model.pretrained": str(tmp_path / "nope")}, "no such folder"),
             ({"model.pretrained": images}, "lacks unet/"),
             ({"model.lora_rank": 2, "model.lora_targets": ("nothing_like_this",)}, "model.lora_targets"),
             ({"data.image_size": 10}, "multiple of 4"),
             ({"data.name": ""}, "data.name is not set")]
    for over, match in cases:
        with pytest.raises(ValueError, match=match) as e:
            train(_config(sd_folder, images, **over), str(tmp_path / "run"))
        assert "\n" not in str(e.value), str(e.value)
    r = subprocess.run([sys.executable, "-m", "experiments.train", "--config=experiments/configs/sd_finetune.py",
                        f"--config.model.pretrained={tmp_path / 'nope'}", f"--config.data.name=folder:{images}",
                        f"--workdir={tmp_path / 'cli'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert r.returncode == 1 and len(err) == 1 and "no such folder" in err[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
