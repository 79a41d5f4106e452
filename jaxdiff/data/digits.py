"""The embedded default dataset ``digits``: sklearn's bundled 8x8 handwritten digits as a TFDS dataset.

``sklearn.datasets.load_digits`` ships 1797 real 8x8 grayscale scans (UCI optdigits test set,
values 0..16, 10 classes) inside the sklearn wheel, so this dataset needs no download. We write it
as a real TFDS dataset in ``array_record`` format, without TensorFlow, and read it back with
``builder.as_data_source`` exactly like any other prepared TFDS dataset.

Features:
    image: uint8 [8, 8, 1], pixel = round(v * 255 / 16) for the sklearn value v in 0..16
    label: ClassLabel(10)
    index: int64, the example's row in ``load_digits()`` (for provenance and tests)

Splits (deterministic, stratified): ``test`` holds 30 examples of each class (300), drawn with
``np.random.default_rng(0)``; ``train`` holds the other 1497. TFDS stores records in its own
(hash-of-key) order, not in sklearn order; use ``index`` to map back.

Building takes about a second. It is race-safe: each process builds into its own temporary data
dir and atomically renames the finished version folder into place; a process that loses the
rename discards its copy and uses the winner's.
"""
from __future__ import annotations

import io
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from jaxdiff.data.builders import DatasetSpec, prepare_local_builder  # benchmarks import it from here too

NAME = "digits"
DIGITS_VERSION = "1.0.0"
TEST_PER_CLASS = 30
SPLIT_SEED = 0


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """Returns sklearn's digits as ``(images uint8 [1797, 8, 8, 1] scaled to 0..255, labels int64 [1797])``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, d.target.astype(np.int64)


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Sorted sklearn row indices of each split: ``test`` = 30 per class drawn with seed 0, ``train`` = rest."""
    rng = np.random.default_rng(SPLIT_SEED)
    test = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[:TEST_PER_CLASS] for c in range(10)])
    test = np.sort(test)
    train = np.setdiff1d(np.arange(len(labels)), test)
    return {"train": train, "test": test}


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[..., 0], mode="L").save(buf, format="PNG")
    return buf.getvalue()


class Digits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder for the embedded digits (kept out of TFDS's global registry on purpose)."""

    VERSION = tfds.core.Version(DIGITS_VERSION)
    RELEASE_NOTES = {DIGITS_VERSION: "sklearn load_digits, 1497 train / 300 test (30 per class, seed 0)."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's default probes `importlib_resources` (not a dependency of ours) for classes that
        # live in a package; the answer it would fall back to is simply this file.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="sklearn's bundled 8x8 handwritten digits (UCI optdigits), scaled to 0..255.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 1), encoding_format="png"),
                "label": tfds.features.ClassLabel(num_classes=10),
                "index": tfds.features.Scalar(dtype=np.int64),
            }),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the data ships with sklearn
        images, labels = sklearn_digits()
        return {split: self._generate_examples(images, labels, idx)
                for split, idx in split_indices(labels).items()}

    def _generate_examples(self, images, labels, idx) -> Iterator[tuple[int, dict]]:
        for i in idx:
            # PNG bytes, not uint8 arrays: encoding an array would need TensorFlow.
            yield int(i), {"image": _png(images[i]), "label": int(labels[i]), "index": int(i)}


def digits_builder(data_dir: str) -> Digits:
    """Returns the digits builder over ``data_dir``, preparing it there first if needed (race-safe)."""
    return prepare_local_builder(Digits, data_dir, NAME, DIGITS_VERSION)


SPEC = DatasetSpec(NAME, digits_builder)  # plain image + label batches; flips allowed; no holdouts
