"""Smoke test of ``benchmarks/unet_bench.py`` on a tiny U-Net (the kernels it measures are tested
for exactness in ``tests/test_kernels.py``), and ``benchmarks/harness.py``'s pure functions
against hand-computed values.

The slow tests run the benchmark end to end: the timing run compiles with LLVM's expensive
passes off and backend optimisation 0 (these tests check the machinery, not the speed), so the
module stays well under 30 s on a 2-core CPU.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import harness, unet_bench as ub
from benchmarks.unet_configs import (COND_SMALL, DDPM_CIFAR10, SD15, SMALL, conv_flops,
                                     diffusers_config, unet_forward_flops)
from jaxdiff import xla

FAST_COMPILE = {"xla_llvm_disable_expensive_passes": True, "xla_backend_optimization_level": 0}
# One level (8x8, with attention), one res block: the smallest U-Net with every layer kind but
# the resamplers (their FLOP formulas are checked layer by layer below).
MINI = dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,), num_groups=4, dropout=0.1)
# The text-conditioned U-Net (--model cond) at its smallest, as diffusers UNet2DConditionModel
# kwargs: one 8x8 level, one cross-attention transformer (down block), no middle block: three
# ResBlocks in all. (The model itself is checked against diffusers in tests/test_unet_cond.py;
# here every extra block costs seconds of XLA compile.)
MINI_COND = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8,),
                 layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",),
                 up_block_types=("UpBlock2D",), mid_block_type=None, cross_attention_dim=8,
                 attention_head_dim=2, norm_num_groups=4)
ROWS = [("train", "jaxdiff", "fp32", 2), ("train", "diffusers", "fp32 eager", 2),
        ("sample", "jaxdiff", "fp32 forward", 2), ("sample", "jaxdiff", "fp32 ddim x2, per step", 2),
        ("sample", "diffusers", "fp32 eager forward", 2)]


def _compile(fn, *args):
    return jax.jit(fn).lower(*args).compile(FAST_COMPILE)


def _xla_flops(fn, *args):
    return harness.xla_flops(_compile(fn, *args))


def _tiny_run(**kwargs):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    cfg = ub.BenchConfig(**kwargs, batches=(2,), precisions=("fp32",), steps=2,
                         warmup=1, sampling_steps=2, sampling_repeats=1, blocks=2, pause=0.0,
                         torch_compile=False, matmul_peak=False, compiler_options=FAST_COMPILE)
    return ub.run(cfg, log=lambda s: None)


@pytest.fixture(scope="module")
def result():
    return _tiny_run(unet=MINI, image_size=8)


@pytest.mark.slow  # a benchmark run
def test_table_rows_and_flops(result):
    rows = {(r["task"], r["impl"], r["variant"], r["batch"]): r for r in result["rows"]}
    assert list(rows) == ROWS
    for r in rows.values():
        assert r["ms"] > 0 and r["images_per_s"] > 0 and r["flops"] > 0 and r["tflops"] > 0
        assert r["speed_vs_diffusers"] > 0
    assert result["params"]["jaxdiff"] == result["params"]["diffusers"]
    # The torch rows reuse the FLOP count of the same jaxdiff program.
    train, fwd = rows["train", "jaxdiff", "fp32", 2], rows["sample", "jaxdiff", "fp32 forward", 2]
    assert rows["train", "diffusers", "fp32 eager", 2]["flops"] == train["flops"]
    assert rows["sample", "diffusers", "fp32 eager forward", 2]["flops"] == fwd["flops"]
    assert rows["train", "diffusers", "fp32 eager", 2]["speed_vs_diffusers"] == 1.0
    # XLA's count = the analytic matmul/conv count + elementwise work (15% at these 8 channels,
    # 1.7% at the small config); a train step is >= 3 forwards (at the small config 3.1: the
    # elementwise work of the optimiser and of the dropout masks is counted too).
    analytic = unet_forward_flops(MINI, 2, 8)["total"]
    assert result["analytic_forward_flops"][2] == analytic
    assert analytic <= fwd["flops"] <= 1.25 * analytic
    assert 2.5 * analytic <= train["flops"] <= 6 * analytic
    assert train["mem_bytes"] > 0 and fwd["mem_bytes"] > 0
    text = ub.format_table(result)
    for variant in ("fp32 eager", "fp32 ddim x2, per step", "vs 2 x forward", "parameters:",
                    "compile (jaxdiff): train step fp32 b2"):
        assert variant in text


@pytest.mark.slow  # a benchmark run
def test_cond_model_rows():
    """--model cond: UNetCondition (real train step, context from the batch) vs
    UNet2DConditionModel, the same rows and machinery; FLOPs from XLA only. With
    --jaxlib-defaults: the jaxdiff programs once more without jaxdiff.xla's options."""
    result = _tiny_run(unet=MINI_COND, model="cond", image_size=8, channels=4, context_len=5,
                       jaxlib_defaults=True)
    rows = {(r["task"], r["impl"], r["variant"], r["batch"]): r for r in result["rows"]}
    extra = [("train", "jaxdiff", "fp32 jaxlib defaults", 2), ("sample", "jaxdiff", "fp32 forward jaxlib defaults", 2)]
    assert list(rows) == ROWS[:1] + extra[:1] + ROWS[1:3] + extra[1:] + ROWS[3:]
    assert rows[extra[0]]["flops"] > 0 and "jaxlib defaults" not in (rows[ROWS[0]]["note"] or "")
    assert result["jaxdiff_xla_options"] == {**xla.compiler_options(), **FAST_COMPILE}
    assert rows[extra[0]]["note"] == "XLA options: " + ", ".join(f"{k}={v!r}" for k, v in FAST_COMPILE.items())
    for r in rows.values():
        assert r["ms"] > 0 and r["flops"] > 0 and r["speed_vs_diffusers"] > 0
    assert result["params"]["jaxdiff"] == result["params"]["diffusers"]
    train, fwd = rows["train", "jaxdiff", "fp32", 2], rows["sample", "jaxdiff", "fp32 forward", 2]
    assert rows["train", "diffusers", "fp32 eager", 2]["flops"] == train["flops"]
    assert 2.5 * fwd["flops"] <= train["flops"] <= 6 * fwd["flops"]
    assert train["mem_bytes"] > 0 and fwd["mem_bytes"] > 0
    assert "analytic_forward_flops" not in result
    text = ub.format_table(result)
    for s in ("UNetCondition vs diffusers UNet2DConditionModel", "text context [B, 5, 8]",
              "jaxdiff rows: XLA options: xla_cpu_experimental_ynn_fusion_type=''",
              "fp32 ddim x2, per step", "parameters: jaxdiff"):
        assert s in text


