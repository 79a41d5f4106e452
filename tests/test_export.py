"""Export to diffusers / transformers (jaxdiff.interop.export, python -m experiments.export).

References are diffusers' and transformers' own classes (torch, CPU, fp32, eval mode) loaded with
``from_pretrained`` from the exported folders and run on the same inputs as our modules: nothing
the exporter computes is used as an expected value. Our params are random inits moved off their
default values (GroupNorm 1/0 included), so every tensor's layout matters.
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.interop import export
from jaxdiff.interop._common import abstract_param_shapes, flatten_params, set_param
from jaxdiff.interop.clip import load_transformers_clip_text
from jaxdiff.interop.safetensors_io import read_diffusers_folder
from jaxdiff.interop.unet2d import unet_config_from_diffusers, unet_params_from_diffusers
from jaxdiff.interop.unet2d_cond import load_unet2d_condition
from jaxdiff.interop.vae import load_diffusers_vae
from jaxdiff.nn.text import CLIPTextTransformer
from jaxdiff.nn.unet import UNet
from jaxdiff.nn.unet_cond import TextConditionedUNet, UNetCondition
from jaxdiff.nn.vae import AutoencoderKL
from jaxdiff.schedules import make_schedule
from jaxdiff.tokenizers import WordTokenizer

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.usefixtures("torch_one_thread", "xla_o0"),
              # diffusers 0.42 + NumPy 2 in set_timesteps
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]
TOL = 1e-5
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                   "xla_llvm_disable_expensive_passes": True})


def rel(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def random_params(module, *inputs, seed=0):
    """Random params of ``module`` (shapes from jax.eval_shape: no init is compiled): kernels
    N(0, 1/fan_in), norm scales 1 + N(0, 0.1^2), biases N(0, 0.1^2), embeddings N(0, 0.5^2), so
    no tensor sits at a value (1 or 0) that would hide a layout mistake."""
    rng = np.random.RandomState(seed)
    params = {}
    for path, shape in sorted(abstract_param_shapes(module, *inputs).items()):
        n = rng.randn(*shape).astype(np.float32)
        leaf = path[-1]
        w = (n / np.sqrt(np.prod(shape[:-1])) if leaf == "kernel" else 1.0 + 0.1 * n
             if leaf == "scale" else 0.5 * n if leaf == "embedding" else 0.1 * n)
        set_param(params, path, w.astype(np.float32))
    return params


def perturbed(params, seed=0, scale=0.1):
    """Every leaf of ``params`` moved by N(0, scale^2) noise."""
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda l: np.asarray(l, np.float32)
                        + scale * rng.randn(*np.shape(l)).astype(np.float32), params)


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def assert_same_tree(a, b):
    fa, fb = flatten_params(a), flatten_params(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


# ----------------------------------------------------------------------------- UNet2DModel
# DDPM conventions (our defaults): sin-first, shift 1, pad (0, 1), eps 1e-6; attention at 4x4.
PIXEL_UNET = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
                  num_groups=8)


def _unet(num_classes=None, **kw):
    module = UNet(**{**PIXEL_UNET, **kw}, num_classes=num_classes)
    y = None if num_classes is None else jnp.zeros((1,), jnp.int32)
    return module, random_params(module, jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,)), y)


@pytest.fixture(scope="module")
def cond_pipeline(tmp_path_factory):
    """A class-conditional (4 classes + null) pixel U-Net exported as a DDPMPipeline folder."""
    module, params = _unet(num_classes=4)
    out = str(tmp_path_factory.mktemp("export") / "ddpm_cond")
    sched = export.ddpm_scheduler_config("cosine", 1000, prediction="v", clip_x0=1.0)
    info = export.export_ddpm_pipeline(out, module, params, image_shape=(8, 8, 3),
                                       scheduler=sched, class_names=list("abcd"))
    return module, params, out, info


def test_unet2d_class_conditional_matches_diffusers(cond_pipeline):
    module, params, out, info = cond_pipeline
    ref = diffusers.UNet2DModel.from_pretrained(out, subfolder="unet").eval()
    assert ref.config.num_class_embeds == 5 and ref.config.attention_head_dim is None
    rng = np.random.RandomState(1)
    x = rng.randn(4, 8, 8, 3).astype(np.float32)
    t = np.array([0.0, 17.5, 500.0, 999.0], np.float32)
    y = np.array([0, 3, 1, 4], np.int32)  # 4 = the null label (our y=None)
    with torch.no_grad():
        want = nhwc(ref(nchw(x), torch.from_numpy(t), class_labels=torch.from_numpy(y)).sample)
    got = jit(lambda p, x, t, y: module.apply({"params": p}, x, t, y))(params, x, t, y)
    assert rel(got, want) <= TOL
    # Our null label (y=None) is diffusers' class_labels=num_classes.
    null = jit(lambda p, x, t: module.apply({"params": p}, x, t))(params, x, t)
    with torch.no_grad():
        want_null = nhwc(ref(nchw(x), torch.from_numpy(t),
                             class_labels=torch.full((4,), 4)).sample)
    assert rel(null, want_null) <= TOL
    assert info["labels"] == {"num_classes": 4, "null_label": 4, "class_names": list("abcd")}


def test_ddpm_pipeline_loads_and_round_trips(cond_pipeline):
    module, params, out, _ = cond_pipeline
    pipe = diffusers.DDPMPipeline.from_pretrained(out)
    assert isinstance(pipe.unet, diffusers.UNet2DModel)
    assert isinstance(pipe.scheduler, diffusers.DDPMScheduler)
    c = pipe.scheduler.config
    assert (c.num_train_timesteps, c.beta_schedule, c.prediction_type, c.clip_sample,
            c.clip_sample_range, c.trained_betas) == (1000, "squaredcos_cap_v2", "v_prediction",
                                                      True, 1.0, None)
    ours = make_schedule("cosine", 1000)
    assert rel(pipe.scheduler.betas.numpy(), ours.betas) <= 1e-6
    assert rel(pipe.scheduler.alphas_cumprod.numpy(), ours.alphas_cumprod) <= 1e-5
    # Round trip: our loader reads back exactly the params we wrote, and the same module.
    config, state = read_diffusers_folder(out, subfolder="unet")
    assert UNet(**unet_config_from_diffusers(config)) == module.clone(out_channels=3)
    assert_same_tree(unet_params_from_diffusers(state, config), params)


def test_unet2d_heads_and_errors(tmp_path):
    # Several heads export as diffusers' fixed head width when it is one width everywhere.
    module, params = _unet(ch_mult=(1, 1), num_heads=2)
    cfg = export.save_unet2d(str(tmp_path / "u"), module, params, image_shape=(8, 8, 3))
    assert cfg["attention_head_dim"] == 8
    ref = diffusers.UNet2DModel.from_pretrained(str(tmp_path / "u")).eval()
    x = np.random.RandomState(2).randn(2, 8, 8, 3).astype(np.float32)
    t = np.array([3.0, 700.0], np.float32)
    with torch.no_grad():
        want = nhwc(ref(nchw(x), torch.from_numpy(t)).sample)
    assert rel(jit(lambda p, x, t: module.apply({"params": p}, x, t))(params, x, t), want) <= TOL
    # ... and are refused when diffusers cannot express them (widths 8 and 16).
    module, params = _unet(num_heads=2, attn_resolutions=(8, 4))
    with pytest.raises(ValueError, match="one head width"):
        export.save_unet2d(str(tmp_path / "v"), module, params, image_shape=(8, 8, 3))
    with pytest.raises(ValueError, match="match no feature-map height"):
        export.save_unet2d(str(tmp_path / "w"), *_unet(), image_shape=(16, 16, 3))
    module, params = _unet()
    params = dict(params)
    del params["mid_attn"]
    with pytest.raises(ValueError, match="missing keys.*mid_attn"):
        export.save_unet2d(str(tmp_path / "x"), module, params, image_shape=(8, 8, 3))


# ----------------------------------------------------------------------------- DDIM, end to end
def test_ddim_pipeline_gives_our_uint8_images(tmp_path, monkeypatch):
    """A short DDIM run in jaxdiff and diffusers' DDIMPipeline on the exported folder, from the
    same initial noise: the same uint8 images."""
    from jaxdiff import sampling
    from jaxdiff.images import to_uint8

    module, params = _unet()
    out = str(tmp_path / "ddpm")
    sched = export.ddpm_scheduler_config("linear", 1000, prediction="eps", clip_x0=1.0)
    export.export_ddpm_pipeline(out, module, params, image_shape=(8, 8, 3), scheduler=sched)
    x_T = np.random.RandomState(3).randn(3, 8, 8, 3).astype(np.float32)

    model_fn = lambda x, t, *, params: module.apply({"params": params}, x, t)  # noqa: E731
    x0 = sampling.sample_ddim(model_fn, make_schedule("linear", 1000), jnp.asarray(x_T),
                              num_steps=5, eta=0.0, prediction="eps", clip_x0=1.0,
                              extra_args={"params": params})
    ours = np.asarray(to_uint8(x0))

    pipe = diffusers.DDIMPipeline.from_pretrained(out)
    monkeypatch.setattr(importlib_module("diffusers.pipelines.ddim.pipeline_ddim"), "randn_tensor",
                        lambda shape, **kw: nchw(x_T))
    img = pipe(batch_size=3, num_inference_steps=5, eta=0.0, use_clipped_model_output=True,
               output_type="np").images
    theirs = (img * 255).round().astype(np.uint8)
    assert theirs.shape == ours.shape == (3, 8, 8, 3)
    assert np.array_equal(ours, theirs), np.abs(ours.astype(int) - theirs).max()


def importlib_module(name):
    import importlib

    return importlib.import_module(name)


# ----------------------------------------------------------------------------- schedulers
@pytest.mark.parametrize("kind,options,named", [
    ("linear", {}, "linear"),
    ("linear", {"beta_start": 2e-4, "beta_end": 0.03}, "linear"),
    ("scaled_linear", {}, "scaled_linear"),
    ("sigmoid", {}, "sigmoid"),
    ("cosine", {}, "squaredcos_cap_v2"),
    ("cosine", {"s": 0.02}, None),                       # no diffusers name: trained_betas
    ("cosine", {"max_beta": 0.5}, None),
    ("scaled_linear", {"rescale_zero_terminal_snr": True}, "scaled_linear"),
])
def test_scheduler_config_matches_our_schedule(kind, options, named):
    cfg = export.ddpm_scheduler_config(kind, 1000, options, prediction="x0", clip_x0=0.0)
    sched = diffusers.DDPMScheduler.from_config(cfg)
    c = sched.config
    assert (c.prediction_type, c.clip_sample, c.num_train_timesteps) == ("sample", False, 1000)
    assert (c.beta_schedule if c.trained_betas is None else None) == named
    assert c.rescale_betas_zero_snr == bool(options.get("rescale_zero_terminal_snr"))
    ours = make_schedule(kind, 1000, **options)
    # diffusers rescales to zero terminal SNR in float32 (the same formula; ~3e-5 off at t=0).
    assert rel(sched.betas.numpy(), ours.betas) <= (1e-4 if c.rescale_betas_zero_snr else 1e-6)
    # alphas_cumprod: diffusers takes a float32 cumprod, ours is float64 rounded once.
    assert rel(sched.alphas_cumprod.numpy(), ours.alphas_cumprod) <= 1e-5
    assert export.ddpm_scheduler_config(kind, 1000, options, prediction="eps",
                                         clip_x0=2.5)["clip_sample_range"] == 2.5
    with pytest.raises(ValueError, match="prediction"):
        export.ddpm_scheduler_config(kind, 1000, options, prediction="epsilon")


# ----------------------------------------------------------------------------- AutoencoderKL
def test_vae_matches_diffusers_and_round_trips(tmp_path):
    module = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32),
                           layers_per_block=1, latent_channels=4, norm_num_groups=8)
    x = np.random.RandomState(4).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    params = random_params(module, jnp.zeros((1, 16, 16, 3)))
    out = str(tmp_path / "vae")
    export.export_vae(out, module, params, image_shape=(16, 16, 3), scaling_factor=0.7)
    ref = diffusers.AutoencoderKL.from_pretrained(out).eval()
    assert ref.config.scaling_factor == 0.7 and ref.config.sample_size == 16
    with torch.no_grad():
        dist = ref.encode(nchw(x)).latent_dist
        z = dist.mean
        dec = ref.decode(z).sample
    post = jit(lambda p, x: module.apply({"params": p}, x, method=AutoencoderKL.encode))(params, x)
    assert rel(post.mean, nhwc(dist.mean)) <= TOL
    assert rel(post.logvar, nhwc(dist.logvar)) <= TOL
    ours_dec = jit(lambda p, z: module.apply({"params": p}, z, method=AutoencoderKL.decode))(
        params, nhwc(z))
    assert rel(ours_dec, nhwc(dec)) <= TOL
    loaded, back = load_diffusers_vae(out)
    assert loaded.scaling_factor == 0.7
    assert_same_tree(back, params)


# ----------------------------------------------------------------------------- text to image
WORDS = ["a", "red", "blue", "circle", "square", "at", "the", "top"]


@pytest.fixture(scope="module")
def t2i_export(tmp_path_factory):
    tok = WordTokenizer(WORDS, model_max_length=8)
    text = CLIPTextTransformer(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32,
                               num_layers=2, num_heads=2, max_position_embeddings=8,
                               eos_token_id=tok.eos_token_id)
    unet = UNetCondition(in_channels=4, out_channels=4, block_out_channels=(16, 32),
                         layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                         cross_attention_dim=16, attention_head_dim=2, use_linear_projection=True,
                         norm_num_groups=8)
    net = TextConditionedUNet(text, unet)
    enc = tok(["a red circle at the top", "blue square"], max_length=8)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    params = random_params(net, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), ids[:1], mask[:1])
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4)
    vae_params = random_params(vae, jnp.zeros((1, 16, 16, 3)), seed=1)
    out = str(tmp_path_factory.mktemp("export") / "t2i")
    sched = export.ddpm_scheduler_config("cosine", 1000, prediction="v")
    info = export.export_text_to_image(out, text, unet, params, tok, image_shape=(8, 8, 4),
                                       scheduler=sched, vae=vae, vae_params=vae_params,
                                       vae_scaling_factor=1.3, vae_image_shape=(16, 16, 3))
    return net, params, tok, ids, mask, out, info


def test_clip_text_encoder_matches_transformers(t2i_export):
    net, params, tok, ids, mask, out, _ = t2i_export
    ref, loading = transformers.CLIPTextModel.from_pretrained(
        os.path.join(out, "text_encoder"), output_loading_info=True)
    assert not any(loading.values()), loading  # every tensor used, none missing
    ref.eval()
    with torch.no_grad():
        o = ref(torch.from_numpy(ids.astype(np.int64)),
                attention_mask=torch.from_numpy(mask.astype(np.int64)))
    last, pooled = jit(lambda p, i, m: net.text_encoder.apply({"params": p}, i, m))(
        params["text_encoder"], ids, mask)
    m = mask.astype(bool)  # padding rows' states are not used by anything downstream
    assert rel(np.asarray(last)[m], o.last_hidden_state.numpy()[m]) <= TOL
    assert rel(pooled, o.pooler_output.numpy()) <= TOL
    module, back = load_transformers_clip_text(os.path.join(out, "text_encoder"))
    assert module == net.text_encoder
    assert_same_tree(back, params["text_encoder"])
    # The tokenizer folder rebuilds the same tokenizer.
    again = export.word_tokenizer_from_folder(os.path.join(out, "tokenizer"))
    assert again.vocab == tok.vocab and again.model_max_length == 8
    np.testing.assert_array_equal(again(["a blue circle"])["input_ids"],
                                  tok(["a blue circle"])["input_ids"])


def test_unet2d_condition_matches_diffusers(t2i_export):
    net, params, tok, ids, mask, out, info = t2i_export
    unet = diffusers.UNet2DConditionModel.from_pretrained(out, subfolder="unet").eval()
    text = transformers.CLIPTextModel.from_pretrained(os.path.join(out, "text_encoder")).eval()
    rng = np.random.RandomState(5)
    x = rng.randn(2, 8, 8, 4).astype(np.float32)
    t = np.array([10.0, 900.0], np.float32)
    # The whole denoiser: text encoder -> U-Net cross-attending to the unpadded tokens.
    with torch.no_grad():
        ctx = text(torch.from_numpy(ids.astype(np.int64)),
                   attention_mask=torch.from_numpy(mask.astype(np.int64))).last_hidden_state
        want = nhwc(unet(nchw(x), torch.from_numpy(t), encoder_hidden_states=ctx,
                         encoder_attention_mask=torch.from_numpy(mask.astype(np.int64))).sample)
    got = jit(lambda p, x, t, i, m: net.apply({"params": p}, x, t, i, m))(params, x, t, ids, mask)
    assert rel(got, want) <= TOL
    module, back = load_unet2d_condition(out, subfolder="unet")
    assert module == net.unet
    assert_same_tree(back, params["unet"])
    vae = diffusers.AutoencoderKL.from_pretrained(out, subfolder="vae")
    assert vae.config.scaling_factor == 1.3
    assert sorted(os.listdir(out)) == ["jaxdiff_export.json", "scheduler", "text_encoder",
                                       "tokenizer", "unet", "vae"]
    assert "no model_index.json" in " ".join(info["notes"])


# ----------------------------------------------------------------------------- folders
def test_staged_folder_refuses_non_empty_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    module, params = _unet()
    sched = export.ddpm_scheduler_config("linear", 100)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export.export_ddpm_pipeline(str(out), module, params, image_shape=(8, 8, 3), scheduler=sched)
    assert os.listdir(out) == ["keep.txt"]

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "save_scheduler", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_ddpm_pipeline(str(out), module, params, image_shape=(8, 8, 3),
                                    scheduler=sched, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == ["keep.txt"]
    monkeypatch.undo()
    export.export_ddpm_pipeline(str(out), module, params, image_shape=(8, 8, 3), scheduler=sched,
                                overwrite=True)  # replaces the folder as a whole
    assert sorted(os.listdir(out)) == ["jaxdiff_export.json", "model_index.json", "scheduler",
                                       "unet"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_export_sd_pipeline_copies_the_base_and_writes_the_unet(t2i_export, tmp_path):
    """A stand-in SD folder (a pipeline folder with a UNet2DConditionModel): the trained unet/
    replaces the base's, every other component is copied byte for byte."""
    net, params, tok, ids, mask, t2i, _ = t2i_export
    base = tmp_path / "base"
    base.mkdir()
    import shutil

    for sub in ("text_encoder", "tokenizer", "scheduler", "vae", "unet"):
        shutil.copytree(os.path.join(t2i, sub), base / sub)
    (base / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    os.symlink(base / "model_index.json", base / "linked.json")  # Hub snapshots are symlinks
    trained = perturbed(params["unet"], seed=7)
    out = str(tmp_path / "sd_ft")
    export.export_sd_pipeline(str(base), trained, out)
    for sub in ("text_encoder", "tokenizer", "scheduler", "vae"):
        for f in os.listdir(base / sub):
            assert open(os.path.join(out, sub, f), "rb").read() == open(base / sub / f, "rb").read()
    assert not os.path.islink(os.path.join(out, "linked.json"))
    module, back = load_unet2d_condition(out, subfolder="unet")
    assert_same_tree(back, trained)
    # A run that also trained the text encoder replaces text_encoder/ too.
    text = perturbed(params["text_encoder"], seed=8)
    export.export_sd_pipeline(str(base), trained, out, text_encoder_params=text, overwrite=True)
    assert_same_tree(load_transformers_clip_text(os.path.join(out, "text_encoder"))[1], text)
    assert open(os.path.join(out, "text_encoder", "config.json")).read() == \
        open(base / "text_encoder" / "config.json").read()
    bad = dict(trained)
    del bad["conv_out"]
    with pytest.raises(ValueError, match="conv_out"):
        export.export_sd_pipeline(str(base), bad, str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad")
    with pytest.raises(ValueError, match="outside the base"):
        export.export_sd_pipeline(str(base), trained, str(base / "inside"))
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline"):
        export.export_sd_pipeline(str(tmp_path / "nothing"), trained, str(tmp_path / "o"))


# ----------------------------------------------------------------------------- the CLI
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ddpm_digits made tiny: class-conditional 8x8, 2 levels, T=100, 2 steps.
CLI_TINY = {"train.eval_every": 0, "data.image_size": 8, "model.ch": 16, "model.ch_mult": (1, 2), "model.num_res_blocks": 1,
            "model.attn_resolutions": (4,), "model.num_groups": 8, "model.dropout": 0.0,
            "diffusion.num_timesteps": 100, "train.num_steps": 2, "train.batch_size": 8,
            "train.warmup_steps": 1, "train.cosine_decay": False, "train.log_every": 1,
            "train.checkpoint_every": 2, "train.num_samples": 0}


@pytest.fixture(scope="module")
def tiny_run(data_dir, tmp_path_factory):
    from _testutil import override
    from experiments.configs import ddpm_digits
    from jaxdiff.train.loop import train

    workdir = str(tmp_path_factory.mktemp("run") / "ddpm")
    summary = train(override(ddpm_digits.get_config(), CLI_TINY), workdir)
    return workdir, summary["state"]


def run_cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "experiments.export", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_exports_a_trained_run(tiny_run, tmp_path):
    workdir, state = tiny_run
    out = str(tmp_path / "exported")
    r = run_cli(f"--workdir={workdir}", f"--out={out}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"Wrote {out}: DDPMPipeline (unet/, scheduler/) from step 2 of "
                               f"{workdir} (EMA params)")
    assert "class_labels=10 is the null label" in r.stdout
    pipe = diffusers.DDPMPipeline.from_pretrained(out)
    c = pipe.scheduler.config
    assert (c.num_train_timesteps, c.beta_schedule, c.prediction_type, c.clip_sample) == (
        100, "squaredcos_cap_v2", "epsilon", True)
    assert pipe.unet.config.num_class_embeds == 11
    config, sd = read_diffusers_folder(out, subfolder="unet")
    assert_same_tree(unet_params_from_diffusers(sd, config), jax.device_get(state.ema_params))
    info = json.load(open(os.path.join(out, "jaxdiff_export.json")))
    assert info["source"] == {"workdir": workdir, "step": 2, "params": "ema"}
    assert info["labels"] == {"num_classes": 10, "null_label": 10,
                              "class_names": [str(i) for i in range(10)]}

    # A non-empty --out is refused (one line, exit 2, nothing touched) ...
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    r = run_cli(f"--workdir={workdir}", f"--out={out}", "--no-ema")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [f"error: {out} is not empty: choose a new output "
                                             "folder, or pass --overwrite (overwrite=True) to "
                                             "replace it."]
    assert {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)} == before
    # ... unless --overwrite; --no-ema exports the raw params.
    r = run_cli(f"--workdir={workdir}", f"--out={out}", "--no-ema", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert "(raw, non-EMA params)" in r.stdout
    config, sd = read_diffusers_folder(out, subfolder="unet")
    assert_same_tree(unet_params_from_diffusers(sd, config), jax.device_get(state.params))
    assert sorted(os.listdir(tmp_path)) == ["exported"]  # no temporary folder left behind

    # A missing run: one line, nothing written.
    r = run_cli(f"--workdir={tmp_path / 'nothing'}", f"--out={tmp_path / 'o'}")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: No run at {tmp_path / 'nothing'}: give "
                                             "--workdir a run directory (python -m "
                                             "experiments.train --workdir=... makes one)."]
    assert sorted(os.listdir(tmp_path)) == ["exported"]


@pytest.fixture(scope="module")
def untrained_runs(tmp_path_factory):
    """A VAE run, a latent DDPM run on it and a latent text-to-image run on it, written as real
    checkpoints (Checkpointer, the training metadata) of random params: export needs no training,
    and the CLI reads these exactly as it reads trained runs (see test_cli_exports_a_trained_run)."""
    from types import SimpleNamespace

    from _testutil import override
    from experiments.configs import ldm_digits, t2i_shapes, vae_digits
    from jaxdiff.train import build
    from jaxdiff.train.checkpoint import Checkpointer

    root = tmp_path_factory.mktemp("runs")
    data = SimpleNamespace(name="digits", num_examples=16, class_names=None)

    def write(workdir, meta, module, *inputs):
        params = random_params(module, *inputs, seed=1)
        ema = random_params(module, *inputs, seed=2)
        ck = Checkpointer(str(workdir), async_save=False)
        ck.save(1, {"params": params, "ema_params": ema}, meta)
        ck.wait()
        ck.close()
        return str(workdir), ema

    vc = override(vae_digits.get_config(), {"data.image_size": 16, "model.block_out_channels": (8, 8),
                                            "model.norm_num_groups": 4, "train.num_steps": 1})
    vae = build.build_vae(vc, (16, 16, 3))
    meta = {**build.vae_run_metadata(vc, data, vae, None), "latent": {"scale_factor": 0.8}}
    vae_run = write(root / "vae", meta, vae.module, jnp.zeros((1, 16, 16, 3)))
    ae = build.load_vae(vae_run[0], 1)

    lc = override(ldm_digits.get_config(), {**CLI_TINY, "vae.workdir": vae_run[0], "vae.step": 1,
                                            "data.image_size": 16})
    model = build.build_model(lc, (8, 8, 4), 10, ae)
    ldm_run = write(root / "ldm", build.run_metadata(lc, data, model), model.module,
                    jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))

    tc = override(t2i_shapes.get_config(), {
        "vae.workdir": vae_run[0], "vae.step": 1, "data.image_size": 16,
        "model.block_out_channels": (16, 32), "model.down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "model.up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "model.attention_head_dim": 2,
        "text.hidden_size": 16, "text.intermediate_size": 32, "text.num_layers": 1, "text.num_heads": 2})
    model = build.build_model(tc, (8, 8, 4), None, ae)
    ids, mask = model.tokenize([""])
    t2i_run = write(root / "t2i", build.run_metadata(tc, data, model), model.module,
                    jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), ids, mask)
    return {"vae": vae_run, "ldm": ldm_run, "t2i": t2i_run, "vae_ema": vae_run[1]}


