"""An independent judge of generated 8x8 digits: scikit-learn's SVM on sklearn's raw digits.

    >>> judge = digits_svm_judge()            # fits in ~0.2 s; judge.held_out_accuracy 0.983
    >>> judge.predict(samples)                # samples: uint8 [N, 8, 8, 1] -> int [N]
    >>> judge_digits(samples, labels)         # {'judge_accuracy', 'judge_per_class', 'diversity_ratio', ...}

The project's own figures (``jaxdiff.eval.classifier``) come from a CNN that this library trains
through its own data pipeline; a bug shared by the pipeline and the generator could flatter them.
This judge shares only the split's row indices with jaxdiff: it reads ``sklearn.datasets.load_digits``
directly (values 0..16, no jaxdiff pipeline), is fitted on the rows of the ``digits`` train split and
scored on the 300 held-out test rows (30 per class), with ``SVC(C=10, gamma=0.001)`` (RBF), the
classic recipe for this data.

Samples are mapped back to the sklearn scale as ``v = x * 16 / 255`` (the dataset stores
``round(v * 255 / 16)``).

``diversity``: the mean pairwise Euclidean distance (sklearn scale) between images of the same
class, averaged over classes. ``diversity_ratio`` divides the samples' figure by real training
digits', with the same number of images per class (a fixed subsample): 1.0 is as varied as the
real digits, below 1 the samples collapse towards fewer modes (what strong guidance does).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import numpy as np

_SVC_C, _SVC_GAMMA = 10.0, 0.001


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data.astype(np.float64), d.target.astype(np.int64)


def _held_out_rows(labels: np.ndarray) -> np.ndarray:
    """The sklearn rows of the ``digits`` test split (30 per class, seed 0)."""
    from jaxdiff.data.digits import split_indices

    return split_indices(labels)["test"]


@dataclasses.dataclass(frozen=True)
class DigitsJudge:
    svm: Any
    held_out_accuracy: float
    train_x: np.ndarray  # [M, 64] sklearn scale, the judge's training rows
    train_y: np.ndarray

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.svm.predict(to_sklearn_scale(images)).astype(np.int64)


def to_sklearn_scale(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, 8, 8, 1]`` (or ``[N, 8, 8]``) -> float64 ``[N, 64]`` on sklearn's 0..16 scale."""
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim not in (3, 4) or x.shape[1:3] != (8, 8) or (x.ndim == 4 and x.shape[3] != 1):
        raise ValueError(f"the digits judge reads uint8 images [N, 8, 8, 1] (the digits' native size), "
                         f"got {x.dtype} {x.shape}.")
    return x.reshape(len(x), 64).astype(np.float64) * (16.0 / 255.0)


@functools.lru_cache(maxsize=1)
def digits_svm_judge() -> DigitsJudge:
    """The SVM fitted on sklearn's digits minus the held-out rows; memoised (deterministic fit)."""
    from sklearn.svm import SVC

    x, y = _sklearn_digits()
    test = np.zeros(len(y), bool)
    test[_held_out_rows(y)] = True
    svm = SVC(C=_SVC_C, gamma=_SVC_GAMMA).fit(x[~test], y[~test])
    acc = float(np.mean(svm.predict(x[test]) == y[test]))
    return DigitsJudge(svm=svm, held_out_accuracy=acc, train_x=x[~test], train_y=y[~test])


def within_class_diversity(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes of the mean pairwise Euclidean distance between rows of ``x`` of that class."""
    per_class = []
    for c in np.unique(labels):
        xc = x[labels == c]
        if len(xc) < 2:
            continue
        # Differences, not the Gram-matrix shortcut: identical images must score exactly 0.
        dists = [np.sqrt(np.sum((xc[i + 1:] - xc[i]) ** 2, axis=1)) for i in range(len(xc) - 1)]
        per_class.append(np.mean(np.concatenate(dists)))
    if not per_class:
        raise ValueError("within-class diversity needs at least two images of some class.")
    return float(np.mean(per_class))


def judge_digits(images: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """The judge's figures for class-conditional samples ``images: uint8 [N, 8, 8, 1]``, ``labels: int [N]``.

    Returns ``judge_accuracy`` (fraction the SVM reads as the requested label), ``judge_per_class``
    (that fraction per class, a list of 10, None where a class has no sample),
    ``judge_held_out_accuracy`` (the SVM on real held-out digits), ``diversity`` (samples),
    ``diversity_real`` (real training digits, the same count per class, fixed subsample) and
    ``diversity_ratio``.
    """
    x = to_sklearn_scale(images)
    labels = np.asarray(labels)
    if labels.shape != (len(x),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an int array of shape ({len(x)},), got {labels.dtype} {labels.shape}.")
    judge = digits_svm_judge()
    pred = judge.svm.predict(x)
    per_class: list[Optional[float]] = [
        float(np.mean(pred[labels == c] == c)) if np.any(labels == c) else None for c in range(10)]
    rng = np.random.default_rng(seed)
    real_x, real_y = [], []
    for c in np.unique(labels):
        rows = np.flatnonzero(judge.train_y == c)
        take = rng.permutation(rows)[: int(np.sum(labels == c))]
        real_x.append(judge.train_x[take])
        real_y.append(judge.train_y[take])
    div = within_class_diversity(x, labels)
    div_real = within_class_diversity(np.concatenate(real_x), np.concatenate(real_y))
    return {
        "judge_accuracy": float(np.mean(pred == labels)),
        "judge_per_class": per_class,
        "judge_held_out_accuracy": judge.held_out_accuracy,
        "diversity": div,
        "diversity_real": div_real,
        "diversity_ratio": div / div_real,
    }
