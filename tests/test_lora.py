"""LoRA adapters (jaxdiff.nn.lora) and diffusers-format LoRA files (jaxdiff.interop.lora).

References: a float64 NumPy transcription of W' = W + (alpha / rank) down @ up and of its chain
rule; diffusers' StableDiffusionPipeline.load_lora_weights (peft backend) on a tiny randomly
initialised, perturbed SD 1.x pipeline built here, for files we write and files diffusers / peft
(or a kohya-style writer) write. One tiny UNetCondition forward is compiled for the module.
"""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdiff.interop.lora import load_diffusers_lora, module_name, save_diffusers_lora
from jaxdiff.interop.unet2d_cond import (convert_unet2d_condition_state_dict,
                                         unet2d_condition_config_from_diffusers)
from jaxdiff.nn.lora import (count_lora_params, init_lora, lora_nbytes, lora_paths, lora_scale,
                             lora_targets, merge)
from jaxdiff.nn.transformer import SpatialTransformer
from jaxdiff.nn.unet_cond import UNetCondition

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")  # diffusers' load_lora_weights needs the peft backend

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                   "xla_llvm_disable_expensive_passes": True})

UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
            layers_per_block=1, cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
B, L = 2, 7
RANK, ALPHA = 4, 6.0  # alpha != rank: the scale 1.5 must travel with the file


@pytest.fixture(scope="module", autouse=True)
def _cheap_cpu(xla_o0, torch_one_thread):
    """XLA -O0 and one torch thread (see conftest)."""


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _tokenizer(d):
    vocab = {t: i for i, t in enumerate(["a</w>", "b</w>", "<|startoftext|>", "<|endoftext|>"])}
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"),
                                      model_max_length=77)


def _perturb(model, scale, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _pipeline(tmp_path_factory):
    """A tiny SD 1.x StableDiffusionPipeline (same U-Net weights each call)."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**UNET).eval()
    _perturb(unet, 0.1, 1)
    vae = diffusers.AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), latent_channels=4,
                                  norm_num_groups=8, layers_per_block=1)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=4, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=2, eos_token_id=3,
        pad_token_id=3))
    scheduler = diffusers.DDIMScheduler()
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=_tokenizer(tmp_path_factory.mktemp("tok")),
        unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(pipeline, our params, jitted apply, inputs NCHW, inputs NHWC)."""
    pipe = _pipeline(tmp_path_factory)
    sd = {k: v.detach().numpy() for k, v in pipe.unet.state_dict().items()}
    params = jax.tree.map(jnp.asarray, convert_unet2d_condition_state_dict(sd, pipe.unet.config))
    model = UNetCondition(**unet2d_condition_config_from_diffusers(pipe.unet.config))
    apply = jit(lambda p, x, t, c, m: model.apply({"params": p}, x, t, c, m))
    rng = np.random.RandomState(0)
    x = rng.randn(B, 4, 8, 8).astype(np.float32)
    t = np.array([17.5, 801.0], np.float32)
    ctx = rng.randn(B, L, 32).astype(np.float32)
    mask = np.ones((B, L), bool)
    mask[0, 5:] = False
    return dict(pipe=pipe, params=params, apply=apply, torch_in=(x, t, ctx, mask),
                jax_in=(x.transpose(0, 2, 3, 1), t, ctx, mask))


def _torch_out(unet, inputs):
    x, t, ctx, mask = (torch.from_numpy(a) for a in inputs)
    with torch.no_grad():
        return unet(x, t, ctx, encoder_attention_mask=mask).sample.numpy().transpose(0, 2, 3, 1)


def _random_lora(params, seed, rank=RANK, scale=0.3):
    """Adapters with non-zero down AND up (init_lora's up is zero)."""
    lora = init_lora(jax.random.key(seed), params, rank=rank)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 2 * len(lora_paths(lora))))
    return jax.tree.map(lambda a: scale * jax.random.normal(next(keys), a.shape), lora)


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