@pytest.mark.slow
def test_cli_exports_vae_latent_and_text_to_image_runs(untrained_runs, tmp_path):
    vae_dir, vae_ema = untrained_runs["vae"]
    r = run_cli(f"--workdir={vae_dir}", f"--out={tmp_path / 'vae'}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"Wrote {tmp_path / 'vae'}: AutoencoderKL (diffusers.AutoencoderKL)")
    ref = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "vae"))
    assert ref.config.scaling_factor == 0.8 and ref.config.sample_size == 16
    assert_same_tree(load_diffusers_vae(str(tmp_path / "vae"))[1], vae_ema)

    ldm_dir, ldm_ema = untrained_runs["ldm"]
    out = str(tmp_path / "ldm")
    r = run_cli(f"--workdir={ldm_dir}", f"--out={out}")
    assert r.returncode == 0, r.stderr
    assert "latent UNet2DModel + AutoencoderKL (unet/, scheduler/, vae/)" in r.stdout
    assert "no model_index.json" in r.stdout
    assert sorted(os.listdir(out)) == ["jaxdiff_export.json", "scheduler", "unet", "vae"]
    unet = diffusers.UNet2DModel.from_pretrained(out, subfolder="unet")
    assert (unet.config.in_channels, unet.config.sample_size, unet.config.num_class_embeds) == (4, 8, 11)
    sched = diffusers.DDPMScheduler.from_pretrained(out, subfolder="scheduler")
    assert (sched.config.prediction_type, sched.config.clip_sample) == ("v_prediction", False)
    assert diffusers.AutoencoderKL.from_pretrained(out, subfolder="vae").config.scaling_factor == 0.8
    config, sd = read_diffusers_folder(out, subfolder="unet")
    assert_same_tree(unet_params_from_diffusers(sd, config), ldm_ema)
    assert_same_tree(load_diffusers_vae(out, subfolder="vae")[1], vae_ema)

    t2i_dir, t2i_ema = untrained_runs["t2i"]
    out = str(tmp_path / "t2i")
    r = run_cli(f"--workdir={t2i_dir}", f"--out={out}")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["jaxdiff_export.json", "scheduler", "text_encoder",
                                       "tokenizer", "unet", "vae"]
    diffusers.UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    transformers.CLIPTextModel.from_pretrained(os.path.join(out, "text_encoder"))
    assert_same_tree(load_unet2d_condition(out, subfolder="unet")[1], t2i_ema["unet"])
    assert_same_tree(load_transformers_clip_text(os.path.join(out, "text_encoder"))[1],
                     t2i_ema["text_encoder"])
    from experiments.configs import t2i_shapes

    tok = export.word_tokenizer_from_folder(os.path.join(out, "tokenizer"))
    assert tok.vocab[2:-2] == [w.lower() for w in dict.fromkeys(t2i_shapes.get_config().text.words)]
