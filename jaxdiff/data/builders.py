"""What the dataset modules and the input pipeline share: building a local TFDS dataset, reading a
split, resizing an image, and :class:`DatasetSpec`, the per-dataset facts the pipeline consults.

This module imports no other ``jaxdiff.data`` module: ``digits``, ``shapes`` and ``folder`` build
with it, :mod:`jaxdiff.data.specs` gathers the embedded datasets' specs, and the pipeline imports
them all, so module-level imports form no cycle (``tests/test_data.py`` checks).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What the generic pipeline knows about one embedded dataset, declared by the dataset's module
    (``digits.SPEC``, ``shapes.SPEC``) and found by name in :data:`jaxdiff.data.specs.SPECS`.

    Attributes:
      name: the dataset's name (``ImageDataset(name)``; ``name:VERSION`` finds the same spec).
      builder: ``data_dir -> builder``: the prepared TFDS builder there, built on first use.
      annotations: the features a batch carries besides ``image`` and ``label`` (Text -> ``str``,
        ClassLabel -> int32).
      random_flip_error: why ``random_flip=True`` is refused (the ValueError's one-line message),
        or None where flips are allowed.
      holdout: ``(examples, holdout_name) -> bool [N]``: which of a split's decoded examples the
        named holdout leaves out; raises ValueError for an unknown name (the pipeline calls it with
        no examples to check the name before anything is built or read). None: no holdouts.
    """

    name: str
    builder: Callable[[str], tfds.core.DatasetBuilder]
    annotations: tuple[str, ...] = ()
    random_flip_error: Optional[str] = None
    holdout: Optional[Callable[[Sequence[Mapping], str], np.ndarray]] = None

    @property
    def allows_random_flip(self) -> bool:
        return self.random_flip_error is None


def default_data_dir(data_dir: Optional[str] = None) -> str:
    """``data_dir`` if given, else ``$JAXDIFF_DATA_DIR``, else TFDS's default data dir."""
    if data_dir:
        return os.path.expanduser(os.fspath(data_dir))
    if os.environ.get("JAXDIFF_DATA_DIR"):
        return os.path.expanduser(os.environ["JAXDIFF_DATA_DIR"])
    from tensorflow_datasets.core import constants

    return os.path.expanduser(constants.DATA_DIR)  # $TFDS_DATA_DIR or ~/tensorflow_datasets


def prepare_local_builder(cls, data_dir: str, name: str, version: str):
    """Returns ``cls(data_dir=..., file_format='array_record')``, building a locally generated TFDS
    dataset there first if needed. Race-safe: built in a temporary folder, then renamed into place
    (a concurrent builder that loses the rename keeps the winner's copy)."""
    builder = cls(data_dir=data_dir, file_format="array_record")
    if builder.is_prepared():
        return builder
    os.makedirs(data_dir, exist_ok=True)
    tmp_root = tempfile.mkdtemp(prefix=f".jaxdiff_build_{name}_", dir=data_dir)
    try:
        tmp_builder = cls(data_dir=tmp_root, file_format="array_record")
        from tensorflow_datasets.core.utils import tqdm_utils

        shown = getattr(tqdm_utils, "_active", True)
        tfds.display_progress_bar(False)
        try:
            tmp_builder.download_and_prepare(
                download_dir=os.path.join(tmp_root, "downloads"),
                download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        finally:
            tfds.display_progress_bar(shown)
        final = os.path.join(data_dir, name, version)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        try:
            os.rename(os.path.join(tmp_root, name, version), final)  # atomic; fails if final exists
        except OSError:
            if not os.path.exists(os.path.join(final, "dataset_info.json")):
                raise
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return cls(data_dir=data_dir, file_format="array_record")


def check_split(builder: tfds.core.DatasetBuilder, split: str) -> None:
    """Raises ValueError, naming the available splits, if ``split`` (TFDS slicing allowed) is not one."""
    available = list(builder.info.splits.keys())
    base = split.split("[")[0]
    if base not in available:
        raise ValueError(f"Unknown split {split!r} for dataset {builder.name!r}; available: {available}.")


def data_source(builder: tfds.core.DatasetBuilder, split: str) -> Sequence[dict]:
    """The random-access data source of ``split`` of a prepared builder (checked: :func:`check_split`)."""
    check_split(builder, split)
    return builder.as_data_source(split)


def resize_image(image: np.ndarray, size: Optional[int]) -> np.ndarray:
    """``image: [H, W, C] uint8`` -> ``[size, size, C] uint8``: centre-crop to square, PIL bicubic resize."""
    if image.ndim == 2:
        image = image[..., None]
    if size is None:
        return image
    h, w = image.shape[:2]
    if h != w:
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        image = image[top:top + s, left:left + s]
    if image.shape[0] == size:
        return image
    # Per-channel "L" images: identical to PIL's multi-band resize, and works for any C.
    return np.stack([np.asarray(Image.fromarray(image[..., c]).resize((size, size), Image.BICUBIC))
                     for c in range(image.shape[-1])], axis=-1)


def as_text(value) -> str:
    """A decoded Text feature (``bytes``, ``str`` or a 0-d array of either) as ``str``."""
    value = value.item() if isinstance(value, np.ndarray) else value
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