# ----------------------------------------------------------------------------- (a) the math
@pytest.mark.slow  # builds a Stable Diffusion pipeline in diffusers and compiles a U-Net
def test_targets_and_init(base):
    params = base["params"]
    paths = lora_targets(params)
    # 3 transformers (down 0, mid, up 1 x 2 layers = 4 here) x 2 attentions x 4 projections
    n_attn = 4
    assert len(paths) == n_attn * 2 * 4 and all(p[-1] == "kernel" for p in paths)
    names = {module_name(p[:-1]) for p in paths}
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0" in names
    assert lora_targets(params, ("to_out.0",)) == [p for p in paths if p[-2] == "to_out"]
    assert len(lora_targets(params, ("attn2.to_k", "ff.net.2"))) == 2 * n_attn
    with pytest.raises(ValueError, match="only Dense"):
        lora_targets(params, ("proj_in",))  # SD 1.x: a 1x1 conv
    with pytest.raises(ValueError, match="match no Dense"):
        lora_targets(params, ("to_qq",))

    lora = init_lora(jax.random.key(0), params, rank=RANK)
    assert lora_paths(lora) == [p[:-1] for p in paths]
    again = init_lora(jax.random.key(0), params, rank=RANK)
    other = init_lora(jax.random.key(1), params, rank=RANK)
    n = 0
    for p in paths:
        w = _get(params, p)
        a, a2, o = (_get(tree, p[:-1]) for tree in (lora, again, other))
        assert a["down"].shape == (w.shape[0], RANK) and a["up"].shape == (RANK, w.shape[1])
        assert not np.any(np.asarray(a["up"]))  # up = 0: step 0 is the base model
        bound = 1 / np.sqrt(w.shape[0])  # peft: kaiming_uniform_(lora_A, a=sqrt(5))
        down = np.asarray(a["down"])
        assert np.all(np.abs(down) <= bound) and np.max(np.abs(down)) > 0.7 * bound
        np.testing.assert_array_equal(down, np.asarray(a2["down"]))
        assert not np.array_equal(down, np.asarray(o["down"]))
        n += RANK * sum(w.shape)
    assert count_lora_params(lora) == n and lora_nbytes(lora) == 4 * n
    assert count_lora_params(jax.eval_shape(lambda: lora)) == n

    # Step 0 equals the base model, bit for bit.
    merged = merge(params, lora, alpha=ALPHA, rank=RANK)
    for p in paths:
        np.testing.assert_array_equal(np.asarray(_get(merged, p)), np.asarray(_get(params, p)))
    out0 = base["apply"](params, *base["jax_in"])
    np.testing.assert_array_equal(np.asarray(base["apply"](merged, *base["jax_in"])),
                                  np.asarray(out0))


@pytest.mark.slow  # builds a Stable Diffusion pipeline in diffusers and compiles a U-Net
def test_merge_matches_float64(base):
    params = base["params"]
    lora = _random_lora(params, 3)
    scale = lora_scale(ALPHA, RANK)
    assert scale == 1.5
    for merged in (merge(params, lora, alpha=ALPHA, rank=RANK),
                   jax.jit(functools.partial(merge, alpha=ALPHA, rank=RANK))(params, lora)):
        adapted = {p[:-1] for p in lora_targets(params)}
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            keys = tuple(k.key for k in path)
            got = _get(merged, keys)
            if keys[:-1] in adapted and keys[-1] == "kernel":
                ad = _get(lora, keys[:-1])
                want = (np.asarray(leaf, np.float64) + scale * np.asarray(ad["down"], np.float64)
                        @ np.asarray(ad["up"], np.float64))
                assert _rel(got, want) < 1e-6 and got.dtype == leaf.dtype
            else:
                np.testing.assert_array_equal(np.asarray(got), np.asarray(leaf))
    eager = merge(params, lora, alpha=ALPHA, rank=RANK)
    assert eager["conv_in"]["kernel"] is params["conv_in"]["kernel"]  # untouched leaves: same
    assert eager["down_blocks_0"]["attentions_0"]["proj_in"] is \
        params["down_blocks_0"]["attentions_0"]["proj_in"]
    with pytest.raises(ValueError, match="rank 8"):
        merge(params, lora, alpha=ALPHA, rank=8)
    with pytest.raises(ValueError, match="params does not"):
        merge(params, {"nope": lora["mid_block"]}, alpha=ALPHA, rank=RANK)


