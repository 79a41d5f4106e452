"""FID, Inception Score, precision/recall (jaxdiff.nn.inception, jaxdiff.interop.inception, jaxdiff.eval.fid).

References: pytorch-fid 0.3.0's FID Inception and calculate_frechet_distance, vendored with
torchvision 0.28.0's Inception layers in tests/reference/ (torchvision cannot be installed beside
torch 2.13.0 here), built with seeded random weights; float64 NumPy transcriptions of the Inception
Score (Salimans et al. 2016) and of improved precision/recall (Kynkaanniemi et al. 2019).
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxdiff.eval import fid as fid_lib
from jaxdiff.eval.__main__ import main as eval_main
from jaxdiff.interop import inception as interop
from reference.pytorch_fid_inception import InceptionV3 as TorchInceptionV3
from reference.pytorch_fid_inception import calculate_frechet_distance, fid_inception_v3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _random_fid_inception():
    """pytorch-fid's fid_inception_v3() with seeded random weights: torch's default conv/fc init,
    BatchNorm running statistics measured on random inputs (so activations stay O(1) through the
    94 layers and the comparison is not dominated by vanishing/exploding values), then random
    gamma / beta."""
    torch.manual_seed(0)
    net = fid_inception_v3()
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # the running statistics become the plain average over the calibration batch
    g = torch.Generator().manual_seed(1)
    net.train()
    with torch.no_grad():
        net(torch.rand(2, 3, 299, 299, generator=g) * 2 - 1)
        for m in bns:
            m.weight.uniform_(0.5, 1.5, generator=g)
            m.bias.normal_(0.0, 0.2, generator=g)
    return net.eval()


@pytest.fixture(scope="module")
def torch_net():
    return _random_fid_inception()


@pytest.fixture(scope="module")
def state_dict(torch_net):
    return {k: v.clone() for k, v in torch_net.state_dict().items()}


@pytest.fixture(scope="module")
def pool3_ref(state_dict):
    """pytorch-fid's InceptionV3(block 3, resize_input, normalize_input) on the same weights."""
    return TorchInceptionV3([3], state_dict=state_dict).eval()


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory, state_dict):
    path = str(tmp_path_factory.mktemp("inception") / "inception_fid.safetensors")
    interop.save_state_dict(state_dict, path)
    return path


_SUBPROCESS = """
import sys, numpy as np, jax
from jaxdiff.eval import fid
from jaxdiff.interop.inception import load_inception
assert jax.device_count() == 8, jax.devices()
images = np.load(sys.argv[2])["images"]
s = fid.FIDEvaluator(load_inception(sys.argv[1]), batch_size=16).stats(images)
np.savez(sys.argv[3], mu=s.mu, sigma=s.sigma, n=s.n)
"""


@pytest.fixture(scope="module")
def eight_device_run(weights_file, tmp_path_factory):
    """Statistics of 9 images on 8 simulated CPU devices, computed in a subprocess that starts with
    the module (its compile overlaps the other tests); test_stats_on_8_devices_equal_1_device waits."""
    d = tmp_path_factory.mktemp("eight")
    images = np.random.default_rng(3).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    np.savez(d / "images.npz", images=images)
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
               PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", _SUBPROCESS, weights_file, str(d / "images.npz"),
                             str(d / "stats8.npz")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc, d / "images.npz", d / "stats8.npz"
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def params(weights_file, eight_device_run):
    return interop.load_inception(weights_file)


def _torch_features(pool3_ref, torch_net, images: np.ndarray):
    """pytorch-fid's path for uint8 images: ToTensor (/255), the network's resize and [-1, 1];
    logits = torchvision Inception3.forward (fc) on the same resized, normalised input."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)  # pytorch-fid's loader: Image.convert('RGB')
    with torch.no_grad():
        pool3 = pool3_ref(x)[0].flatten(1).double().numpy()
        x299 = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
        logits = torch_net(x299).double().numpy()
    bias = torch_net.fc.bias.detach().double().numpy()
    return pool3, logits, bias


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.mark.slow  # the 299x299 Inception network (and subprocesses)
@pytest.mark.parametrize("shape", [(2, 32, 32, 3), (2, 40, 56, 3), (2, 299, 299, 3), (2, 28, 28, 1)])
def test_features_match_pytorch_fid(shape, params, pool3_ref, torch_net):
    images = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    ev = fid_lib.FIDEvaluator(params, batch_size=shape[0])
    out = ev.features(images)
    pool3, logits, bias = _torch_features(pool3_ref, torch_net, images)
    assert out["pool3"].shape == (shape[0], 2048) and out["logits"].shape == (shape[0], 1008)
    assert pool3.std() > 1.0  # the random network is not degenerate
    assert _rel(out["pool3"], pool3) < 1e-4
    # the evaluator's logits are the fc without bias (the Inception Score's); torch's fc has it
    assert _rel(out["logits"] + bias, logits) < 1e-4


def test_frechet_distance_matches_pytorch_fid():
    rng = np.random.default_rng(0)
    for n, d in [(200, 16), (10, 32)]:  # well-conditioned; rank-deficient covariances (N < D)
        a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
        b = rng.normal(0.3, 1.2, size=(n, d))
        mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
        expected = calculate_frechet_distance(mu1, s1, mu2, s2)
        got = fid_lib.frechet_distance(mu1, s1, mu2, s2)
        assert abs(got - expected) <= 1e-6 * abs(expected), (n, d, got, expected)
    assert abs(fid_lib.frechet_distance(mu1, s1, mu1, s1)) < 1e-6 * np.trace(s1)
    with pytest.raises(ValueError, match="do not match"):
        fid_lib.frechet_distance(mu1, s1, mu2[:4], s2[:4, :4])


def _is_transcription(logits, splits):
    """Salimans et al. 2016: IS = exp(E_x KL(p(y|x) || p(y))), p(y) the marginal over the split;
    per split as openai/improved-gan (contiguous splits), mean and std over splits."""
    scores = []
    n = len(logits)
    for i in range(splits):
        part = logits[i * n // splits:(i + 1) * n // splits]
        p_yx = np.array([np.exp(row - row.max()) / np.exp(row - row.max()).sum() for row in part])
        p_y = p_yx.mean(axis=0)
        kl = [sum(p * np.log(p / q) for p, q in zip(row, p_y) if p > 0) for row in p_yx]
        scores.append(np.exp(np.mean(kl)))
    return np.mean(scores), np.std(scores)


def test_inception_score():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(53, 12))
    for splits in (1, 5, 10):
        mean, std = fid_lib.inception_score(logits, splits=splits)
        exp_mean, exp_std = _is_transcription(logits, splits)
        assert abs(mean - exp_mean) < 1e-12 * exp_mean and abs(std - exp_std) < 1e-9
    # the limits: one confident class per image over 10 classes -> 10; identical predictions -> 1
    confident = np.eye(10)[np.arange(100) % 10] * 60.0
    assert abs(fid_lib.inception_score(confident, splits=1)[0] - 10.0) < 1e-6
    assert abs(fid_lib.inception_score(np.tile(logits[:1], (40, 1)), splits=4)[0] - 1.0) < 1e-12
    # saturated softmax (probabilities that underflow to 0: 0 log 0 = 0)
    huge = rng.normal(0, 400, size=(20, 12))
    assert fid_lib.inception_score(huge, splits=2)[0] == pytest.approx(_is_transcription(huge, 2)[0], rel=1e-12)
    with pytest.raises(ValueError, match="splits"):
        fid_lib.inception_score(logits[:3], splits=10)


def _pr_transcription(real, fake, k):
    """Kynkaanniemi et al. 2019: f_k(phi, Phi) = 1 if ||phi - phi'|| <= ||phi' - NN_k(phi', Phi)|| for
    some phi' in Phi; precision = mean over fake of f(phi_g, Phi_r), recall = mean over real of
    f(phi_r, Phi_g). Brute force over every pair."""
    def radii(points):
        out = []
        for i, p in enumerate(points):
            d = sorted(np.linalg.norm(p - q) for j, q in enumerate(points) if j != i)
            out.append(d[k - 1])
        return out

    def f(phi, points, r):
        return any(np.linalg.norm(phi - q) <= rq for q, rq in zip(points, r))

    rr, rf = radii(real), radii(fake)
    return np.mean([f(x, real, rr) for x in fake]), np.mean([f(x, fake, rf) for x in real])


def test_precision_recall():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(40, 6))
    fake = np.concatenate([rng.normal(size=(20, 6)) * 0.5, rng.normal(size=(15, 6)) + 3.0])
    for k in (1, 3, 5):
        expected = _pr_transcription(real, fake, k)
        assert fid_lib.precision_recall(real, fake, k=k, block=7) == pytest.approx(expected, abs=1e-12)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # neither all nor nothing covered
    with pytest.raises(ValueError, match="k="):
        fid_lib.precision_recall(real[:3], fake, k=3)


@pytest.mark.slow  # the 299x299 Inception network (and subprocesses)
def test_stats_match_float64_reference(params, pool3_ref, torch_net):
    """Evaluator statistics over 3 batches (the last padded) vs np.mean / np.cov (float64) of
    pytorch-fid's features of the same images."""
    images = np.random.default_rng(7).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    stats = fid_lib.FIDEvaluator(params, batch_size=2).stats(images)  # 3 batches, the last padded
    pool3, _, _ = _torch_features(pool3_ref, torch_net, images)
    assert stats.n == 5
    assert _rel(stats.mu, pool3.mean(0)) < 1e-5
    assert _rel(stats.sigma, np.cov(pool3, rowvar=False)) < 1e-4


@pytest.mark.slow  # the 299x299 Inception network (and subprocesses)
def test_stats_on_8_devices_equal_1_device(params, eight_device_run):
    """The same statistics from 1 device and from 8 (simulated CPU devices, another process started
    at the beginning of the module, :func:`eight_device_run`): on 8 devices one batch of 16 (2 rows a
    device, 7 rows of padding dropped), on 1 device 5 batches of 2 (the last padded); both run the
    network on 2 images a device, so what is compared is the sharding, padding and float64 accumulation."""
    proc, images_path, stats_path = eight_device_run
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    images = np.load(images_path)["images"]
    one = fid_lib.FIDEvaluator(params, batch_size=2).stats(images)
    with np.load(stats_path) as eight:
        assert int(eight["n"]) == one.n == 9
        assert _rel(eight["mu"], one.mu) < 1e-6
        assert _rel(eight["sigma"], one.sigma) < 1e-6


_TWO_PROCESSES = """
import sys, numpy as np
from jaxdiff import parallel
parallel.initialize_distributed()
import jax, jax.numpy as jnp
from jaxdiff.eval import fid
assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(), jax.device_count())
images = np.random.default_rng(0).integers(0, 256, (11, 32, 64, 1), dtype=np.uint8)
ev = fid.FIDEvaluator({}, batch_size=4)
# a stand-in network (the Inception's cost is not the point here): 2048 pixels / 4 + 0.5, exact in float32
ev._fn = jax.jit(lambda p, x: {"pool3": x.reshape(x.shape[0], -1).astype(jnp.float32) / 4.0 + 0.5,
                               "logits": x.reshape(x.shape[0], -1)[:, :10].astype(jnp.float32)})
seen = []
def read(idx):
    seen.append(np.array(idx))
    return images[idx]
sums, out = ev._run(read, len(images), gather=("logits",))
s = sums.stats()
me = jax.process_index()
x = np.array([1.0 + 1e-12 * (me + 1), -3e-300])  # float32 would round both
np.savez(f"{sys.argv[1]}/p{me}.npz", mu=s.mu, sigma=s.sigma, n=s.n, logits=out["logits"],
         seen=np.concatenate(seen), gathered=fid.allgather_float64(x))
parallel.finished()
"""


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # the 299x299 Inception network (and subprocesses)
def test_stats_over_two_processes(tmp_path):
    """2 real processes x 2 CPU devices (JAX's distributed runtime, gloo): each process reads only its
    rows of every batch, the float64 sums cross processes bit-exactly, and both get the statistics of
    all 11 images (3 batches of 4, the last padded) equal to np.mean / np.cov in float64."""
    port = _free_port()
    procs = []
    for i in range(2):
        xla = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
        env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                   XLA_FLAGS=f"{xla} --xla_force_host_platform_device_count=2".strip())
        procs.append(subprocess.Popen([sys.executable, "-c", _TWO_PROCESSES, str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    images = np.random.default_rng(0).integers(0, 256, (11, 32, 64, 1), dtype=np.uint8)
    feats = images.reshape(11, -1).astype(np.float64) / 4.0 + 0.5
    p0, p1 = np.load(tmp_path / "p0.npz"), np.load(tmp_path / "p1.npz")
    for p in (p0, p1):
        assert int(p["n"]) == 11
        np.testing.assert_allclose(p["mu"], feats.mean(0), rtol=1e-12)
        np.testing.assert_allclose(p["sigma"], np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-9)
        np.testing.assert_array_equal(p["logits"], images.reshape(11, -1)[:, :10].astype(np.float32))
        np.testing.assert_array_equal(p["gathered"], [[1.0 + 1e-12, -3e-300], [1.0 + 2e-12, -3e-300]])
    np.testing.assert_array_equal(p0["mu"], p1["mu"])  # the same float64 result on every process
    np.testing.assert_array_equal(p0["sigma"], p1["sigma"])
    # each process read 2 of each batch's 4 rows, together every image (10 = the last one, padding)
    assert len(p0["seen"]) == len(p1["seen"]) == 6
    assert sorted(np.concatenate([p0["seen"], p1["seen"]])) == sorted([*range(11), 10])


def test_moment_sums_and_float64_transport():
    rng = np.random.default_rng(0)
    feats = rng.normal(5.0, 2.0, size=(30, 7))
    sums = fid_lib.MomentSums(7)
    for part in np.array_split(feats, 4):
        sums.add(part)
    s = sums.stats()
    np.testing.assert_allclose(s.mu, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.sigma, np.cov(feats, rowvar=False), rtol=1e-10, atol=1e-12)
    x = rng.normal(size=(3, 5)) * 1e-30 + 1.0  # values float32 cannot hold
    np.testing.assert_array_equal(fid_lib.allgather_float64(x)[0], x)
    with pytest.raises(ValueError, match="at least 2"):
        fid_lib.MomentSums(3).stats()


@pytest.mark.slow  # the 299x299 Inception network (and subprocesses)
def test_converter_round_trip(tmp_path, state_dict, params):
    # the published .pth -> safetensors -> params, equal to converting the state dict in memory
    pth = tmp_path / "pt_inception.pth"
    torch.save(state_dict, pth)
    out = tmp_path / "inception.safetensors"
    assert interop.main(["--convert", str(pth), "--out", str(out)]) == 0
    direct = interop.params_from_state_dict(state_dict)
    loaded = interop.load_inception(str(out))
    flat_a, flat_b = interop.flatten_params(direct), interop.flatten_params(loaded)
    assert flat_a.keys() == flat_b.keys() and len(flat_a) == 94 * 5 + 2
    for key in flat_a:
        np.testing.assert_array_equal(flat_a[key], flat_b[key])
    np.testing.assert_array_equal(loaded["Mixed_7c"]["branch_pool"]["kernel"][0, 0],
                                  state_dict["Mixed_7c.branch_pool.conv.weight"].numpy()[:, :, 0, 0].T)
    np.testing.assert_array_equal(loaded["fc"]["kernel"], state_dict["fc.weight"].numpy().T)


def test_converter_errors(tmp_path, state_dict, capsys):
    with pytest.raises(FileNotFoundError, match="jaxdiff.interop.inception --convert"):
        interop.load_inception(str(tmp_path / "nope.safetensors"))
    pth = tmp_path / "weights.pth"
    torch.save(state_dict, pth)
    with pytest.raises(ValueError, match="not a safetensors file .a PyTorch .pth pickle"):
        interop.load_inception(str(pth))
    partial = {k: v for k, v in state_dict.items() if not k.startswith("Mixed_7c.branch_pool")}
    with pytest.raises(ValueError, match="missing .e.g. Mixed_7c.branch_pool"):
        interop.params_from_state_dict(partial)
    wrong = dict(state_dict, **{"fc.weight": torch.zeros(1000, 2048), "AuxLogits.fc.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"1 unexpected .e.g. AuxLogits.fc.weight.*wrong shape .e.g. fc.weight"):
        interop.params_from_state_dict(wrong)
    # a failed conversion leaves no file behind; a pickle of arbitrary objects is refused
    torch.save({"x": _NotATensor()}, tmp_path / "evil.pth")
    out = tmp_path / "o.safetensors"
    assert interop.main(["--convert", str(tmp_path / "evil.pth"), "--out", str(out)]) == 2
    assert interop.main(["--convert", str(tmp_path / "missing.pth"), "--out", str(out)]) == 2
    torch.save(partial, tmp_path / "partial.pth")
    assert interop.main(["--convert", str(tmp_path / "partial.pth"), "--out", str(out)]) == 2
    assert not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err), err
    assert "weights_only" in err[0] and "does not exist" in err[1] and "missing" in err[2]


class _NotATensor:
    """A pickled object that torch.load(weights_only=True) must refuse to build."""


def _cli(argv, capsys):
    code = eval_main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow  # the 299x299 Inception network (and subprocesses)
def test_cli_errors(tmp_path, weights_file, capsys):
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", images=images)
    np.savez(tmp_path / "float.npz", images=images.astype(np.float32))
    (tmp_path / "junk.npz").write_text("not a zip")
    cases = [
        (["--fid", "--samples", str(tmp_path / "s.npz"), "--ref", "x.npz"], "--inception"),
        (["--fid", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "missing.npz"),
          "--inception", weights_file], "does not exist"),
        (["--fid", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "junk.npz"),
          "--inception", weights_file], "cannot read reference"),
        (["--fid", "--samples", str(tmp_path / "s.npz"), "--ref", "cifar10",
          "--inception", weights_file], "NAME:SPLIT"),
        (["--fid", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"),
          "--inception", str(tmp_path / "nope.safetensors")], "python -m jaxdiff.interop.inception --convert"),
        (["--fid", "--samples", str(tmp_path / "float.npz"), "--ref", str(tmp_path / "s.npz"),
          "--inception", weights_file], "must be uint8"),
        (["--fid", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"),
          "--inception", weights_file, "--batch_size", "0"], "--batch_size"),
    ]
    for argv, needle in cases:
        code, out, err = _cli(argv, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (argv, err)
        assert "Traceback" not in err and "FID" not in out
    code, _, err = _cli(["--fid", "--samples", str(tmp_path / "s.npz"), "--ref", "x.npz"], capsys)
    assert "--convert pt_inception-2015-12-05-6726825d.pth" in err


@pytest.mark.slow  # the 299x299 Inception network (and subprocesses)
def test_cli_happy_path(tmp_path, weights_file, pool3_ref, torch_net, capsys):
    rng = np.random.default_rng(5)
    samples = rng.integers(0, 256, (5, 24, 24, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", images=samples)
    pool3_s, logits_s, bias = _torch_features(pool3_ref, torch_net, samples)
    # Reference statistics with sigma = 0, so the expected FID needs no matrix square root:
    # |mu - mu_ref|^2 + tr(sigma) (sqrtm(sigma 0) = 0). (scipy's sqrtm of a 2048 x 2048 matrix takes
    # 15-45 s on this CPU; the sqrtm term is checked against pytorch-fid's at small D above.)
    mu_ref = pool3_s.mean(0) + rng.normal(0, 3.0, 2048)
    np.savez(tmp_path / "ref_stats.npz", mu=mu_ref, sigma=np.zeros((2048, 2048)))
    code, out, err = _cli(["--fid", "--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref_stats.npz"),
                           "--inception", weights_file, "--batch_size", "2", "--is",
                           "--json", str(tmp_path / "out.json")], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("FID with pytorch-fid's Inception") and "Inception Score" in out
    assert lines[-1].startswith("FID ") and len(lines[-1].split()) == 2
    expected = np.sum((pool3_s.mean(0) - mu_ref) ** 2) + np.trace(np.cov(pool3_s, rowvar=False))
    assert float(lines[-1].split()[1]) == pytest.approx(expected, rel=1e-4)
    with open(tmp_path / "out.json") as f:
        result = json.load(f)
    assert result["num_images"] == 5 and result["fid"] == pytest.approx(expected, rel=1e-4)
    # the IS of the fc logits without bias (openai/improved-gan's), 5 splits of 1 image
    assert result["is"] == pytest.approx(_is_transcription(logits_s - bias, 5)[0], rel=1e-4)
    # --pr needs reference images, not statistics: one line, before any image is evaluated
    code, out, err = _cli(["--fid", "--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref_stats.npz"),
                           "--inception", weights_file, "--pr"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "precision/recall needs real images" in err


@pytest.mark.slow  # the 299x299 Inception network (and subprocesses)
def test_precision_recall_of_features(params, pool3_ref, torch_net):
    """Precision/recall of the evaluator's pool3 features vs the transcription on pytorch-fid's."""
    rng = np.random.default_rng(11)
    real = rng.integers(0, 256, (6, 24, 24, 3), dtype=np.uint8)
    fake = np.concatenate([real[:2], rng.integers(0, 256, (4, 24, 24, 3), dtype=np.uint8)])
    ev = fid_lib.FIDEvaluator(params, batch_size=2)
    got = fid_lib.precision_recall(ev.features(real)["pool3"], ev.features(fake)["pool3"], k=2)
    t_real, _, _ = _torch_features(pool3_ref, torch_net, real)
    t_fake, _, _ = _torch_features(pool3_ref, torch_net, fake)
    assert got == pytest.approx(_pr_transcription(t_real, t_fake, 2), abs=1e-12)


@pytest.mark.slow  # the 299x299 Inception network (and subprocesses)
def test_reference_stats_sources(tmp_path, params, data_dir):
    ev = fid_lib.FIDEvaluator(params, batch_size=2)
    with pytest.raises(ValueError, match="no reference statistics"):
        ev.fid(np.zeros((2, 8, 8, 3), np.uint8))
    stats = fid_lib.Stats(np.arange(2048.0), np.eye(2048) * 2.0, 7)
    fid_lib.save_stats_npz(str(tmp_path / "stats.npz"), stats)
    got = fid_lib.reference_stats(str(tmp_path / "stats.npz"), ev)
    np.testing.assert_array_equal(got.mu, stats.mu)
    np.testing.assert_array_equal(got.sigma, stats.sigma)
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(ValueError, match="not pool3 statistics"):
        fid_lib.reference_stats(str(tmp_path / "bad.npz"), ev)
    with pytest.raises(ValueError, match="neither 'mu'"):
        np.savez(tmp_path / "other.npz", x=np.zeros(3))
        fid_lib.reference_stats(str(tmp_path / "other.npz"), ev)
    # a TFDS split (six of the embedded digits, 8x8 greyscale): computed once, then read from the cache
    cache = tmp_path / "cache"
    first = fid_lib.reference_stats("digits:test[:6]", ev, data_dir=data_dir, cache_dir=str(cache))
    files = os.listdir(cache)
    assert len(files) == 1 and files[0].startswith("digits_test") and files[0].endswith(".npz")
    again = fid_lib.reference_stats("digits:test[:6]", ev, data_dir=data_dir, cache_dir=str(cache))
    np.testing.assert_array_equal(first.mu, again.mu)
    assert first.n == again.n == 6
    from jaxdiff.data import ImageDataset

    digits = ImageDataset("digits", "test", batch_size=1, data_dir=data_dir).examples(np.arange(6))[0]
    direct = ev.stats(digits)  # the same six 8x8 greyscale images given as an array
    np.testing.assert_allclose(first.mu, direct.mu, rtol=1e-6)
    with pytest.raises(FileNotFoundError, match="not prepared"):
        fid_lib.reference_stats("cifar10:train", ev, data_dir=data_dir, cache_dir=str(cache))
