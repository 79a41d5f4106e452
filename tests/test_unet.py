"""UNet: parameter count and forward parity against diffusers' UNet2DModel, precision, remat,
dropout, input validation, and the diffusers weight/config loader.

XLA CPU compiles dominate the run time, so the tests share a few small jitted models and compile
with LLVM's expensive passes off (3-4x faster compiles; float semantics unchanged).
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.interop import unet_config_from_diffusers, unet_params_from_diffusers
from jaxdiff.nn import UNet, timestep_embedding
from jaxdiff.nn.layers import Downsample

torch = pytest.importorskip("torch")
diffusers_unet = pytest.importorskip("diffusers.models.unets.unet_2d")
UNet2DModel = diffusers_unet.UNet2DModel

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                   "xla_llvm_disable_expensive_passes": True})

# google/ddpm-cifar10-32 unet/config.json (the model-defining keys).
DDPM_CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2, attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False,
    freq_shift=1, norm_eps=1e-6, norm_num_groups=32, act_fn="silu", mid_block_scale_factor=1,
    center_input_sample=False, time_embedding_type="positional",
)
SMALL = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
             down_block_types=("DownBlock2D", "AttnDownBlock2D"),
             up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1)
VARIANTS = {
    # DDPM conventions: 1 head, sin-first embedding with shift 1, pad (0, 1), eps 1e-6.
    "ddpm": dict(norm_num_groups=8, attention_head_dim=None, downsample_padding=0,
                 flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6),
    # diffusers defaults (cos-first, shift 0, pad (1, 1), eps 1e-5), 4 heads, class labels,
    # dropout (must be off in eval / train=False).
    "cond": dict(norm_num_groups=16, attention_head_dim=16, num_class_embeds=6, dropout=0.1),
}


def _perturbed_diffusers(config, seed):
    torch.manual_seed(seed)
    model = UNet2DModel(**config).eval()
    with torch.no_grad():  # move every tensor (GroupNorm 1/0 included) off its default init
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.fixture(scope="module")
def parity_cases():
    """name -> (our kwargs, params, x NHWC, t, y, diffusers output NHWC, jitted apply)."""
    cases = {}
    rng = np.random.RandomState(0)
    for seed, (name, extra) in enumerate(VARIANTS.items()):
        model = _perturbed_diffusers({**SMALL, **extra}, seed)
        config = dict(model.config)
        kwargs = unet_config_from_diffusers(config)
        params = unet_params_from_diffusers(
            {k: v.numpy() for k, v in model.state_dict().items()}, config=config)
        x = rng.randn(3, 3, 16, 16).astype(np.float32)
        t = np.array([0.0, 17.5, 999.0], np.float32)
        y = np.array([0, 3, 5]) if "num_class_embeds" in extra else None
        with torch.no_grad():
            ref = model(torch.from_numpy(x), torch.from_numpy(t),
                        None if y is None else torch.from_numpy(y)).sample.numpy()
        x_nhwc, ref_nhwc = x.transpose(0, 2, 3, 1), ref.transpose(0, 2, 3, 1)
        y32 = None if y is None else y.astype(np.int32)
        apply = jit(lambda p, x, t, y, kw=kwargs: UNet(**kw).apply({"params": p}, x, t, y))
        cases[name] = (kwargs, params, x_nhwc, t, y32, ref_nhwc, apply)
    return cases


def test_ddpm_cifar10_param_count():
    ours = jax.eval_shape(UNet().init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),
                          jax.ShapeDtypeStruct((1,), jnp.float32))
    n_ours = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(ours))
    with torch.device("meta"):  # shapes only, no 35M-parameter init
        ref = UNet2DModel(**DDPM_CIFAR10)
    n_ref = sum(p.numel() for p in ref.parameters())
    assert abs(n_ours - n_ref) < 100_000, (n_ours, n_ref)
    assert abs(n_ours - 35.7e6) < 50_000, n_ours
    # The diffusers config maps exactly to our defaults (bar dropout: 0 in inference configs).
    assert unet_config_from_diffusers(DDPM_CIFAR10) == dict(
        ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0,
        num_classes=None, out_channels=3, num_groups=32, num_heads=1, head_dim=None,
        norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_parity_with_diffusers(parity_cases, name):
    kwargs, params, x, t, y, ref, apply = parity_cases[name]
    out = apply(params, x, t, y)
    assert out.dtype == jnp.float32 and out.shape == ref.shape
    err = _rel_err(out, ref)
    assert err < 1e-4, err
    # Sanity: the test can fail (a different timestep moves the output far beyond tolerance).
    assert _rel_err(apply(params, x, t + 1.0, y), ref) > 1e-3


def test_timestep_embedding_and_downsample_padding():
    from diffusers.models.embeddings import get_timestep_embedding
    t = np.array([0.0, 1.0, 17.5, 999.0], np.float32)
    for flip, shift, dim in [(True, 0, 64), (False, 1, 64), (True, 0, 33)]:
        ref = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip,
                                     downscale_freq_shift=shift).numpy()
        np.testing.assert_allclose(timestep_embedding(jnp.asarray(t), dim, flip, shift), ref,
                                   atol=1e-4)  # fp32 sin of args ~1e3
    # Flax 'SAME' at stride 2 on even sizes pads (0, 1): the same as downsample_padding=0.
    x = jnp.asarray(np.random.RandomState(1).randn(1, 8, 8, 4), jnp.float32)
    w = jnp.asarray(np.random.RandomState(2).randn(3, 3, 4, 4), jnp.float32)
    conv = lambda pad: jax.lax.conv_general_dilated(  # noqa: E731
        x, w, (2, 2), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_array_equal(conv("SAME"), conv(((0, 1), (0, 1))))
    params = {"conv": {"kernel": w, "bias": jnp.zeros(4)}}
    np.testing.assert_array_equal(Downsample(0).apply({"params": params}, x), conv("SAME"))


def test_bf16_compute(parity_cases):
    kwargs, params, x, t, y, ref, apply32 = parity_cases["cond"]
    model = UNet(**{**kwargs, "dtype": jnp.bfloat16})
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, t, y)["params"]
    chex.assert_trees_all_equal_shapes_and_dtypes(shapes, params)  # params stay float32
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(shapes))
    out = jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))(params, x, t, y)
    assert out.dtype == jnp.float32
    assert np.all(np.isfinite(out))
    err = _rel_err(out, apply32(params, x, t, y))
    assert err < 5e-2, err


# A minimal conditional UNet (one level, only mid attention) for the gradient tests.
MINI = dict(ch=8, ch_mult=(1,), num_res_blocks=0, attn_resolutions=(), num_groups=4,
            dropout=0.5, num_classes=3)


def _mini_inputs():
    rng = np.random.RandomState(3)
    x = jnp.asarray(rng.randn(2, 4, 4, 3), jnp.float32)
    t = jnp.array([5.0, 900.0], jnp.float32)
    y = jnp.array([0, 2], jnp.int32)
    shapes = jax.eval_shape(UNet(**MINI).init, jax.random.key(0), x, t, y)["params"]
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.randn(*s.shape), jnp.float32), shapes)
    return params, x, t, y


def test_remat_and_dropout():
    params, x, t, y = _mini_inputs()

    def make(remat):
        def loss(p, key):
            out = UNet(**MINI, remat=remat).apply({"params": p}, x, t, y, train=True,
                                                  rngs={"dropout": key})
            return jnp.mean(out ** 2)
        return loss

    # rbg keys: threefry dropout masks would double these XLA CPU compiles.
    key = jax.random.key(7, impl="rbg")
    # remat=True wraps each of the 3 ResBlocks and the attention block in a checkpoint.
    assert str(jax.make_jaxpr(make(True))(params, key)).count("remat") == 4
    assert "remat" not in str(jax.make_jaxpr(make(False))(params, key))
    plain, remat = jit(jax.value_and_grad(make(False))), jit(jax.value_and_grad(make(True)))
    v0, g0 = plain(params, key)
    v1, g1 = remat(params, key)
    chex.assert_trees_all_close((v0, g0), (v1, g1), rtol=1e-5, atol=1e-6)
    assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(g0)) > 0
    # Dropout is active in training: another key gives another loss.
    v2, _ = plain(params, jax.random.key(8, impl="rbg"))
    assert abs(float(v2) - float(v0)) > 1e-6 * abs(float(v0))

    # train=False needs no dropout rng (an active Dropout would raise without one; the parity
    # test's "cond" model has dropout 0.1 and matches torch eval). y=None is the null label.
    null_label = jnp.full((2,), MINI["num_classes"], jnp.int32)
    ev = jit(lambda p: (UNet(**MINI).apply({"params": p}, x, t, None),
                        UNet(**MINI).apply({"params": p}, x, t, null_label)))
    null, null_explicit = ev(params)
    np.testing.assert_array_equal(null, null_explicit)


@pytest.mark.parametrize("kwargs, x_shape, t_shape, y, match", [
    ({}, (2, 30, 32, 3), (2,), None, "divisible by 2"),
    ({}, (2, 32, 32), (2,), None, r"\[B, H, W, C\]"),
    ({}, (2, 32, 32, 3), (), None, "t must have shape"),
    ({}, (2, 32, 32, 3), (2, 1), None, "t must have shape"),
    ({}, (2, 32, 32, 3), (2,), (2,), "unconditional"),
    ({"num_classes": 10}, (2, 32, 32, 3), (2,), (3,), "y must have shape"),
    ({"ch": 36}, (2, 32, 32, 3), (2,), None, "not divisible by num_groups"),
    ({"attn_resolutions": (16,)}, (2, 28, 28, 3), (2,), None, "matches no feature-map"),
])
def test_bad_inputs_raise(kwargs, x_shape, t_shape, y, match):
    base = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, num_groups=8)
    if match == "divisible by 2":
        base["ch_mult"] = (1, 2, 2, 2)
    if match == "matches no feature-map":
        base["ch_mult"] = (1, 2)
    model = UNet(**{**base, **kwargs})
    args = [jax.ShapeDtypeStruct(x_shape, jnp.float32), jax.ShapeDtypeStruct(t_shape, jnp.float32)]
    if y is not None:
        args.append(jax.ShapeDtypeStruct(y, jnp.int32))
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(model.init, jax.random.key(0), *args)


def test_loader_errors_and_legacy_names(parity_cases):
    model = _perturbed_diffusers({**SMALL, **VARIANTS["ddpm"]}, 0)
    config = dict(model.config)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    # Legacy attention names (google/ddpm-* checkpoints) convert to the same params.
    legacy = {k.replace("to_q.", "query.").replace("to_k.", "key.").replace("to_v.", "value.")
              .replace("to_out.0.", "proj_attn."): v for k, v in sd.items()}
    chex.assert_trees_all_equal(unet_params_from_diffusers(legacy, config=config),
                                parity_cases["ddpm"][1])

    missing = dict(sd)
    del missing["up_blocks.1.resnets.1.conv2.weight"]
    with pytest.raises(ValueError, match=r"missing keys: \['up_blocks.1.resnets.1.conv2.weight'\]"):
        unet_params_from_diffusers(missing, config=config)
    with pytest.raises(ValueError, match="unexpected keys.*down_blocks.0.foo.weight"):
        unet_params_from_diffusers({**sd, "down_blocks.0.foo.weight": np.zeros(3)}, config=config)
    extra_block = {**sd, "down_blocks.0.resnets.7.conv1.bias": np.zeros(32, np.float32)}
    with pytest.raises(ValueError, match="unexpected keys.*down_blocks.0.resnets.7.conv1.bias"):
        unet_params_from_diffusers(extra_block, config=config)
    bad_shape = {**sd, "conv_in.bias": np.zeros(5, np.float32)}
    with pytest.raises(ValueError, match="shape mismatches.*conv_in.bias"):
        unet_params_from_diffusers(bad_shape, config=config)

    with pytest.raises(ValueError, match="unsupported down block type 'CrossAttnDownBlock2D'"):
        unet_config_from_diffusers({**config, "down_block_types": ("DownBlock2D",
                                                                   "CrossAttnDownBlock2D")})
    with pytest.raises(ValueError, match="same resolution on both paths"):
        unet_config_from_diffusers({**DDPM_CIFAR10, "up_block_types": (
            "UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D")})
    with pytest.raises(ValueError, match="resnet_time_scale_shift"):
        unet_config_from_diffusers({**config, "resnet_time_scale_shift": "scale_shift"})