# ------------------------------------------------------------ (b) our file in diffusers
@pytest.mark.slow  # builds a Stable Diffusion pipeline in diffusers and compiles a U-Net
def test_our_file_loads_in_diffusers_pipeline(base, tmp_path):
    params, pipe = base["params"], base["pipe"]
    lora = _random_lora(params, 5)
    path = save_diffusers_lora(str(tmp_path), lora, alpha=ALPHA, rank=RANK)
    assert path.endswith("pytorch_lora_weights.safetensors")

    theirs_base = _torch_out(pipe.unet, base["torch_in"])
    pipe.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors",
                           adapter_name="ours")
    try:
        cfg = pipe.unet.peft_config["ours"]
        assert (cfg.r, cfg.lora_alpha) == (RANK, ALPHA)
        theirs = _torch_out(pipe.unet, base["torch_in"])
    finally:
        pipe.unload_lora_weights()
    ours = base["apply"](merge(params, lora, alpha=ALPHA, rank=RANK), *base["jax_in"])
    err = _rel(ours, theirs)
    print(f"\n[our file in diffusers] max relative error {err:.2e}; LoRA moved the output by "
          f"{_rel(theirs, theirs_base):.2e}")
    assert _rel(theirs, theirs_base) > 0.05  # the adapters matter, at their 1.5 scale
    assert err <= 1e-5

    # Round trip, and the fold_alpha variant (for loaders that ignore the metadata).
    back, alpha, rank = load_diffusers_lora(path)
    assert (alpha, rank) == (ALPHA, RANK) and lora_paths(back) == lora_paths(lora)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(lora)):
        np.testing.assert_array_equal(a, np.asarray(b))
    folded = save_diffusers_lora(str(tmp_path / "folded.safetensors"), lora, alpha=ALPHA,
                                 rank=RANK, fold_alpha=True)
    back, alpha, rank = load_diffusers_lora(folded)
    assert (alpha, rank) == (RANK, RANK)
    m1 = merge(params, back, alpha=alpha, rank=rank)
    m2 = merge(params, lora, alpha=ALPHA, rank=RANK)
    for p in lora_targets(params):
        assert _rel(_get(m1, p), _get(m2, p)) < 1e-6


# ------------------------------------------------------------ (c) their files in jaxdiff
@pytest.mark.slow  # builds a Stable Diffusion pipeline in diffusers and compiles a U-Net
def test_peft_made_lora_loads(base, tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    params, pipe = base["params"], base["pipe"]
    unet = pipe.unet
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS),
                                init_lora_weights="gaussian"), adapter_name="peft")
    try:
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():  # random non-zero lora_A and lora_B
            for name, p in unet.named_parameters():
                if "lora_" in name:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
        theirs = _torch_out(unet, base["torch_in"])
        # As diffusers' train_text_to_image_lora.py saves (with the adapter's config).
        diffusers.StableDiffusionPipeline.save_lora_weights(
            str(tmp_path), unet_lora_layers=get_peft_model_state_dict(unet, adapter_name="peft"),
            unet_lora_adapter_metadata=unet.peft_config["peft"].to_dict())
        unet.save_lora_adapter(str(tmp_path / "adapter"), adapter_name="peft")  # no "unet." prefix
    finally:
        unet.delete_adapters("peft")
    lora, alpha, rank = load_diffusers_lora(str(tmp_path))
    assert (alpha, rank) == (ALPHA, RANK)
    assert lora_paths(lora) == [p[:-1] for p in lora_targets(params)]
    ours = base["apply"](merge(params, lora, alpha=alpha, rank=rank), *base["jax_in"])
    err = _rel(ours, theirs)
    print(f"\n[peft-made file in jaxdiff] max relative error {err:.2e}")
    assert err <= 1e-5
    again, alpha, rank = load_diffusers_lora(str(tmp_path / "adapter"))
    assert (alpha, rank) == (ALPHA, RANK) and lora_paths(again) == lora_paths(lora)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(lora)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # builds a Stable Diffusion pipeline in diffusers and compiles a U-Net
def test_kohya_file_loads_like_diffusers(base, tmp_path):
    """A kohya-ss / A1111-named file (lora_unet_..., per-module .alpha) read by diffusers'
    converter and by ours: the same function."""
    from safetensors.numpy import save_file

    params, pipe = base["params"], base["pipe"]
    rng = np.random.RandomState(11)
    sd = {}
    for i, p in enumerate(lora_targets(params)):
        d_in, d_out = _get(params, p).shape
        stem = "lora_unet_" + module_name(p[:-1]).replace(".", "_")
        sd[stem + ".lora_down.weight"] = (0.3 * rng.randn(RANK, d_in)).astype(np.float32)
        sd[stem + ".lora_up.weight"] = (0.3 * rng.randn(d_out, RANK)).astype(np.float32)
        sd[stem + ".alpha"] = np.array(ALPHA, np.float32)
    save_file(sd, str(tmp_path / "kohya.safetensors"))
    pipe.load_lora_weights(str(tmp_path), weight_name="kohya.safetensors", adapter_name="kohya")
    try:
        theirs = _torch_out(pipe.unet, base["torch_in"])
    finally:
        pipe.unload_lora_weights()
    lora, alpha, rank = load_diffusers_lora(str(tmp_path / "kohya.safetensors"))
    assert (alpha, rank) == (ALPHA, RANK)
    ours = base["apply"](merge(params, lora, alpha=alpha, rank=rank), *base["jax_in"])
    err = _rel(ours, theirs)
    print(f"\n[kohya file] max relative error vs diffusers {err:.2e}")
    assert err <= 1e-5

    # Per-module alphas (kohya's semantics: each module scaled by its own alpha / rank). diffusers
    # 0.42 drops them (its alpha_pattern keys keep the "processor.to_k_lora.down.weight" suffix
    # and match no module: a RuntimeWarning), so the reference here is float64 NumPy.
    odd = sorted(k for k in sd if k.endswith(".alpha"))[::3]
    for k in odd:
        sd[k] = np.array(2.0, np.float32)
    save_file(sd, str(tmp_path / "mixed.safetensors"))
    mixed, alpha, rank = load_diffusers_lora(str(tmp_path / "mixed.safetensors"))
    assert (alpha, rank) == (ALPHA, RANK)
    merged = merge(params, mixed, alpha=alpha, rank=rank)
    for p in lora_targets(params):
        stem = "lora_unet_" + module_name(p[:-1]).replace(".", "_")
        a = float(sd[stem + ".alpha"])
        want = (np.asarray(_get(params, p), np.float64) + a / RANK
                * (sd[stem + ".lora_up.weight"].astype(np.float64)
                   @ sd[stem + ".lora_down.weight"].astype(np.float64)).T)
        assert _rel(_get(merged, p), want) < 1e-6

    sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = \
        np.zeros((RANK, 32), np.float32)
    sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = \
        np.zeros((32, RANK), np.float32)
    save_file(sd, str(tmp_path / "with_te.safetensors"))
    with pytest.raises(ValueError, match="unet_only=True"):
        load_diffusers_lora(str(tmp_path / "with_te.safetensors"))
    lora2, _, _ = load_diffusers_lora(str(tmp_path / "with_te.safetensors"), unet_only=True)
    assert lora_paths(lora2) == lora_paths(lora)