@pytest.mark.slow  # XLA compiles
def test_layer_flop_formulas_equal_xla():
    """conv_flops (padding-aware) and the dense/attention terms equal XLA's count exactly."""
    x = jnp.ones((2, 8, 8, 4))
    for k, stride, pad in [(3, 1, None), (3, 2, (0, 1)), (3, 2, (1, 1)), (1, 1, (0, 0))]:
        w = jnp.ones((k, k, 4, 6))
        padding = ((1, 1),) * 2 if pad is None and k == 3 else ((pad or (0, 0)),) * 2
        got = _xla_flops(lambda x, w: jax.lax.conv_general_dilated(
            x, w, (stride,) * 2, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")), x, w)
        assert got == conv_flops(2, 8, 8, 4, 6, k, stride, pad), (k, stride, pad)
    q = jnp.ones((2, 16, 1, 8))
    got = _xla_flops(lambda q: jnp.einsum("btnd,bsnd->bnts", q, q), q)
    assert got == 2 * 2 * 16 * 16 * 8  # one of the two attention matmuls
    # The MINI model's conv/dense/attention terms, by hand.
    f = unet_forward_flops(MINI, 2, 8)
    conv3 = lambda ci, co: conv_flops(2, 8, 8, ci, co)  # noqa: E731
    assert f["conv"] == (conv3(3, 8) + 3 * 2 * conv3(8, 8) + 2 * (conv3(16, 8) + conv3(8, 8)
                         + 2 * 2 * 64 * 16 * 8) + conv3(8, 3))
    assert f["attention"] == 4 * 2 * (2 * 2 * 64 * 64 * 8)  # 4 blocks x (q k^T, p v)


@pytest.mark.slow  # diffusers
def test_configs_match_diffusers():
    torch = pytest.importorskip("torch")
    unet_2d = pytest.importorskip("diffusers.models.unets.unet_2d")
    from jaxdiff.interop import unet_config_from_diffusers

    for cfg, n in [(DDPM_CIFAR10, 35_746_307), (SMALL, 1_113_955)]:
        d = diffusers_config(cfg, 32)
        back = unet_config_from_diffusers(d)
        for key in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "num_groups", "dropout"):
            assert back[key] == cfg[key], key
        with torch.device("meta"):
            assert sum(p.numel() for p in unet_2d.UNet2DModel(**d).parameters()) == n

    # The text-conditioned configs: one diffusers config builds both sides.
    from diffusers import UNet2DConditionModel

    from jaxdiff.interop import unet2d_condition_config_from_diffusers
    from jaxdiff.interop.unet2d_cond import expected_param_shapes
    from jaxdiff.nn.unet_cond import UNetCondition

    kwargs = unet2d_condition_config_from_diffusers(COND_SMALL)
    with torch.device("meta"):
        n_torch = sum(p.numel() for p in UNet2DConditionModel(**COND_SMALL).parameters())
    n_ours = sum(int(np.prod(s)) for s in expected_param_shapes(kwargs).values())
    assert n_ours == n_torch == 2_199_268
    # SD15 is the SD 1.x U-Net: UNetCondition's defaults (859,520,964 parameters, as
    # tests/test_unet_cond.py checks against diffusers).
    assert UNetCondition(**unet2d_condition_config_from_diffusers(SD15)) == UNetCondition()


def test_cli_and_helpers(monkeypatch):
    cfg = ub.config_from_args(["--small", "--batch", "4,16", "--precision", "fp32,bf16",
                               "--steps", "3", "--sampling-steps", "5", "--remat", "--max-batch",
                               "--mem-budget", "2GiB", "--xla-option",
                               "xla_llvm_disable_expensive_passes=true", "--json", "out.json"])
    assert cfg.unet == SMALL and cfg.batches == (4, 16) and cfg.precisions == ("fp32", "bf16")
    assert (cfg.steps, cfg.sampling_steps, cfg.remat, cfg.max_batch) == (3, 5, True, True)
    assert cfg.mem_budget == 2 ** 31 and cfg.json == "out.json"
    assert cfg.compiler_options == {"xla_llvm_disable_expensive_passes": True}
    assert not cfg.jaxlib_defaults and ub.config_from_args(["--small", "--jaxlib-defaults"]).jaxlib_defaults
    default = ub.config_from_args([])
    assert default.unet == DDPM_CIFAR10 and default.batches == (128,)
    with pytest.raises(SystemExit):
        ub.config_from_args(["--precision", "fp16"])
    cond = ub.config_from_args(["--model", "cond", "--small", "--no-torch-compile"])
    assert (cond.model, cond.unet, cond.batches, cond.image_size, cond.channels) == (
        "cond", COND_SMALL, (4,), 16, 4)
    sd = ub.config_from_args(["--model", "cond", "--batch", "2"])
    assert (sd.unet, sd.batches, sd.image_size, sd.name) == (SD15, (2,), 64, "sd15")
    assert default.model == "uncond" and cfg.model == "uncond"

    # max-batch search on a fake memory model: 1 MiB fixed + 3 KiB per example.
    class FakeCompiled:
        def __init__(self, b):
            self.b = b

        def memory_analysis(self):
            class M:
                argument_size_in_bytes = 2 ** 20
                output_size_in_bytes = alias_size_in_bytes = 0
                temp_size_in_bytes = 3 * 1024 * self.b
            return M()

    class FakeJax:
        def __init__(self, *a, **k):
            pass

        def compile_train(self, b, options=None):
            return FakeCompiled(b), None, None, 0.0, 0.0

    monkeypatch.setattr(ub, "_Jax", FakeJax)
    mb = ub.max_batch_search(cfg, "fp32", False, budget=2 ** 20 + 3 * 1024 * 1000, start=4)
    assert mb["max_batch"] == 1000 and mb["bytes_per_example"] == 3 * 1024


def test_harness_timing():
    # interleave: every contender gets its calls, in alternating blocks; steps that do not
    # divide go to the first blocks (7 over 3: 3, 2, 2); calls[name] overrides the block size.
    order = []
    times = harness.interleave({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                               steps=4, blocks=2, pause=0.0)
    assert order == ["a", "a", "b", "b", "a", "a", "b", "b"]
    assert [len(v) for v in times.values()] == [4, 4]
    order.clear()
    times = harness.interleave({"f": lambda: order.append("f"), "s": lambda: order.append("s")},
                               steps=7, blocks=3, pause=0.0, calls={"s": 1})
    assert "".join(order) == "fffs" + "ffs" + "ffs"
    assert (len(times["f"]), len(times["s"])) == (7, 3)
    assert harness.interleave({"x": lambda: None}, steps=3, blocks=1, pause=0.0,
                              calls={"x": 0}) == {"x": []}
    calls = []
    assert len(harness.timed(lambda: calls.append(1), steps=3, warmup=2)) == 3 and len(calls) == 5
    # median_ms: seconds -> (median, min) in ms; an even count averages the middle two.
    assert harness.median_ms([0.004, 0.001, 0.003]) == (3.0, 1.0)
    assert harness.median_ms([0.004, 0.001, 0.003, 0.002]) == (2.5, 1.0)
    # A failing optional contender (torch.compile) becomes an 'n/a' note, not a crash.
    assert harness.try_call(lambda x, y=0: x + y, 1, y=2) == (3, None)
    out, err = harness.try_call(lambda: 1 / 0)
    assert out is None and err == "n/a: ZeroDivisionError: division by zero"


def test_harness_formatting(tmp_path):
    assert harness.parse_bytes("2GiB") == 2 ** 31 == harness.parse_bytes("2g")
    assert harness.parse_bytes("1.5 MiB") == 3 * 2 ** 19
    assert harness.parse_bytes("512k") == 2 ** 19 and harness.parse_bytes("1000") == 1000
    assert harness.fmt_bytes(3 * 2 ** 29) == "1.5 GiB" and harness.fmt_bytes(2 ** 20) == "1.0 MiB"
    assert harness.fmt_bytes(1536) == "1.5 KiB" and harness.fmt_bytes(1023) == "1023 B"
    assert harness.fmt_bytes(None) == harness.fmt_bytes(float("nan")) == "n/a"
    assert harness.fmt_load((1.04, 0.5, 0.25)) == "1.0/0.5/0.2" and harness.fmt_load(None) == "n/a"
    assert harness.parse_xla_options(["a=true", "b=False", "c=3", "d=x=1", "e=''"]) == {
        "a": True, "b": False, "c": 3, "d": "x=1", "e": "''"}
    assert harness.parse_xla_options(None) == {}
    assert harness.markdown_table([("task", "ms"), ("train", "1.5"), ("sample", "12.0")]) == [
        "| task   | ms   |",
        "|--------|------|",
        "| train  | 1.5  |",
        "| sample | 12.0 |"]
    harness.write_json(str(tmp_path / "r.json"), {"x": (1, 2), "p": tmp_path})
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": [1, 2], "p": str(tmp_path)}
    cpu = harness.cpu_info()
    assert set(cpu) == {"cpu", "cpu_cores", "cpu_isa"} and cpu["cpu"] and cpu["cpu_cores"] >= 1


def test_harness_largest_batch():
    """The secant search on memory models by hand: affine (exact from the first two probes'
    line), convex (a batch that fits, each probed once, within max_probes), none fitting."""
    calls = []

    def affine(b):
        calls.append(b)
        return 1000 + 30 * b

    got = harness.largest_batch(affine, budget=1000 + 30 * 77 + 29, start=4)
    # probes 4 and 8 give the exact line; its guess 77 fits, 78 closes the bracket.
    assert got == {"max_batch": 77, "bytes_per_example": 30.0, "fixed_bytes": 1000.0,
                   "probes": {4: 1120, 8: 1240, 77: 3310, 78: 3340}}
    assert calls == [4, 8, 77, 78]
    calls.clear()

    def convex(b):  # more bytes per example at larger batches
        calls.append(b)
        return 2 ** 20 + 3072 * b + b * b // 64

    budget = 2 ** 30
    got = harness.largest_batch(convex, budget, start=4)
    assert len(calls) == len(set(calls)) == len(got["probes"]) <= 8
    assert convex(got["max_batch"]) <= budget
    (b1, m1), (b2, m2) = sorted(got["probes"].items())[-2:]
    assert got["bytes_per_example"] == (m2 - m1) / (b2 - b1)
    assert got["fixed_bytes"] == m2 - got["bytes_per_example"] * b2
    assert harness.largest_batch(affine, budget=500, start=4)["max_batch"] is None
