"""Evaluation during training (``train.eval_every``, :mod:`jaxdiff.eval.in_training`): tiny digits and
shapes text-to-image runs log ``eval/...`` scalars to metrics.jsonl and TensorBoard; the logged
figures equal a recomputation from the run's EMA checkpoint and the documented key through the
public functions (generation, classifier, judge, shapes adherence, FID with random Inception
weights); 8 simulated devices give the same figures as 1; bad settings fail in one line."""
import dataclasses
import glob
import json
import os
import struct
import subprocess
import sys
import textwrap
import types

import jax
import numpy as np
import pytest

from _testutil import override
from experiments.configs import ddpm_digits, t2i_shapes
from jaxdiff.eval import in_training
from jaxdiff.train.loop import train

pytestmark = pytest.mark.usefixtures("xla_o0")  # compiles dominate these tiny runs (conftest.xla_o0)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_FOLD = 0x6576616C  # the documented key of the sample set: fold_in(key(sample.seed), "eval")

DIGITS_TINY = {
    "model.ch": 16, "model.ch_mult": (1, 2), "model.num_res_blocks": 1, "model.attn_resolutions": (4,),
    "diffusion.num_timesteps": 100, "train.num_steps": 4, "train.batch_size": 16, "train.warmup_steps": 2,
    "train.cosine_decay": False, "train.log_every": 1, "train.checkpoint_every": 2, "train.num_samples": 0,
    "train.eval_every": 2, "train.eval_num": 20, "sample.num_steps": 4,
}
DIGITS_KEYS = ("eval/accuracy", "eval/frechet", "eval/frechet_real_vs_real", "eval/judge_accuracy",
               "eval/diversity_ratio")


def digits_config(**overrides):
    return override(ddpm_digits.get_config(), {**DIGITS_TINY, **overrides})


def jsonl(workdir, key):
    """{step: line} of the metrics.jsonl lines that hold ``key``."""
    return {l["step"]: l for l in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if key in l}