@pytest.mark.slow  # builds a Stable Diffusion pipeline in diffusers and compiles a U-Net
def test_older_diffusers_names(base, tmp_path):
    """diffusers' older LoRA names (``lora.down`` and attention-processor ``to_q_lora.down``)
    read as the peft names they convert to (diffusers' convert_unet_state_dict_to_peft)."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
    from safetensors.numpy import load_file, save_file

    lora = _random_lora(base["params"], 9)
    peft_sd = load_file(save_diffusers_lora(str(tmp_path / "peft.safetensors"), lora,
                                            alpha=RANK, rank=RANK))
    old = {}
    for k, v in peft_sd.items():
        k = k[len("unet."):].replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up.")
        if ".attn1." in k:  # attention-processor names: attn1.processor.to_q_lora.down.weight
            k = k.replace(".to_out.0.lora.", ".to_out_lora.").replace(".attn1.",
                                                                    ".attn1.processor.")
            k = k.replace(".to_q.lora.", ".to_q_lora.").replace(".to_k.lora.", ".to_k_lora.")
            k = k.replace(".to_v.lora.", ".to_v_lora.")
        old[k] = v
    want = {k.replace(".processor.", "."): v for k, v in
            convert_unet_state_dict_to_peft(dict(old)).items()}
    assert set(want) == {k[len("unet."):] for k in peft_sd}  # diffusers agrees on the renaming
    save_file(old, str(tmp_path / "old.safetensors"))
    back, alpha, rank = load_diffusers_lora(str(tmp_path / "old.safetensors"))
    assert (alpha, rank) == (RANK, RANK) and lora_paths(back) == lora_paths(lora)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(lora)):
        np.testing.assert_array_equal(a, np.asarray(b))


@pytest.mark.slow  # builds a Stable Diffusion pipeline in diffusers and compiles a U-Net
def test_bad_files(base, tmp_path):
    from safetensors.numpy import save_file

    save_file({"unet.conv_in.lora_A.weight": np.zeros((4, 4, 3, 3), np.float32),
               "unet.conv_in.lora_B.weight": np.zeros((32, 4, 1, 1), np.float32)},
              str(tmp_path / "conv.safetensors"))
    with pytest.raises(ValueError, match="not of Dense layers"):
        load_diffusers_lora(str(tmp_path / "conv.safetensors"))
    with pytest.raises(FileNotFoundError):
        load_diffusers_lora(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="neither a directory"):
        save_diffusers_lora(str(tmp_path / "x.bin"), {"a": {"down": np.zeros((2, 1)),
                                                              "up": np.zeros((1, 2))}},
                            alpha=1, rank=1)
    with pytest.raises(ValueError, match=r"lora_params\['unet'\]"):
        save_diffusers_lora(str(tmp_path), {"unet": _random_lora(base["params"], 1)}, alpha=1,
                            rank=RANK)


# ------------------------------------------------------------ (d) training only the adapters
def test_grad_trains_lora_only():
    """jax.grad through merge w.r.t. lora_params: the chain rule of a float64 transcription
    (dL/d down = s dL/dW up^T, dL/d up = s down^T dL/dW), and a few optax steps that move only
    the adapters. On one SpatialTransformer (the U-Net's attention block), so the gradient
    compiles in seconds on this CPU."""
    block = SpatialTransformer(num_heads=2, head_dim=8, num_groups=4)
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(2, 4, 4, 16), jnp.float32)
    ctx = jnp.asarray(rng.randn(2, 5, 12), jnp.float32)
    target = jnp.asarray(rng.randn(2, 4, 4, 16), jnp.float32)
    base_params = jax.jit(block.init)(jax.random.key(0), x, ctx)["params"]  # one compile, not
    # one per eager op
    base_copy = jax.tree.map(lambda a: np.array(a, copy=True), base_params)
    lora = init_lora(jax.random.key(1), base_params, rank=2)

    def loss(p):
        return jnp.mean((block.apply({"params": p}, x, ctx) - target) ** 2)

    def lora_loss(lora_params, frozen):
        return loss(merge(frozen, lora_params, alpha=3.0, rank=2))

    # The chain rule, checked where both factors are non-zero.
    lora_r = _random_lora(base_params, 4, rank=2)
    # d/d(frozen) of lora_loss is dL/dW at W' = W + delta: both gradients from one compile.
    g_lora, g_w = jax.jit(jax.grad(lora_loss, argnums=(0, 1)))(lora_r, base_params)
    s = lora_scale(3.0, 2)
    for p in lora_paths(lora_r):
        gw = np.asarray(_get(g_w, p)["kernel"], np.float64)
        ad = {k: np.asarray(v, np.float64) for k, v in _get(lora_r, p).items()}
        g = _get(g_lora, p)
        assert _rel(g["down"], s * gw @ ad["up"].T) < 1e-5
        assert _rel(g["up"], s * ad["down"].T @ gw) < 1e-5

    opt = optax.adam(1e-2)

    @jax.jit
    def step(lora_params, opt_state, frozen):
        value, grads = jax.value_and_grad(lora_loss)(lora_params, frozen)
        updates, opt_state = opt.update(grads, opt_state, lora_params)
        return optax.apply_updates(lora_params, updates), opt_state, value

    state = opt.init(lora)
    losses = []
    start = lora
    for _ in range(4):
        lora, state, value = step(lora, state, base_params)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    for a, b in zip(jax.tree.leaves(base_params), jax.tree.leaves(base_copy)):
        np.testing.assert_array_equal(np.asarray(a), b)  # frozen: bit-identical
    for p in lora_paths(lora):  # both factors moved (down from step 2 on, once up != 0)
        for k in ("down", "up"):
            assert not np.array_equal(np.asarray(_get(lora, p)[k]), np.asarray(_get(start, p)[k]))
