"""Bits/dim of a run on a dataset split (``jaxdiff.eval.bpd``, ``python -m jaxdiff.eval --bpd``):
the mean over every example of the bound that ``jaxdiff.diffusion.calc_bpd`` computes (itself
checked against float64 NumPy in test_diffusion), batched, padded and keyed as documented."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from _testutil import override
from experiments.configs import ddpm_digits
from jaxdiff import runs
from jaxdiff.data import ImageDataset
from jaxdiff.diffusion import calc_bpd
from jaxdiff.eval.bpd import dataset_bpd
from jaxdiff.train.loop import train

pytestmark = [pytest.mark.usefixtures("xla_o0"), pytest.mark.slow]  # slow: a training run, a subprocess
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"train.eval_every": 0, "data.image_size": 8, "model.ch": 16, "model.ch_mult": (1, 2), "model.attn_resolutions": (),
        "model.num_groups": 8, "diffusion.num_timesteps": 20, "train.num_steps": 2, "train.batch_size": 8,
        "train.warmup_steps": 1, "train.checkpoint_every": 2, "train.num_samples": 0}


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory):
    wd = tmp_path_factory.mktemp("bpd") / "run"
    train(override(ddpm_digits.get_config(), TINY), str(wd))
    return wd


def test_dataset_bpd_is_the_mean_of_the_bound_over_the_split(run_dir, data_dir):
    run = runs.load_run(str(run_dir))
    key = jax.random.key(3)
    got = dataset_bpd(run, split="test", batch_size=128, key=key, progress=False)
    # Reference: calc_bpd on the same batches (128, 128, 44 of the 300 test digits), same keys.
    ds = ImageDataset("digits", "test", batch_size=1, image_size=8)
    images, labels = ds.examples(np.arange(ds.num_examples))
    total, prior, decoder = [], [], []
    for i, lo in enumerate(range(0, 300, 128)):
        x0 = images[lo:lo + 128].astype(np.float32) / 127.5 - 1.0
        y = labels[lo:lo + 128]
        out = calc_bpd(lambda x, t: run.model.apply(run.params, x, t, y), run.schedule, x0, jax.random.fold_in(key, i))
        if len(x0) < 128:  # the padded batch draws noise for 128 rows; rows are prefix-stable
            pad = np.concatenate([x0, np.repeat(x0[-1:], 128 - len(x0), 0)])
            ypad = np.concatenate([y, np.repeat(y[-1:], 128 - len(y))])
            out = calc_bpd(lambda x, t: run.model.apply(run.params, x, t, ypad), run.schedule, pad,
                           jax.random.fold_in(key, i))
            out = {k: v[:len(x0)] for k, v in out.items()}
        total.append(np.asarray(out["total_bpd"], np.float64))
        prior.append(np.asarray(out["prior_bpd"], np.float64))
        decoder.append(np.asarray(out["terms_bpd"][:, 0], np.float64))
    assert got["num_examples"] == 300 and got["split"] == "test"
    np.testing.assert_allclose(got["bpd"], np.concatenate(total).mean(), rtol=1e-5)
    np.testing.assert_allclose(got["prior_bpd"], np.concatenate(prior).mean(), rtol=1e-5)
    np.testing.assert_allclose(got["decoder_bpd"], np.concatenate(decoder).mean(), rtol=1e-5)
    assert np.isfinite(got["bpd"]) and got["bpd"] > got["prior_bpd"] >= 0


def test_bpd_cli(run_dir, data_dir):
    env = {**os.environ, "JAXDIFF_DATA_DIR": data_dir, "JAX_DISABLE_MOST_OPTIMIZATIONS": "true"}
    out = subprocess.run([sys.executable, "-m", "jaxdiff.eval", "--bpd", "--workdir", str(run_dir), "--batch_size", "150"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("bpd ") and np.isfinite(float(last.split()[1]))
    bad = subprocess.run([sys.executable, "-m", "jaxdiff.eval", "--bpd"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=env)
    assert bad.returncode == 2 and "--bpd needs --workdir" in bad.stderr and "Traceback" not in bad.stderr
