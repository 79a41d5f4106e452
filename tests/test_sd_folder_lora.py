"""Smoke run of ``benchmarks/sd_folder_lora.py`` (every stage at toy sizes, XLA -O0): shapes rendered to
captioned PNG folders, a VAE trained on one and exported, a tiny SD-layout folder, full fine-tuning
through ``python -m experiments.train`` and export, LoRA through the CLI on the other folder, and
adherence scored. Checks the artifacts, not the numbers: the exported base equals the run's EMA
params bit for bit, the LoRA run leaves the base folder bit-identical, its checkpoint is smaller than
the full run's, and the folders load in diffusers (base + ``load_lora_weights``) and generate.

One test (65-85 s on the 2-core CPU): split in two, pytest-xdist would run the smoke run on both workers.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # three training processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_run(tmp_path, torch_one_thread):
    work = tmp_path / "run"
    out = tmp_path / "result.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.sd_folder_lora", "--smoke", f"--workdir={work}",
                        f"--json={out}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    with open(out) as f:
        smoke = json.load(f)
    _check_artifacts(smoke)
    _check_diffusers(smoke)


def _check_artifacts(smoke):
    s = smoke["stages"]
    assert s["folders"]["num_B_new_color"] > 0 and s["folders"]["num_A"] > s["folders"]["num_B_new_color"]
    with open(os.path.join(s["folders"]["A"], "metadata.jsonl")) as f:
        assert not any("cyan" in json.loads(line)["text"] for line in f)  # the new colour stays out of A
    assert s["full"]["export_bit_exact"] and s["lora"]["base_bit_identical"]
    assert s["full"]["trainable_params"] == s["init_folder"]["unet_params"] + s["init_folder"]["text_encoder_params"]
    assert 0 < s["lora"]["trainable_params"] < s["init_folder"]["unet_params"] / 10
    assert s["lora"]["checkpoint_bytes"] < s["full"]["checkpoint_bytes"] / 2
    assert s["lora"]["file_bytes_f16"] < s["lora"]["file_bytes_f32"]
    for name in ("base", "lora"):
        a = smoke["adherence"][name]
        assert a["new_color"]["num_prompts"] > 0 and a["other_colors"]["num_prompts"] > 0
        assert 0.0 <= a["all"]["all_accuracy"] <= 1.0
    work = smoke["paths"]["workdir"]
    with np.load(os.path.join(work, "samples_lora.npz")) as z:
        assert z["images"].dtype == np.uint8 and z["images"].shape[1:] == (32, 32, 3)


def _check_diffusers(smoke):
    """The exported base loads in diffusers, its tokenizer folder reads the same in transformers and
    jaxdiff, and the exported LoRA file, fused by diffusers/peft, gives the U-Net weights jaxdiff's
    load_run merges (adapters of the LoRA run's EMA)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    import jax

    from jaxdiff import runs
    from jaxdiff.interop.unet2d_cond import unet2d_condition_params_to_diffusers
    from jaxdiff.text_to_image import load_stable_diffusion

    p = smoke["paths"]
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(p["base"], safety_checker=None,
                                                             requires_safety_checker=False)
    prompt = ["a cyan circle at the top"]
    ours = load_stable_diffusion(p["base"]).tokenizer(prompt, max_length=77, padding="max_length",
                                                      truncation=True)["input_ids"]
    theirs = pipe.tokenizer(prompt, max_length=77, padding="max_length", truncation=True)["input_ids"]
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    assert len(pipe.tokenizer.tokenize(prompt[0])) == len(prompt[0].split())  # one token per word

    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(p["lora_f32"])
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # keeps the fused weights, drops peft's wrappers
    fused = pipe.unet.state_dict()
    assert sorted(fused) == sorted(before)
    moved = [k for k in fused if not torch.equal(fused[k], before[k])]
    assert moved and all(k.split(".")[-2] in ("to_q", "to_k", "to_v", "0") for k in moved)
    with open(os.path.join(p["base"], "unet", "config.json")) as f:
        cfg = json.load(f)
    merged = unet2d_condition_params_to_diffusers(jax.device_get(runs.load_run(p["lora_run"]).params["unet"]), cfg)
    assert max(float(np.max(np.abs(np.asarray(merged[k]) - fused[k].numpy()))) for k in fused) < 1e-6

    out = pipe(prompt, num_inference_steps=2, guidance_scale=3.0, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()