def tensorboard_scalars(workdir) -> dict:
    """{tag: {step: value}} read straight from the event files (TFRecord framing, Event protos)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents*")):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


# ----------------------------------------------------------------------------- settings, no training
def test_bad_settings_fail_in_one_line_before_anything_is_read(tmp_path):
    cases = [({"train.eval_every": -1}, "train.eval_every must be >= 0"),
             ({"train.eval_num": 1}, "train.eval_num must be >= 2"),
             ({"train.eval_inception": str(tmp_path / "none.safetensors")}, "train.eval_inception=.*no such file"),
             ({"train.eval_fid_ref": "x.npz"}, "train.eval_fid_ref is set but train.eval_inception is not")]
    for overrides, message in cases:
        c = digits_config(**overrides)
        with pytest.raises(ValueError, match=message) as e:
            train(c, str(tmp_path / "w"))
        assert "\n" not in str(e.value)
    assert not (tmp_path / "w").exists()


def test_metric_choice_and_sample_set():
    s = in_training.EvalSettings(every=5, num=23, seed=3)
    digits8 = types.SimpleNamespace(text_conditional=False, conditional=True, num_classes=10, output_shape=(8, 8, 1))
    assert in_training.choose_metrics(s, digits8) == ("digits", "judge")
    digits32 = types.SimpleNamespace(**{**vars(digits8), "output_shape": (32, 32, 1)})
    assert in_training.choose_metrics(s, digits32) == ("digits",)  # the judge reads 8x8 only
    uncond = types.SimpleNamespace(**{**vars(digits8), "conditional": False, "num_classes": None})
    assert in_training.choose_metrics(s, uncond) == ("digits",)
    text = types.SimpleNamespace(text_conditional=True, conditional=False, num_classes=None, output_shape=(32, 32, 3))
    shapes_s = dataclasses.replace(s, data_name="shapes")
    assert in_training.choose_metrics(shapes_s, text) == ("shapes",)
    folder = dataclasses.replace(s, data_name="folder:/x")
    assert in_training.choose_metrics(folder, uncond) == ()
    assert in_training.choose_metrics(dataclasses.replace(folder, inception="w.safetensors"), uncond) == ("fid",)
    labels, prompts = in_training.sample_conditioning(s, digits8)
    np.testing.assert_array_equal(labels, np.arange(23) % 10)
    _, prompts = in_training.sample_conditioning(dataclasses.replace(shapes_s, num=190), text)
    from jaxdiff.data import shapes

    assert prompts[:189] == shapes.all_prompts(0) and prompts[189] == shapes.all_prompts(1)[0]
    key = jax.random.fold_in(jax.random.key(3), EVAL_FOLD)
    np.testing.assert_array_equal(jax.random.key_data(in_training.eval_key(3)), jax.random.key_data(key))


# ----------------------------------------------------------------------------- digits (+ FID) end to end
@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """pytorch-fid's Inception with seeded random weights (tests/test_fid.py's recipe), as safetensors."""
    torch = pytest.importorskip("torch")
    from test_fid import _random_fid_inception
    from jaxdiff.interop import inception as interop

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net = _random_fid_inception()
    finally:
        torch.set_num_threads(threads)
    path = str(tmp_path_factory.mktemp("inception") / "inception_fid.safetensors")
    interop.save_state_dict({k: v.clone() for k, v in net.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def digits_run(data_dir, tmp_path_factory):
    """4 steps, evaluations at steps 2 and 4 (classifier, judge)."""
    workdir = str(tmp_path_factory.mktemp("digits_eval") / "run")
    return workdir, train(digits_config(), workdir)


@pytest.mark.slow
def test_digits_eval_logged_and_equal_to_recomputation(digits_run, data_dir):
    from jaxdiff import generation, runs
    from jaxdiff.eval import evaluate_digits
    from jaxdiff.eval.judge import judge_digits

    workdir, summary = digits_run
    logged = jsonl(workdir, "eval/frechet")
    assert sorted(logged) == [2, 4]
    for line in logged.values():
        assert set(DIGITS_KEYS + ("eval/seconds", "loss")) <= set(line)  # one line per step
    assert summary["eval"] == {k: v for k, v in logged[4].items() if k.startswith("eval/")}
    tb = tensorboard_scalars(workdir)
    for k in DIGITS_KEYS:
        assert tb[k] == pytest.approx({s: logged[s][k] for s in (2, 4)}, rel=1e-6)  # TensorBoard stores float32
    # The same figures from the checkpoints' EMA params, the documented key and the public functions.
    key = jax.random.fold_in(jax.random.key(0), EVAL_FOLD)
    labels = np.arange(20) % 10
    for step in (2, 4):
        run = runs.load_run(workdir, step=step)
        images, _ = generation.generate(run.model, run.params, run.schedule, run.config, num=20, key=key,
                                        labels=labels)
        d, j = evaluate_digits(images, labels), judge_digits(images, labels)
        want = {"eval/accuracy": d["accuracy"], "eval/frechet": d["frechet"],
                "eval/frechet_real_vs_real": d["frechet_real_vs_real"],
                "eval/judge_accuracy": j["judge_accuracy"], "eval/diversity_ratio": j["diversity_ratio"]}
        assert {k: logged[step][k] for k in want} == want


@pytest.mark.slow
def test_guidance_sweep_rows_are_the_public_figures_of_each_scale(digits_run, data_dir):
    """experiments.guidance_sweep's library half: every scale samples the same labels from the same key,
    and each row holds evaluate_digits' and judge_digits' figures of those samples."""
    from jaxdiff import generation, runs
    from jaxdiff.eval import evaluate_digits
    from jaxdiff.eval.digits_sweep import guidance_sweep
    from jaxdiff.eval.judge import judge_digits

    run = runs.load_run(digits_run[0])
    rows = guidance_sweep(run, [1.0, 3.0], num=20, seed=7, batch_size=20)
    assert [r["guidance"] for r in rows] == [1.0, 3.0]
    labels = np.arange(20) % 10
    for row in rows:
        images, _ = generation.generate(run.model, run.params, run.schedule, run.config, num=20,
                                        key=jax.random.key(7), labels=labels, guidance=row["guidance"])
        d, j = evaluate_digits(images, labels), judge_digits(images, labels)
        assert (row["accuracy"], row["frechet"], row["judge_accuracy"], row["diversity_ratio"]) == (
            d["accuracy"], d["frechet"], j["judge_accuracy"], j["diversity_ratio"])
        assert row["frechet_ratio"] == pytest.approx(d["frechet"] / d["frechet_real_vs_real"], rel=1e-12)
    assert rows[0]["frechet"] != rows[1]["frechet"]  # the scale changes the samples


EIGHT_DEVICES = textwrap.dedent("""
    import dataclasses, hashlib, json, os, sys
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    sys.path.insert(0, {root!r})
    import jax
    jax.config.update("jax_disable_most_optimizations", True)
    assert jax.device_count() == 8
    from jaxdiff import runs
    from jaxdiff.eval import in_training
    from jaxdiff.train.loop import eval_settings

    run = runs.load_run({workdir!r})  # the EMA params replicated over 8 devices
    ev = in_training.InTrainingEval(eval_settings(run.config), run.model, run.schedule, run.config)
    result = ev(run.params)
    result["sha256"] = hashlib.sha256(ev.samples(run.params).tobytes()).hexdigest()
    print("RESULT", json.dumps(result))
