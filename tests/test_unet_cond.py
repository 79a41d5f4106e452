"""UNetCondition (jaxdiff.nn.unet_cond) and its diffusers loader (jaxdiff.interop.unet2d_cond).

Reference: diffusers' UNet2DConditionModel (torch, CPU, fp32, eval mode) on randomly
initialised, perturbed tiny models saved with save_pretrained and loaded back by our loader.
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.interop.unet2d_cond import (convert_unet2d_condition_state_dict,
                                         expected_param_shapes, load_unet2d_condition,
                                         unet2d_condition_config_from_diffusers)
from jaxdiff.nn.unet_cond import UNetCondition

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                   "xla_llvm_disable_expensive_passes": True})

TINY = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
            layers_per_block=1, cross_attention_dim=32, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
CONFIGS = {
    # SD 1.x style: 1x1-conv projections, 8 heads everywhere (widths 4 and 8).
    "conv_proj": dict(TINY, attention_head_dim=8),
    # SD 2.x style: linear projections, heads and transformer depth per level, cross-attention
    # at the coarse level (down without downsampler, up with upsampler), a shifted embedding.
    "linear_proj": dict(TINY, attention_head_dim=(2, 4), use_linear_projection=True,
                        transformer_layers_per_block=(1, 2), freq_shift=1, norm_eps=1e-6,
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
}
B, L = 2, 7


@pytest.fixture(scope="module", autouse=True)
def _cheap_cpu(torch_one_thread):
    """One torch thread (see conftest.torch_one_thread); the jax programs here compile at -O0 (jit above)."""


def _torch_unet(name, seed=0):
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**CONFIGS[name]).eval()
    with torch.no_grad():  # move every tensor (norms included) off its default init
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _inputs(seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(B, 4, 8, 8).astype(np.float32)
    t = np.array([17.5, 999.0], np.float32)
    ctx = rng.randn(B, L, 32).astype(np.float32)
    mask = np.ones((B, L), bool)
    mask[0, 5:] = False  # padded text tokens
    mask[1, 2:] = False
    return x, t, ctx, mask


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers(name, tmp_path):
    tunet = _torch_unet(name)
    tunet.save_pretrained(str(tmp_path), safe_serialization=True)
    model, params = load_unet2d_condition(str(tmp_path))
    x, t, ctx, mask = _inputs()

    n_torch = sum(p.numel() for p in tunet.parameters())
    n_ours = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
    assert n_ours == n_torch
    assert len(jax.tree.leaves(params)) == len(tunet.state_dict())

    apply = jit(lambda p, x, t, c, m: model.apply({"params": p}, x, t, c, m))
    x_nhwc = x.transpose(0, 2, 3, 1)
    errs = {}
    # Each variant costs an XLA compile: the unmasked path is checked on one config only.
    for use_mask in ((False, True) if name == "conv_proj" else (True,)):
        with torch.no_grad():
            ref = tunet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                        encoder_attention_mask=torch.from_numpy(mask) if use_mask else None)
        ref = ref.sample.numpy().transpose(0, 2, 3, 1)
        out = apply(params, x_nhwc, t, ctx, mask if use_mask else None)
        assert out.shape == ref.shape and out.dtype == jnp.float32
        errs["mask" if use_mask else "no_mask"] = _rel(out, ref)
        if use_mask:
            # Masked tokens are really ignored (and, where compared, the mask matters).
            if errs.get("no_mask") is not None:
                assert _rel(out, unmasked) > 1e-3
            ctx2 = np.where(mask[..., None], ctx, 100.0 * ctx).astype(np.float32)
            same = apply(params, x_nhwc, t, ctx2, mask)
            assert _rel(same, out) < 1e-6
        unmasked = out
    print(f"\n[{name}] params {n_ours:,}; max relative error vs diffusers: {errs}")
    for k, e in errs.items():
        assert e < 1e-4, (k, e)


def test_remat_and_bf16_trace():
    """remat and bf16 variants trace (forward and gradient) with float32 params and output.
    Abstract only (jax.eval_shape): compiling a U-Net gradient costs minutes on this CPU."""
    kwargs = unet2d_condition_config_from_diffusers(CONFIGS["conv_proj"])
    x, t, ctx, mask = _inputs(1)
    x = x.transpose(0, 2, 3, 1)
    params = jax.eval_shape(UNetCondition(**kwargs).init, jax.random.key(0), x, t, ctx)["params"]
    model = UNetCondition(**{**kwargs, "dropout": 0.1}, dtype=jnp.bfloat16, remat=True)

    def loss(p):
        out = model.apply({"params": p}, x, t, ctx, mask, train=True,
                          rngs={"dropout": jax.random.key(1)})
        assert out.dtype == jnp.float32 and out.shape == x.shape
        return jnp.sum(out ** 2)

    grads = jax.eval_shape(jax.grad(loss), params)
    assert jax.tree.map(lambda g: (g.shape, g.dtype), grads) == jax.tree.map(
        lambda p: (p.shape, jnp.dtype(jnp.float32)), params)


def test_parameter_count_sd1():
    cfg = dict(sample_size=64, cross_attention_dim=768)  # SD 1.x unet/config.json otherwise
    with torch.device("meta"):
        tunet = diffusers.UNet2DConditionModel(**cfg)
    n_torch = sum(p.numel() for p in tunet.parameters())
    kwargs = unet2d_condition_config_from_diffusers(dict(tunet.config))
    shapes = expected_param_shapes(kwargs)
    n_ours = sum(int(np.prod(s)) for s in shapes.values())
    print(f"\nSD 1.x UNet parameters: jaxdiff {n_ours:,}, diffusers {n_torch:,}")
    assert n_ours == n_torch == 859_520_964
    assert len(shapes) == len(tunet.state_dict())
    assert UNetCondition(**kwargs) == UNetCondition()  # our defaults are the SD 1.x UNet


def test_loader_errors(tmp_path):
    tunet = _torch_unet("conv_proj")
    config = dict(tunet.config)
    sd = {k: v.numpy() for k, v in tunet.state_dict().items()}

    # Missing weights / missing config.
    folder = tmp_path / "unet"
    folder.mkdir()
    with open(folder / "config.json", "w") as fh:
        json.dump({**config, "_class_name": "UNet2DConditionModel"}, fh, default=list)
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        load_unet2d_condition(str(folder))
    os.remove(folder / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_unet2d_condition(str(folder))

    # A tensor of the wrong shape is named with both shapes; a missing one by its key.
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    bad = dict(sd, **{key: np.zeros((32, 16), np.float32)})
    with pytest.raises(ValueError, match=r"attn2\.to_k\.weight: \(32, 16\) converts to "
                                         r"\(16, 32\), expected \(32, 32\)"):
        convert_unet2d_condition_state_dict(bad, config)
    gone = "mid_block.attentions.0.proj_out.bias"
    with pytest.raises(ValueError, match=r"missing keys: \['mid_block\.attentions\.0\.proj_out"):
        convert_unet2d_condition_state_dict({k: v for k, v in sd.items() if k != gone}, config)
    with pytest.raises(ValueError, match="unexpected keys.*extra.weight"):
        convert_unet2d_condition_state_dict(dict(sd, **{"extra.weight": sd[gone]}), config)

    # Unsupported configurations are named.
    for change, pattern in [
            (dict(down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D")),
             "SimpleCrossAttnDownBlock2D"),
            (dict(addition_embed_type="text_time"), "addition_embed_type"),
            (dict(only_cross_attention=True), "only_cross_attention"),
            (dict(transformer_layers_per_block=[[1], [1]]), "transformer_layers_per_block"),
            (dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn"), "mid_block_type"),
            (dict(some_new_option=1), "some_new_option"),
            (dict(_class_name="UNet2DModel"), "UNet2DModel")]:
        with pytest.raises(ValueError, match=pattern):
            unet2d_condition_config_from_diffusers({**config, **change})


def test_input_validation():
    model = UNetCondition(**unet2d_condition_config_from_diffusers(CONFIGS["conv_proj"]))
    x = jnp.zeros((2, 8, 8, 4))
    t = jnp.zeros((2,))
    ctx = jnp.zeros((2, 3, 32))
    init = functools.partial(jax.eval_shape, model.init, jax.random.key(0))
    with pytest.raises(ValueError, match="cross_attention_dim"):
        init(x, t, jnp.zeros((2, 3, 16)))
    with pytest.raises(ValueError, match="context_mask"):
        init(x, t, ctx, jnp.ones((2, 4), bool))
    with pytest.raises(ValueError, match="divisible"):
        init(jnp.zeros((2, 7, 8, 4)), t, ctx)
    with pytest.raises(ValueError, match="t must have shape"):
        init(x, jnp.zeros(()), ctx)
    with pytest.raises(ValueError, match="in_channels"):
        init(jnp.zeros((2, 8, 8, 3)), t, ctx)
