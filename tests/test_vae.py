"""AutoencoderKL (jaxdiff.nn.vae) and its diffusers loader (jaxdiff.interop.vae).

References: diffusers' AutoencoderKL (torch, CPU, fp32, eval mode) on random perturbed weights,
and float64 NumPy for the Gaussian posterior.
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.interop.safetensors_io import read_diffusers_folder
from jaxdiff.interop.vae import (load_diffusers_vae, vae_config_from_diffusers,
                                 vae_params_from_diffusers)
from jaxdiff.nn.vae import AutoencoderKL, DiagonalGaussian

ENC, DEC = AutoencoderKL.encode, AutoencoderKL.decode

# Tiny diffusers configs: f = 2 (2 levels, 2 layers), f = 8 (4 levels), f = 4 (3 levels, no
# quant convs, no mid attention, 1 input channel, 3 latent channels).
CONFIGS = {
    "f2": dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8, size=16),
    "f8": dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
               size=32),
    "f4_plain": dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
                     size=16, in_channels=1, out_channels=2, latent_channels=3,
                     use_quant_conv=False, use_post_quant_conv=False,
                     mid_block_add_attention=False),
}


def _diffusers_vae(name, seed=0):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    cfg = dict(CONFIGS[name])
    cfg.pop("size")
    n = len(cfg["block_out_channels"])
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n,
                                  up_block_types=("UpDecoderBlock2D",) * n, **cfg).eval()
    with torch.no_grad():  # move norms/biases off their defaults (1, 0) so a swap shows
        for p in vae.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    return vae


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers(name, tmp_path):
    torch = pytest.importorskip("torch")
    tvae = _diffusers_vae(name)
    tvae.save_pretrained(str(tmp_path), safe_serialization=True)
    model, params = load_diffusers_vae(str(tmp_path))
    c = model.in_channels
    s = CONFIGS[name]["size"]
    f = model.downsample_factor
    rng = np.random.RandomState(0)
    x = rng.uniform(-1, 1, (2, s, s, c)).astype(np.float32)
    z = rng.randn(2, s // f, s // f, model.latent_channels).astype(np.float32)

    with torch.no_grad():
        dist = tvae.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist
        t_mean = dist.mean.numpy().transpose(0, 2, 3, 1)
        t_logvar = dist.logvar.numpy().transpose(0, 2, 3, 1)
        t_dec = tvae.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample.numpy()
        t_dec = t_dec.transpose(0, 2, 3, 1)

    post = jax.jit(lambda p, x: model.apply({"params": p}, x, method=ENC))(params, x)
    dec = jax.jit(lambda p, z: model.apply({"params": p}, z, method=DEC))(params, z)
    errs = dict(mean=_rel(post.mean, t_mean), logvar=_rel(post.logvar, t_logvar),
                decode=_rel(dec, t_dec))
    print(f"\n[{name}] relative error vs diffusers: {errs}")
    assert post.mean.shape == t_mean.shape and dec.shape == t_dec.shape
    for k, e in errs.items():
        assert e < 1e-4, (k, e)

    # Config inferred from the tensors gives the same params; legacy attention names load too.
    sd = {k: v.detach().numpy() for k, v in tvae.state_dict().items()}
    same = vae_params_from_diffusers(sd)
    jax.tree.map(np.testing.assert_array_equal, same, params)
    if CONFIGS[name].get("mid_block_add_attention", True):
        legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        sd_old = {}
        for k, v in sd.items():
            for new, old in legacy.items():
                k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
            sd_old[k] = v
        assert set(sd_old) != set(sd)
        jax.tree.map(np.testing.assert_array_equal,
                     vae_params_from_diffusers(sd_old, dict(tvae.config)), params)


def test_parameter_count_sd1():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    cfg = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
               norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
    with torch.device("meta"):
        tvae = diffusers.AutoencoderKL(**cfg)
    n_torch = sum(p.numel() for p in tvae.parameters())
    kwargs = vae_config_from_diffusers(dict(tvae.config))
    x = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
    shapes = jax.eval_shape(AutoencoderKL(**kwargs).init, jax.random.key(0), x)["params"]
    n_ours = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(shapes))
    print(f"\nSD 1.x VAE parameters: jaxdiff {n_ours:,}, diffusers {n_torch:,}")
    assert n_ours == n_torch == 83_653_863
    assert len(jax.tree.leaves(shapes)) == len(tvae.state_dict())  # one leaf per tensor
    assert AutoencoderKL() == AutoencoderKL(**kwargs)  # our defaults are the SD 1.x VAE


@pytest.mark.parametrize("boc,hw,latent_hw", [((128, 256, 512, 512), 256, 32),
                                              ((128, 256, 512), 256, 64)])
def test_shapes_eval_shape(boc, hw, latent_hw):
    model = AutoencoderKL(block_out_channels=boc)
    assert model.downsample_factor == hw // latent_hw
    x = jax.ShapeDtypeStruct((2, hw, hw, 3), jnp.float32)

    def run(x):
        variables = model.init(jax.random.key(0), x)
        post = model.apply(variables, x, method=ENC)
        return post, model.apply(variables, post.mean, method=DEC)

    post, rec = jax.eval_shape(run, x)
    assert post.mean.shape == post.logvar.shape == (2, latent_hw, latent_hw, 4)
    assert post.mean.dtype == jnp.float32
    assert rec.shape == (2, hw, hw, 3) and rec.dtype == jnp.float32


def test_diagonal_gaussian_vs_numpy():
    rng = np.random.RandomState(0)
    moments = rng.randn(3, 2, 2, 8).astype(np.float32) * 2
    moments[0, 0, 0, 4] = 50.0    # logvar clipped to 20
    moments[0, 0, 1, 5] = -80.0   # logvar clipped to -30
    post = jax.jit(DiagonalGaussian.from_moments)(moments)  # also: a pytree through jit
    m64 = moments.astype(np.float64)
    mean, logvar = m64[..., :4], np.clip(m64[..., 4:], -30, 20)
    np.testing.assert_array_equal(post.mean, moments[..., :4])
    np.testing.assert_allclose(post.logvar, logvar, rtol=1e-7)
    assert float(post.logvar[0, 0, 0, 0]) == 20.0 and float(post.logvar[0, 0, 1, 1]) == -30.0
    np.testing.assert_allclose(post.std, np.exp(0.5 * logvar), rtol=1e-6)
    kl_ref = 0.5 * np.sum(mean**2 + np.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
    assert post.kl().shape == (3,)
    np.testing.assert_allclose(jax.jit(DiagonalGaussian.kl)(post), kl_ref, rtol=1e-5)
    other = DiagonalGaussian(mean=jnp.asarray(moments[..., 4:] * 0.1),
                             logvar=jnp.zeros((3, 2, 2, 4)))
    om = m64[..., 4:] * 0.1
    kl2_ref = 0.5 * np.sum((mean - om) ** 2 + np.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
    np.testing.assert_allclose(post.kl(other), kl2_ref, rtol=1e-5)
    key = jax.random.key(7)
    eps = np.asarray(jax.random.normal(key, (3, 2, 2, 4), jnp.float32), np.float64)
    np.testing.assert_allclose(post.sample(key), mean + np.exp(0.5 * logvar) * eps,
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(post.sample(key), post.sample(jax.random.key(8)))
    np.testing.assert_array_equal(post.mode(), post.mean)
    z = rng.randn(3, 2, 2, 4)
    nll_ref = 0.5 * np.sum(np.log(2 * np.pi) + logvar + (z - mean) ** 2 / np.exp(logvar),
                           axis=(1, 2, 3))
    np.testing.assert_allclose(post.nll(jnp.asarray(z, jnp.float32)), nll_ref, rtol=1e-4)


def _rms_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _random_params(model, x, seed=0):
    """NumPy-random params of the right shapes (flax's own init is very slow on this CPU)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    rng = np.random.RandomState(seed)

    def draw(path, s):
        name = path[-1].key
        if name == "scale":
            return (1 + 0.2 * rng.randn(*s.shape)).astype(np.float32)
        if name == "bias":
            return (0.1 * rng.randn(*s.shape)).astype(np.float32)
        return (rng.randn(*s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _tiny(**kw):
    return AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, **kw)


def test_call_sampling_and_bf16():
    x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
    key = jax.random.key(3)
    model, bf = _tiny(), _tiny(dtype=jnp.bfloat16)

    variables = {"params": _random_params(model, x)}

    @jax.jit
    def run(variables, x, key):
        rec, post = model.apply(variables, x)
        rec_s, _ = model.apply(variables, x, key=key, sample_posterior=True)
        rec_bf, post_bf = bf.apply(variables, x)
        return (rec, post, model.apply(variables, post.mean, method=DEC), rec_s,
                model.apply(variables, post.sample(key), method=DEC), rec_bf, post_bf)

    rec, post, rec_mean, rec_s, rec_s_ref, rec_bf, post_bf = run(variables, x, key)
    np.testing.assert_allclose(rec, rec_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rec_s, rec_s_ref, rtol=1e-5, atol=1e-5)
    assert not np.allclose(rec_s, rec, atol=1e-3)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        jax.eval_shape(functools.partial(model.init, sample_posterior=True),
                       jax.random.key(1), x)

    bf_params = jax.eval_shape(bf.init, jax.random.key(1), x)["params"]
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(bf_params))
    assert rec_bf.dtype == post_bf.mean.dtype == jnp.float32
    errs = _rms_rel(post_bf.mean, post.mean), _rms_rel(rec_bf, rec)
    print(f"\nbf16 vs fp32 relative RMS error: mean {errs[0]:.2e}, decode {errs[1]:.2e}")
    assert max(errs) < 5e-2, errs


def test_bad_inputs():
    model, key = _tiny(), jax.random.key(0)
    enc = lambda x: jax.eval_shape(model.init, key, x)  # noqa: E731  (errors come at trace time)
    dec = lambda z: jax.eval_shape(functools.partial(model.init, method=DEC), key, z)  # noqa
    enc(jnp.zeros((1, 16, 16, 3)))
    dec(jnp.zeros((1, 8, 8, 4)))
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        enc(jnp.zeros((16, 16, 3)))
    with pytest.raises(ValueError, match="divisible by the downsampling factor f=2"):
        enc(jnp.zeros((1, 15, 16, 3)))
    with pytest.raises(ValueError, match="in_channels=3"):
        enc(jnp.zeros((1, 3, 16, 16)))  # NCHW by mistake
    with pytest.raises(ValueError, match="latent_channels=4"):
        dec(jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match=r"\[B, h, w, C\]"):
        dec(jnp.zeros((8, 8, 4)))


def test_config_errors():
    base = dict(_class_name="AutoencoderKL", block_out_channels=[16, 32],
                down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8)
    kw = vae_config_from_diffusers(dict(base, use_quant_conv=False, sample_size=64,
                                        force_upcast=True, _diffusers_version="0.42.1"))
    assert kw["use_quant_conv"] is False and kw["block_out_channels"] == (16, 32)
    for bad, match in [(dict(down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
                        "AttnDownEncoderBlock2D"),
                       (dict(up_block_types=["UpDecoderBlock2D"]), "differ in length"),
                       (dict(act_fn="gelu"), "act_fn"),
                       (dict(latents_mean=[0.0] * 4), "latents_mean"),
                       (dict(norm_type="spatial"), "norm_type"),
                       (dict(_class_name="AutoencoderTiny"), "AutoencoderTiny")]:
        with pytest.raises(ValueError, match=match):
            vae_config_from_diffusers(dict(base, **bad))


def test_loader_errors(tmp_path):
    tvae = _diffusers_vae("f2")
    good = tmp_path / "good"
    tvae.save_pretrained(str(good), safe_serialization=True)
    config, sd = read_diffusers_folder(str(good))
    assert config["_class_name"] == "AutoencoderKL" and len(sd) == len(tvae.state_dict())

    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_diffusers_vae(str(tmp_path / "nope"))
    binonly = tmp_path / "binonly"
    tvae.save_pretrained(str(binonly), safe_serialization=False)
    assert os.listdir(binonly) and not any(p.endswith(".safetensors")
                                           for p in os.listdir(binonly))
    with pytest.raises(ValueError, match="convert.*safetensors|safetensors.*[Cc]onvert"):
        load_diffusers_vae(str(binonly))
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="subfolder='vae'"):
        load_diffusers_vae(str(pipe))
    os.rename(good, pipe / "vae")
    model, _ = load_diffusers_vae(str(pipe), subfolder="vae", dtype=jnp.bfloat16)
    assert model.dtype == jnp.bfloat16

    # Every diffusers key is consumed exactly once: extra, missing, mis-shaped keys all raise.
    with pytest.raises(ValueError, match=r"unexpected keys: \['encoder.extra.weight'\]"):
        vae_params_from_diffusers(dict(sd, **{"encoder.extra.weight": np.zeros(3)}), config)
    key = "decoder.up_blocks.1.resnets.2.conv2.weight"
    with pytest.raises(ValueError, match=rf"missing keys: \['{key}'\]"):
        vae_params_from_diffusers({k: v for k, v in sd.items() if k != key}, config)
    bad = dict(sd, **{"encoder.mid_block.attentions.0.to_q.weight": np.zeros((64, 32))})
    with pytest.raises(ValueError, match=r"shape mismatches: \['encoder.mid_block.attentions"):
        vae_params_from_diffusers(bad, config)
    dup = dict(sd, **{"encoder.mid_block.attentions.0.query.weight":
                      sd["encoder.mid_block.attentions.0.to_q.weight"]})
    with pytest.raises(ValueError, match="same parameter"):
        vae_params_from_diffusers(dup, config)
    cfg_file = json.loads((pipe / "vae" / "config.json").read_text())
    with pytest.raises(ValueError, match="shape mismatches"):  # config disagrees with weights
        vae_params_from_diffusers(sd, dict(cfg_file, latent_channels=8))


def test_bf16_safetensors_variant(tmp_path):
    torch = pytest.importorskip("torch")
    tvae = _diffusers_vae("f2").to(torch.bfloat16)
    tvae.save_pretrained(str(tmp_path), safe_serialization=True, variant="bf16")
    with pytest.raises(FileNotFoundError, match="variant"):
        load_diffusers_vae(str(tmp_path))
    _, params = load_diffusers_vae(str(tmp_path), variant="bf16")
    w = tvae.state_dict()["encoder.conv_in.weight"].float().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(params["encoder"]["conv_in"]["kernel"], w)
    assert params["encoder"]["conv_in"]["kernel"].dtype == np.float32