""")


@pytest.mark.slow
def test_eight_devices_give_the_same_figures(digits_run, data_dir, tmp_path):
    import hashlib

    workdir, _ = digits_run
    script = tmp_path / "eight.py"
    script.write_text(EIGHT_DEVICES.format(root=ROOT, workdir=workdir))
    env = {**os.environ, "JAXDIFF_DATA_DIR": data_dir}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.split("RESULT", 1)[1])
    one = jsonl(workdir, "eval/frechet")[4]
    # The same 20 images (sampled over 8 devices), so the same classifier and judge readings; the
    # Frechet distances agree to float rounding (the classifier's XLA program differs in the last
    # bits between process setups: ~1e-8 relative, the real-vs-real floor too).
    from jaxdiff import generation, runs

    run = runs.load_run(workdir)  # 1 device
    images, _ = generation.generate(run.model, run.params, run.schedule, run.config, num=20,
                                    key=jax.random.fold_in(jax.random.key(0), EVAL_FOLD))
    assert got["sha256"] == hashlib.sha256(images.tobytes()).hexdigest()
    for k in ("eval/accuracy", "eval/judge_accuracy", "eval/diversity_ratio"):
        assert got[k] == one[k], k
    for k in ("eval/frechet", "eval/frechet_real_vs_real"):
        assert got[k] == pytest.approx(one[k], rel=1e-6), k


# ----------------------------------------------------------------------------- shapes text-to-image
T2I_TINY = {  # pixel space (no VAE), 8x8, one cross-attention level: compiles fast
    "vae.workdir": "", "data.image_size": 8, "model.block_out_channels": (16, 32),
    "model.down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "model.up_block_types": ("UpBlock2D", "UpBlock2D"),
    "model.mid_block_type": "", "model.attention_head_dim": 2, "text.hidden_size": 16, "text.intermediate_size": 32,
    "text.num_layers": 1, "text.num_heads": 2, "diffusion.num_timesteps": 100, "train.num_steps": 2,
    "train.batch_size": 8, "train.warmup_steps": 1, "train.log_every": 1, "train.checkpoint_every": 2,
    "train.num_samples": 0, "sample.num_steps": 3, "train.eval_every": 2, "train.eval_num": 12,
}


def warm_inception(params, batch: int, image_shape) -> None:
    """Compile the FID Inception programs for ``batch`` images of ``image_shape`` with XLA's usual
    optimisations: this module runs at -O0 (cheap compiles), where the Inception itself runs ~20x
    slower; JAX's in-memory jit cache does not key on the level, so the run reuses these."""
    from jax._src import compiler

    from jaxdiff.eval.fid import FIDEvaluator

    old = compiler._DISABLE_MOST_OPTIMIZATIONS.value
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        FIDEvaluator(params, batch_size=batch).stats(np.zeros((2, *image_shape), np.uint8))
    finally:
        jax.config.update("jax_disable_most_optimizations", old)


@pytest.mark.slow
def test_shapes_text_to_image_logs_prompt_adherence_and_fid(data_dir, tmp_path, inception_weights):
    from jaxdiff import generation, runs
    from jaxdiff.data import shapes
    from jaxdiff.eval import shapes_adherence_to_captions
    from jaxdiff.eval.fid import FIDEvaluator, reference_stats
    from jaxdiff.interop.inception import load_inception

    # FID against zero-covariance reference statistics (the expected value needs no 2048 x 2048 sqrtm).
    ref = str(tmp_path / "ref_stats.npz")
    np.savez(ref, mu=np.random.default_rng(0).normal(0, 1, 2048), sigma=np.zeros((2048, 2048)))
    inception = load_inception(inception_weights)
    warm_inception(inception, 12, (8, 8, 3))
    workdir = str(tmp_path / "t2i")
    config = override(t2i_shapes.get_config(), {**T2I_TINY, "train.eval_inception": inception_weights,
                                                 "train.eval_fid_ref": ref})
    summary = train(config, workdir)
    logged = jsonl(workdir, "eval/all_accuracy")
    assert sorted(logged) == [2]
    assert summary["eval"] == {k: v for k, v in logged[2].items() if k.startswith("eval/")}
    assert {"eval/all_accuracy", "eval/fid"} <= set(tensorboard_scalars(workdir))
    # The same figures from the checkpoint's EMA params, the first 12 prompts and the documented key.
    run = runs.load_run(workdir)
    prompts = shapes.all_prompts(0)[:12]
    images = generation.generate_text(run.model, run.params, run.schedule, run.config, prompts=prompts,
                                      key=jax.random.fold_in(jax.random.key(0), EVAL_FOLD))
    a = shapes_adherence_to_captions(images, prompts)
    for k in ("shape_accuracy", "color_accuracy", "position_accuracy", "all_accuracy", "empty_fraction"):
        assert logged[2][f"eval/{k}"] == a[k], k
    # FID with sigma_ref = 0 in closed form (sqrtm(sigma 0) = 0): |mu - mu_ref|^2 + tr(sigma).
    ev = FIDEvaluator(inception, batch_size=12)
    s, r = ev.stats(images), reference_stats(ref, ev)
    assert logged[2]["eval/fid"] == pytest.approx(np.sum((s.mu - r.mu) ** 2) + np.trace(s.sigma), rel=1e-9)
