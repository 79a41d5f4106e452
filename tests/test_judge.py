"""The independent digits judge (scikit-learn SVM on sklearn's raw digits) and the guidance-sweep plot.
References: scipy's pdist for the diversity figure, sklearn's own data for the judge."""
import types
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from scipy.spatial.distance import pdist
from sklearn.datasets import load_digits

from experiments.configs import t2i_shapes
from jaxdiff import config as config_lib
from jaxdiff.eval import judge as J
from jaxdiff.eval.digits_sweep import guidance_sweep, svg_plot


def _real_uint8(rows):
    d = load_digits()
    return np.round(d.images[rows] * (255.0 / 16.0)).astype(np.uint8)[..., None], d.target[rows]


def test_judge_reads_real_held_out_digits():
    j = J.digits_svm_judge()
    assert j.held_out_accuracy >= 0.97
    test_rows = J._held_out_rows(load_digits().target)
    assert len(test_rows) == 300 and len(j.train_y) == 1797 - 300
    images, labels = _real_uint8(test_rows)
    # Through the uint8 round trip the held-out digits read as they do on sklearn's own scale
    assert abs(np.mean(j.predict(images) == labels) - j.held_out_accuracy) <= 0.01
    r = J.judge_digits(images, labels)
    assert r["judge_accuracy"] == pytest.approx(np.mean(j.predict(images) == labels))
    assert 0.85 < r["diversity_ratio"] < 1.15  # real held-out digits are as varied as real training digits
    assert all(0.8 <= a <= 1.0 for a in r["judge_per_class"])


def test_diversity_matches_pdist_and_collapse_scores_zero():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 16, (40, 64))
    labels = np.repeat(np.arange(4), 10)
    want = np.mean([np.mean(pdist(x[labels == c])) for c in range(4)])
    assert J.within_class_diversity(x, labels) == pytest.approx(want, rel=1e-9)
    images, real_labels = _real_uint8(np.arange(100))
    collapsed = np.stack([images[np.flatnonzero(real_labels == c)[0]] for c in real_labels])
    r = J.judge_digits(collapsed, real_labels)
    assert r["diversity"] == 0.0 and r["diversity_ratio"] == 0.0 and r["diversity_real"] > 10


def test_judge_rejects_wrong_images_and_labels():
    with pytest.raises(ValueError, match=r"uint8 images \[N, 8, 8, 1\]"):
        J.to_sklearn_scale(np.zeros((2, 16, 16, 1), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        J.to_sklearn_scale(np.zeros((2, 8, 8, 1), np.float32))
    with pytest.raises(ValueError, match="labels"):
        J.judge_digits(np.zeros((3, 8, 8, 1), np.uint8), np.zeros(2, int))


def test_sweep_needs_a_conditional_digits_run():
    run = types.SimpleNamespace(config=config_lib.parse(t2i_shapes.get_config()))  # conditional, but shapes
    with pytest.raises(ValueError, match="class-conditional model trained on the embedded digits"):
        guidance_sweep(run, [1.0])


def test_svg_plot_is_valid_svg_with_one_line_per_series():
    rows = [{"guidance": g, "accuracy": a, "judge_accuracy": a, "diversity_ratio": d, "frechet_ratio": f}
            for g, a, d, f in [(1, 0.9, 0.97, 1.1), (2, 0.99, 0.83, 2.2), (3, 1.0, 0.76, 3.8)]]
    root = ET.fromstring(svg_plot(rows, title="t"))
    lines = root.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 4
    for line in lines:
        pts = [tuple(map(float, p.split(","))) for p in line.get("points").split()]
        assert [p[0] for p in pts] == sorted(p[0] for p in pts) and len(pts) == 3
        assert all(0 <= y <= 320 for _, y in pts)
