"""jaxdiff.eval: Frechet distance, the digits classifier, evaluate_digits and the CLI."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxdiff.eval.classifier as classifier_lib
from jaxdiff.data import real_images
from jaxdiff.eval import (evaluate_digits, frechet_distance, frechet_distance_from_stats,
                          train_digits_classifier)
from jaxdiff.eval.__main__ import main as cli_main

SIZE = 16


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds_data"))


@pytest.fixture(scope="module")
def classifier(data_dir):
    return train_digits_classifier(SIZE, seed=0, data_dir=data_dir)


# ---------------------------------------------------------------------------- Frechet distance
def _diag_closed_form(mu_a, var_a, mu_b, var_b):
    return np.sum((mu_a - mu_b) ** 2) + np.sum(var_a + var_b - 2 * np.sqrt(var_a * var_b))


def test_frechet_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu_a, mu_b = rng.normal(size=6), rng.normal(size=6)
    var_a, var_b = rng.uniform(0.2, 3, 6), rng.uniform(0.2, 3, 6)
    want = _diag_closed_form(mu_a, var_a, mu_b, var_b)
    got = frechet_distance_from_stats(mu_a, np.diag(var_a), mu_b, np.diag(var_b))
    np.testing.assert_allclose(got, want, rtol=1e-10)
    # From samples: converges to the population value.
    a = mu_a + np.sqrt(var_a) * rng.normal(size=(200_000, 6))
    b = mu_b + np.sqrt(var_b) * rng.normal(size=(200_000, 6))
    np.testing.assert_allclose(frechet_distance(a, b), want, rtol=2e-2)


def test_frechet_full_covariance_matches_symmetric_formula():
    # tr sqrt(S_a S_b) = tr sqrt(S_a^1/2 S_b S_a^1/2): an independent, symmetric (eigh-only) route.
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(500, 5)) @ rng.normal(size=(5, 5)), rng.normal(size=(400, 5)) + 0.5
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(w)) @ v.T
    tr_covmean = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ s_b @ root_a), 0, None)))
    d = a.mean(0) - b.mean(0)
    want = d @ d + np.trace(s_a) + np.trace(s_b) - 2 * tr_covmean
    np.testing.assert_allclose(frechet_distance(a, b), want, rtol=1e-8)


def test_frechet_of_identical_sets_is_zero():
    x = np.random.default_rng(2).normal(size=(300, 64))
    assert abs(frechet_distance(x, x)) < 1e-6
    with pytest.raises(ValueError):
        frechet_distance(x[:1], x)


# ---------------------------------------------------------------------------- classifier
def test_classifier_accuracy_on_held_out_test_split(classifier, data_dir):
    images, labels = real_images("digits", "test", SIZE, data_dir)
    accuracy = np.mean(classifier.predict(images) == labels)
    print(f"classifier {SIZE}px test accuracy {accuracy:.4f}, trained in {classifier.train_seconds:.1f} s")
    assert accuracy > 0.95 and accuracy == classifier.test_accuracy
    feats = classifier.features(images[:10])
    assert feats.dtype == np.float64 and feats.shape == (10, classifier_lib.FEATURE_DIM)


def test_classifier_is_cached_in_process_and_on_disk(classifier, data_dir, monkeypatch):
    assert train_digits_classifier(SIZE, seed=0, data_dir=data_dir) is classifier
    monkeypatch.setattr(classifier_lib, "_CLASSIFIERS", {})
    loaded = train_digits_classifier(SIZE, seed=0, data_dir=data_dir)
    assert loaded is not classifier and loaded.train_seconds is None  # from the disk cache
    images, _ = real_images("digits", "test", SIZE, data_dir)
    np.testing.assert_array_equal(loaded.features(images), classifier.features(images))


def test_corrupt_cache_file_is_retrained(data_dir, monkeypatch):
    monkeypatch.setattr(classifier_lib, "_EPOCHS", 1)  # a quick, throwaway classifier
    path = classifier_lib._cache_path(os.path.abspath(data_dir), 8, 7)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"not a msgpack file")
    clf = train_digits_classifier(8, seed=7, data_dir=data_dir)
    assert clf.train_seconds is not None
    assert classifier_lib._load_params(path, 8, 7) is not None  # rewritten, loadable
    # Training is deterministic: the same seed gives bit-identical params.
    again = classifier_lib._train_params(8, 7, os.path.abspath(data_dir))
    for x, y in zip(jax.tree_util.tree_leaves(clf.params), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------- evaluate_digits
def test_evaluate_real_images_vs_noise(classifier, data_dir):
    test_images, test_labels = real_images("digits", "test", SIZE, data_dir)
    train_images, train_labels = real_images("digits", "train", SIZE, data_dir)
    real = evaluate_digits(test_images, test_labels, data_dir=data_dir)
    assert real["accuracy"] > 0.95 and real["num_samples"] == 300
    assert real["classifier_test_accuracy"] == classifier.test_accuracy
    # Real images other than the floor's subsample land near the real-vs-real floor...
    other = train_images[-300:]
    held = evaluate_digits(other, train_labels[-300:], data_dir=data_dir)
    floor = held["frechet_real_vs_real"]
    assert 0.5 * floor < held["frechet"] < 2.0 * floor, held
    # ...while pure noise is far away and classified at chance.
    noise = np.random.default_rng(0).integers(0, 256, test_images.shape, dtype=np.uint8)
    bad = evaluate_digits(noise, test_labels, data_dir=data_dir)
    print(f"frechet real {held['frechet']:.2f}, floor {floor:.2f}, noise {bad['frechet']:.1f}")
    assert bad["accuracy"] < 0.3 and bad["frechet"] > 10 * floor
    assert evaluate_digits(test_images[:50], data_dir=data_dir)["accuracy"] is None


def test_evaluate_rejects_bad_images(classifier, data_dir):
    images, labels = real_images("digits", "test", SIZE, data_dir)
    for bad, match in [(images.astype(np.float32), "uint8"), (images[..., 0], r"\[N, H, W, 1\]"),
                       (np.repeat(images, 3, axis=-1), "grayscale")]:
        with pytest.raises(ValueError, match=match):
            evaluate_digits(bad, data_dir=data_dir)
    with pytest.raises(ValueError, match="labels"):
        evaluate_digits(images, labels[:10], data_dir=data_dir)


# ---------------------------------------------------------------------------- CLI
def test_cli_on_npz(classifier, data_dir, tmp_path, capsys):
    images, labels = real_images("digits", "test", SIZE, data_dir)
    np.savez(tmp_path / "samples.npz", images=images[:100], labels=labels[:100])
    out = tmp_path / "out.json"
    rc = cli_main(["--samples", str(tmp_path / "samples.npz"), "--data_dir", data_dir, "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "frechet_real_vs_real" in printed and "accuracy" in printed
    result = json.loads(out.read_text())
    assert result["num_samples"] == 100 and result["accuracy"] > 0.9

    np.savez(tmp_path / "nokey.npz", pictures=images[:4])
    assert cli_main(["--samples", str(tmp_path / "nokey.npz"), "--data_dir", data_dir]) == 2
    assert "no 'images'" in capsys.readouterr().err


def test_cli_missing_file_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jaxdiff.eval", "--samples", str(tmp_path / "nope.npz")],
                          capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr
