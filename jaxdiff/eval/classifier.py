"""A small CNN classifier for the embedded ``digits`` and the sample-quality figures built on it.

    >>> clf = train_digits_classifier(16)             # ~10 s on 2 CPU cores once; cached on disk
    >>> clf.predict(images)                           # images: uint8 [N, 16, 16, 1] -> int [N]
    >>> evaluate_digits(samples, labels)              # {'accuracy', 'frechet', 'frechet_real_vs_real', ...}

The classifier is trained on the real ``train`` split at the samples' resolution, deterministically
(fixed seed, fixed batch order, one jitted step). Its penultimate layer
(``FEATURE_DIM`` features) plays the role Inception's pool3 plays in FID: ``frechet`` compares the
samples with the held-out ``test`` split, and ``frechet_real_vs_real`` compares an equally large
subsample of real ``train`` images with ``test``, the floor a perfect generator would reach at
that sample count (the Frechet distance is biased upward for small N).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
import time
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from jaxdiff import xla
from jaxdiff.data import default_data_dir, real_images
from jaxdiff.eval.frechet import frechet_distance

# Bump when the architecture, training recipe or dataset changes: old cache files are then ignored.
CLASSIFIER_VERSION = 1
FEATURE_DIM = 64
NUM_CLASSES = 10
_EPOCHS, _BATCH, _LR, _WARMUP = 15, 64, 3e-3, 50
_EVAL_CHUNK = 256


class DigitsCNN(nn.Module):
    """``x: [B, S, S, 1] float32`` in [-1, 1] -> ``(logits [B, 10], features [B, FEATURE_DIM])``.

    A patchify stem (kernel = stride = S // 8) maps every resolution to an 8x8 grid while still
    seeing each input pixel (16 and 32 px inputs are not pre-shrunk), so the cost barely depends
    on S; then conv 3x3, average-pool to 4x4, conv 3x3, dense.
    """

    feature_dim: int = FEATURE_DIM
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        p = max(1, x.shape[1] // 8)
        if p == 1:
            x = nn.swish(nn.Conv(32, (3, 3))(x))
        else:
            x = nn.swish(nn.Conv(32, (p, p), strides=p, padding="VALID")(x))
        x = nn.swish(nn.Conv(32, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = nn.swish(nn.Conv(64, (3, 3))(x))
        features = nn.swish(nn.Dense(self.feature_dim)(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes)(features), features


@xla.jit
def _apply(params: Any, images_uint8: jax.Array) -> tuple[jax.Array, jax.Array]:
    return DigitsCNN().apply({"params": params}, images_uint8.astype(jnp.float32) / 127.5 - 1.0)


def _check_images(images: np.ndarray, image_size: Optional[int] = None) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise ValueError(f"images must be a uint8 NumPy array [N, H, W, 1], got "
                         f"{type(images).__name__} of dtype {getattr(images, 'dtype', None)}.")
    if images.ndim != 4 or images.shape[-1] != 1 or images.shape[1] != images.shape[2] or len(images) == 0:
        raise ValueError(f"images must be [N, H, W, 1] with H == W and N >= 1 (digits are grayscale), "
                         f"got shape {images.shape}.")
    if image_size is not None and images.shape[1] != image_size:
        raise ValueError(f"This classifier takes {image_size}x{image_size} images, got {images.shape[1:3]}.")
    return images


@dataclasses.dataclass(frozen=True, eq=False)
class Classifier:
    """A trained :class:`DigitsCNN` at one resolution; all methods take ``uint8 [N, S, S, 1]`` images."""

    params: Any
    image_size: int
    seed: int
    test_accuracy: float  # on the real held-out ``test`` split
    train_seconds: Optional[float] = None  # None when loaded from the disk cache

    def _run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images = _check_images(images, self.image_size)
        logits, feats = [], []
        for start in range(0, len(images), _EVAL_CHUNK):  # fixed chunk shape: one compilation
            chunk = images[start:start + _EVAL_CHUNK]
            pad = _EVAL_CHUNK - len(chunk)
            out = _apply(self.params, np.pad(chunk, ((0, pad), (0, 0), (0, 0), (0, 0))))
            logits.append(np.asarray(out[0])[:len(chunk)])
            feats.append(np.asarray(out[1])[:len(chunk)])
        return np.concatenate(logits), np.concatenate(feats)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """``float32 [N, 10]``."""
        return self._run(images)[0]

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Predicted class, ``int64 [N]``."""
        return self.logits(images).argmax(axis=-1)

    def features(self, images: np.ndarray) -> np.ndarray:
        """Penultimate-layer features, ``float64 [N, FEATURE_DIM]``."""
        return self._run(images)[1].astype(np.float64)


def _train_params(image_size: int, seed: int, data_dir: str) -> Any:
    """Adam-W on the real ``train`` split; each batch shifted by up to 1/8 of the image (1 px at 8x8)."""
    images, labels = real_images("digits", "train", image_size, data_dir)
    n, s, m = len(images), image_size, max(1, image_size // 8)
    padded = np.pad(images.astype(np.float32) / 127.5 - 1.0, ((0, 0), (m, m), (m, m), (0, 0)),
                    constant_values=-1.0)  # background is black (-1)
    steps_per_epoch = n // _BATCH
    order = np.concatenate([np.random.default_rng([seed, e]).permutation(n)[:steps_per_epoch * _BATCH]
                            for e in range(_EPOCHS)]).reshape(-1, _BATCH)
    model = DigitsCNN()
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(
        0.0, _LR, min(_WARMUP, len(order) // 4), len(order)), weight_decay=1e-4)

    @functools.partial(xla.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, x, y):
        def loss_fn(p):
            logits, _ = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    # A Python loop over one jitted step: on XLA:CPU a lax.scan of this step runs ~30x slower
    # (convolutions inside a while loop lose the multithreaded fast path).
    params = model.init(jax.random.PRNGKey(seed), padded[:1, m:m + s, m:m + s])["params"]
    opt_state = tx.init(params)
    for step, idx in enumerate(order):
        dy, dx = np.random.default_rng([seed, step, 1]).integers(0, 2 * m + 1, (2, len(idx)))
        rows = (dy[:, None] + np.arange(s))[:, :, None]
        cols = (dx[:, None] + np.arange(s))[:, None, :]
        params, opt_state = train_step(params, opt_state, padded[idx[:, None, None], rows, cols],
                                       labels[idx])
    return jax.tree_util.tree_map(np.asarray, params)


def _cache_path(data_dir: str, image_size: int, seed: int) -> str:
    return os.path.join(data_dir, "jaxdiff_eval",
                        f"digits_classifier_v{CLASSIFIER_VERSION}_{image_size}px_seed{seed}.msgpack")


def _load_params(path: str, image_size: int, seed: int) -> Optional[Any]:
    """Params from the cache file, or None if it is missing, unreadable or does not match."""
    try:
        with open(path, "rb") as f:
            state = serialization.msgpack_restore(f.read())
        if (state["version"], state["image_size"], state["seed"]) != (CLASSIFIER_VERSION, image_size, seed):
            return None
        expected = jax.eval_shape(lambda: DigitsCNN().init(
            jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 1)))["params"])
        params = state["params"]
        same = jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(expected) and all(
            np.shape(a) == b.shape for a, b in zip(jax.tree_util.tree_leaves(params),
                                                   jax.tree_util.tree_leaves(expected)))
        return params if same else None
    except Exception:  # any corrupt / truncated / foreign file: retrain instead
        return None


def _save_params(path: str, params: Any, image_size: int, seed: int) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = serialization.msgpack_serialize(
            {"version": CLASSIFIER_VERSION, "image_size": image_size, "seed": seed, "params": params})
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp_classifier_")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except OSError:
        pass  # a read-only data dir only costs retraining next time


_CLASSIFIERS: dict[tuple, Classifier] = {}


def train_digits_classifier(image_size: int, seed: int = 0, data_dir: Optional[str] = None) -> Classifier:
    """The digits classifier at ``image_size`` px, from the in-process cache, the disk cache, or trained.

    Trained on the real ``train`` split (resized as by :func:`jaxdiff.data.real_images`); its
    ``test_accuracy`` is measured on the held-out ``test`` split each time it is loaded.
    Disk cache: ``<data_dir>/jaxdiff_eval/digits_classifier_v{version}_{size}px_seed{seed}.msgpack``.
    """
    if not isinstance(image_size, (int, np.integer)) or image_size < 2:
        raise ValueError(f"image_size must be an int >= 2, got {image_size!r}.")
    image_size, seed = int(image_size), int(seed)
    data_dir = os.path.abspath(default_data_dir(data_dir))
    key = (image_size, seed, data_dir, CLASSIFIER_VERSION)
    if key in _CLASSIFIERS:
        return _CLASSIFIERS[key]
    path = _cache_path(data_dir, image_size, seed)
    params, seconds = _load_params(path, image_size, seed), None
    if params is None:
        start = time.perf_counter()
        params = _train_params(image_size, seed, data_dir)
        seconds = time.perf_counter() - start
        _save_params(path, params, image_size, seed)
    clf = Classifier(params, image_size, seed, test_accuracy=float("nan"), train_seconds=seconds)
    test_images, test_labels = real_images("digits", "test", image_size, data_dir)
    clf = dataclasses.replace(clf, test_accuracy=float(np.mean(clf.predict(test_images) == test_labels)))
    _CLASSIFIERS[key] = clf
    return clf


def evaluate_digits(images: np.ndarray, labels: Optional[np.ndarray] = None,
                    data_dir: Optional[str] = None) -> dict[str, Any]:
    """Sample-quality figures for generated digits ``images: uint8 [N, S, S, 1]`` (S = 8, 16, 32, ...).

    Returns a dict with:
      accuracy: fraction classified as their requested ``labels: int [N]`` (None without labels).
      frechet: classifier-feature Frechet distance, samples vs the real ``test`` split (300).
      frechet_real_vs_real: the same for min(N, 1497) real ``train`` images (fixed subsample) vs
        ``test``: the floor to compare ``frechet`` with.
      classifier_test_accuracy: the classifier's accuracy on the real ``test`` split.
      num_samples: N.  image_size: S.
    """
    images = _check_images(images)
    n, size = len(images), images.shape[1]
    if n < 2:
        raise ValueError(f"Need at least 2 images for a Frechet distance, got {n}.")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be an int array of shape ({n},), got {labels.dtype} {labels.shape}.")
    clf = train_digits_classifier(size, data_dir=data_dir)
    test_images, _ = real_images("digits", "test", size, data_dir)
    train_images, _ = real_images("digits", "train", size, data_dir)
    test_feats = clf.features(test_images)
    subset = np.sort(np.random.default_rng(0).permutation(len(train_images))[:n])
    return {
        "accuracy": None if labels is None else float(np.mean(clf.predict(images) == labels)),
        "frechet": frechet_distance(clf.features(images), test_feats),
        "frechet_real_vs_real": frechet_distance(clf.features(train_images[subset]), test_feats),
        "classifier_test_accuracy": clf.test_accuracy,
        "num_samples": n,
        "image_size": size,
    }
