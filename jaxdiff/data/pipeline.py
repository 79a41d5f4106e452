"""Host input pipeline over TFDS ``array_record`` datasets, read with random access (no TensorFlow).

    >>> ds = ImageDataset("digits", "train", batch_size=128, image_size=16, seed=0)
    >>> b = ds.batch(0)        # {'image': float32 [128, 16, 16, 1] in [-1, 1], 'label': int32 [128]}
    >>> ImageDataset("shapes", "train", batch_size=64).batch(0)   # captioned: 'image' plus
    ...     # 'caption' str [64] and 'shape', 'color', 'position' int32 [64]
    >>> for b in ds.iterate(start_step=saved_step): ...   # resumes exactly where a run stopped

Order is a pure function of ``(seed, step)``: global example ``i = step * B + j`` belongs to epoch
``i // N`` and is example ``perm[i % N]`` where ``perm = Generator(PCG64([seed, epoch])).permutation(N)``.
So every example appears once per epoch, batches may straddle epochs, and resuming needs only the
step. Random horizontal flips come from ``Generator(PCG64([seed, step, 1]))``.

Resizing: images that are not square are centre-cropped to a square, then resized once per example
with PIL **bicubic** (PIL antialiases when it shrinks; values are rounded and clipped to uint8).

Data dir: argument, else ``$JAXDIFF_DATA_DIR``, else TFDS's default (``$TFDS_DATA_DIR`` or
``~/tensorflow_datasets``). The embedded ``digits`` and ``shapes`` are built there on first use; any
other dataset must already be prepared there in ``array_record`` format (nothing is ever downloaded).

Embedded datasets: what the pipeline knows of ``digits`` and ``shapes`` (how to build them, the
annotations their batches carry, whether ``random_flip`` and ``holdout`` apply) is each one's
:class:`~jaxdiff.data.builders.DatasetSpec`, looked up by name in :data:`jaxdiff.data.specs.SPECS`.

Annotations: batches of a dataset whose spec names ``annotations`` (``shapes``) also carry those
features: Text features as NumPy ``str`` arrays (captions), ClassLabel features as int32. Batches of
a dataset without a spec carry its ``caption`` if it has one (a captioned image folder). Other
datasets' batches hold only ``image`` and ``label``. ``drop_labels`` drops them all.
"""
from __future__ import annotations

import functools
import os
import queue
import threading
from typing import Iterator, Optional, Sequence

import numpy as np
import tensorflow_datasets as tfds

from jaxdiff.data import folder as folder_lib
from jaxdiff.data.builders import (  # default_data_dir, resize_image: also imported from here
    as_text, check_split, data_source, default_data_dir, resize_image)
from jaxdiff.data.specs import SPECS, spec_of

# Datasets whose resized images take fewer bytes than this are cached in memory as they are read.
CACHE_LIMIT_BYTES = 512 * 2**20
# Features that batches carry besides 'image' and 'label', by dataset (Text -> str, ClassLabel -> int32):
# the specs' annotations, for reading; the pipeline itself asks the spec.
ANNOTATIONS = {name: spec.annotations for name, spec in SPECS.items() if spec.annotations}


class DatasetNotPreparedError(FileNotFoundError):
    """The dataset is not prepared (in array_record format) in the data dir searched."""


def _not_prepared(name: str, data_dir: str, why: str) -> DatasetNotPreparedError:
    base = name.split(":")[0].split("/")[0]
    return DatasetNotPreparedError(
        f"Dataset {name!r} is not prepared in data dir {data_dir!r} ({why}).\n"
        "jaxdiff reads TFDS datasets in array_record format with tfds.data_source (no TensorFlow) "
        "and never downloads at run time. Prepare it once, on a machine with TensorFlow and "
        "internet access:\n"
        f"    tfds build {name} --file_format=array_record --data_dir={data_dir}\n"
        "or in Python:\n"
        f"    tfds.builder({name!r}, data_dir={data_dir!r}, "
        "file_format='array_record').download_and_prepare()\n"
        f"then copy {os.path.join(data_dir, base)} into this machine's data dir "
        "(pass data_dir=..., or set JAXDIFF_DATA_DIR).")


def get_builder(name: str, data_dir: Optional[str] = None, image_size: Optional[int] = None) -> tfds.core.DatasetBuilder:
    """The prepared TFDS builder for ``name`` in the data dir (a dataset in ``SPECS``, ``digits`` or
    ``shapes``, is built on first use by its spec; ``folder:PATH``, the user's images, is built at
    ``image_size`` on first use and when the folder changes: :mod:`jaxdiff.data.folder`).

    Raises:
      DatasetNotPreparedError: the dataset is unknown, not prepared there, or not in array_record.
    """
    data_dir = default_data_dir(data_dir)
    if folder_lib.is_folder(name):
        return folder_lib.folder_builder(name, data_dir, image_size)
    spec = spec_of(name)
    if spec is not None:
        return spec.builder(data_dir)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise _not_prepared(name, data_dir, "TFDS knows no such dataset and none is stored there") from None
    if not builder.is_prepared():
        raise _not_prepared(name, data_dir, f"nothing at {builder.data_dir}")
    formats = {f.value for f in builder.info.available_file_formats()}
    if "array_record" not in formats:
        raise _not_prepared(name, data_dir, f"it is stored as {sorted(formats)}, not array_record")
    return builder


def load_source(name: str, split: str, data_dir: Optional[str] = None) -> Sequence[dict]:
    """A random-access ``tfds`` data source (``len``, ``src[i]``, ``src.__getitems__([...])``) of decoded examples.

    ``split`` accepts TFDS slicing (``'train[:90%]'``).
    """
    return data_source(get_builder(name, data_dir), split)


class ImageDataset:
    """Deterministic, resumable batches of images (and labels) from a TFDS array_record dataset.

    ``holdout`` (datasets whose spec has one: ``shapes``): the name of a set of examples to leave
    out, e.g. (shape, colour, position) combinations (:func:`jaxdiff.data.shapes.holdout_labels`);
    the dataset is then the split's other examples, and every index below (``indices``,
    ``examples``, ``annotations``) counts those.

    Attributes:
      num_examples: N, examples in the split (without the held-out ones).
      num_classes: classes of the ``label`` feature; None if there is none or ``drop_labels``.
      class_names: their names (label id order; a class folder's sorted folder names), or None.
      annotation_keys: the other features a batch carries (Text as ``str``, ClassLabel as int32):
        the spec's ``annotations``, e.g. ``('caption', 'shape', 'color', 'position')`` for ``shapes``;
        () for other datasets or if ``drop_labels``.
      image_shape: ``(H, W, C)`` of the images in a batch (after resizing).
    """

    def __init__(self, name: str = "digits", split: str = "train", *, batch_size: int,
                 image_size: Optional[int] = None, seed: int = 0, data_dir: Optional[str] = None,
                 random_flip: bool = False, drop_labels: bool = False,
                 cache_in_memory: Optional[bool] = None, holdout: Optional[str] = None):
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
        if image_size is not None and (not isinstance(image_size, (int, np.integer)) or image_size < 1):
            raise ValueError(f"image_size must be a positive int or None, got {image_size!r}.")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
        spec = self._spec = spec_of(name)
        if random_flip and spec is not None and not spec.allows_random_flip:
            raise ValueError(spec.random_flip_error)
        if holdout:  # checked before anything is read or built
            if spec is None or spec.holdout is None:
                having = ", ".join(repr(n) for n, s in SPECS.items() if s.holdout is not None)
                raise ValueError(f"holdout={holdout!r} needs a dataset with held-out label sets ({having}), "
                                 f"not {name!r}.")
            spec.holdout((), holdout)  # raises for an unknown name
        self.name, self.split = name, split
        self.batch_size, self.image_size, self.seed = int(batch_size), image_size, int(seed)
        self.random_flip = random_flip
        self.data_dir = default_data_dir(data_dir)
        builder = get_builder(name, self.data_dir, image_size)
        check_split(builder, split)
        features = builder.info.features
        if "image" not in features:
            raise ValueError(f"Dataset {name!r} has no 'image' feature (has {list(features)}).")
        self._source = builder.as_data_source(split)
        split_size = len(self._source)
        if split_size == 0:
            raise ValueError(f"Split {split!r} of {name!r} is empty.")
        self.holdout = holdout or None
        self._subset = None if self.holdout is None else self._kept(split_size, self.holdout)
        self.num_examples = split_size if self._subset is None else len(self._subset)
        label = features["label"] if "label" in features else None
        self._has_label = label is not None and not drop_labels
        self.num_classes = getattr(label, "num_classes", None) if self._has_label else None
        self.class_names = list(label.names) if self._has_label and hasattr(label, "names") else None
        captioned = ("caption",) if "caption" in features else ()  # e.g. a captioned image folder
        self.annotation_keys = () if drop_labels else captioned if spec is None else spec.annotations
        self._is_text = {k: isinstance(features[k], tfds.features.Text) for k in self.annotation_keys}

        shape = features["image"].shape
        if image_size is not None:
            self.image_shape = (int(image_size), int(image_size), shape[-1] or 1)
        elif None in shape:  # variable-size images: learn the shape from the first one
            self.image_shape = self._read([0])[0].shape[1:]
        else:
            self.image_shape = tuple(shape)
        nbytes = self.num_examples * int(np.prod(self.image_shape))
        self.cache_in_memory = nbytes < CACHE_LIMIT_BYTES if cache_in_memory is None else cache_in_memory
        if self.cache_in_memory:  # filled lazily, example by example, as batches read them
            self._images = np.empty((split_size, *self.image_shape), np.uint8)
            self._labels = np.zeros((split_size,), np.int32)
            self._cached = np.zeros((split_size,), bool)
            self._annotations = {k: np.empty((split_size,), object if self._is_text[k] else np.int32)
                                 for k in self.annotation_keys}
        self._perm = functools.lru_cache(maxsize=4)(self._permutation)

    def __repr__(self) -> str:
        held = "" if self.holdout is None else f", holdout={self.holdout!r}"
        return (f"ImageDataset({self.name!r}, {self.split!r}, batch_size={self.batch_size}, "
                f"image_shape={self.image_shape}, num_examples={self.num_examples}, seed={self.seed}{held})")

    def _kept(self, split_size: int, holdout: str) -> np.ndarray:
        """Split indices of the examples ``holdout`` keeps (int64, ascending)."""
        ex = self._source.__getitems__(list(range(split_size)))
        return np.flatnonzero(~self._spec.holdout(ex, holdout))

    # -- reading -------------------------------------------------------------------------------
    def _read(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Reads and resizes examples ``indices``: (uint8 [n,H,W,C], int32 [n], annotations [n] each)."""
        examples = self._source.__getitems__([int(i) for i in indices])
        images = [resize_image(np.asarray(ex["image"]), self.image_size) for ex in examples]
        try:
            images = np.stack(images).astype(np.uint8, copy=False)
        except ValueError:
            raise ValueError(f"Images of {self.name!r} have different shapes; pass image_size=.") from None
        labels = np.asarray([ex["label"] if self._has_label else -1 for ex in examples], np.int32)
        annotations = {k: (np.array([as_text(ex[k]) for ex in examples], object) if self._is_text[k]
                           else np.asarray([ex[k] for ex in examples], np.int32))
                       for k in self.annotation_keys}
        return images, labels, annotations

    def _examples(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        indices = np.asarray(indices, np.int64)
        if self._subset is not None:  # dataset index -> split index
            indices = self._subset[indices]
        if not self.cache_in_memory:
            return self._read(indices)
        missing = np.unique(indices[~self._cached[indices]])
        if missing.size:
            images, labels, annotations = self._read(missing)
            self._images[missing], self._labels[missing] = images, labels
            for k, v in annotations.items():
                self._annotations[k][missing] = v
            self._cached[missing] = True
        return (self._images[indices], self._labels[indices],
                {k: v[indices] for k, v in self._annotations.items()})

    def examples(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Examples by index in the dataset (the split, less any ``holdout``):
        ``(uint8 [n, H, W, C], int32 [n] labels, -1 if none)``."""
        return self._examples(indices)[:2]

    def annotations(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The ``annotation_keys`` of examples by index: ``{key: str [n] or int32 [n]}``."""
        return self.read(indices)[2]

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Images, labels and annotations of examples by index, from one read of each:
        ``(uint8 [n, H, W, C], int32 [n], {key: str [n] or int32 [n]})``."""
        images, labels, annotations = self._examples(indices)
        return images, labels, {k: (v.astype(str) if self._is_text[k] else v) for k, v in annotations.items()}

    # -- order ---------------------------------------------------------------------------------
    def _permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
        return rng.permutation(self.num_examples)

    def indices(self, step: int) -> np.ndarray:
        """Indices (in the dataset: the split, less any ``holdout``) of the examples in batch
        ``step``: int64 [B]."""
        i = step * self.batch_size + np.arange(self.batch_size)
        epoch, pos = i // self.num_examples, i % self.num_examples
        out = np.empty_like(i)
        for e in np.unique(epoch):
            out[epoch == e] = self._perm(int(e))[pos[epoch == e]]
        return out

    def batch(self, step: int, rows: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
        """Batch ``step``: ``{'image': float32 [B, H, W, C] in [-1, 1], 'label': int32 [B]}``; pure in (seed, step).

        Plus one ``[B]`` array per ``annotation_keys`` (``str`` for Text, int32 for ClassLabel).
        ``rows`` (int indices into ``0..B-1``): read and decode only those rows of the global batch
        (one process's share, :func:`jaxdiff.parallel.host_rows`); the arrays then have ``len(rows)``
        rows, equal to the same rows of the whole batch.
        """
        if not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}.")
        rows = _check_rows(rows, self.batch_size)
        indices = self.indices(int(step))
        images, labels, annotations = self._examples(indices if rows is None else indices[rows])
        if self.random_flip:
            flip = np.random.Generator(np.random.PCG64([self.seed, int(step), 1])).random(self.batch_size) < 0.5
            flip = flip if rows is None else flip[rows]
            images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
        out = {"image": images.astype(np.float32) / 127.5 - 1.0}
        if self._has_label:
            out["label"] = labels
        for k, v in annotations.items():
            out[k] = v.astype(str) if self._is_text[k] else v
        return out

    def iterate(self, start_step: int = 0, prefetch: int = 2,
                rows: Optional[np.ndarray] = None) -> Iterator[dict[str, np.ndarray]]:
        """Endless batches ``batch(start_step, rows), batch(start_step + 1, rows), ...``, ``prefetch``
        ahead on a thread."""
        if not isinstance(start_step, (int, np.integer)) or start_step < 0:
            raise ValueError(f"start_step must be a non-negative int, got {start_step!r}.")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch!r}.")
        return prefetched(functools.partial(self.batch, rows=_check_rows(rows, self.batch_size)),
                          int(start_step), int(prefetch))


def _check_rows(rows, batch_size: int) -> Optional[np.ndarray]:
    if rows is None:
        return None
    rows = np.asarray(rows)
    if rows.ndim != 1 or rows.dtype.kind not in "iu" or (rows.size and (rows.min() < 0 or rows.max() >= batch_size)):
        raise ValueError(f"rows must be int indices into the batch of {batch_size}, got {rows!r}.")
    return rows


def prefetched(batch_fn, step: int, prefetch: int) -> Iterator:
    """Endless ``batch_fn(step), batch_fn(step + 1), ...``, computed ``prefetch`` ahead on a thread
    (0: in the caller's thread); an error in the thread is raised in the consumer."""
    if prefetch == 0:
        while True:
            yield batch_fn(step)
            step += 1
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def put(item) -> None:
        while not stop.is_set():
            try:
                return q.put(item, timeout=0.1)
            except queue.Full:
                pass

    def worker(step: int) -> None:
        try:
            while not stop.is_set():
                put((batch_fn(step), None))
                step += 1
        except BaseException as e:  # handed to the consumer, raised there
            put((None, e))

    thread = threading.Thread(target=worker, args=(step,), daemon=True, name="jaxdiff-prefetch")
    thread.start()
    try:
        while True:
            batch, error = q.get()
            if error is not None:
                raise error
            yield batch
    finally:
        stop.set()
        thread.join(timeout=5.0)


@functools.lru_cache(maxsize=16)
def _real_images(name: str, split: str, image_size: Optional[int], data_dir: str):
    ds = ImageDataset(name, split, batch_size=1, image_size=image_size, data_dir=data_dir,
                      cache_in_memory=False)
    images, labels = ds.examples(np.arange(ds.num_examples))
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, (labels if ds.num_classes is not None else None)


def real_images(name: str, split: str, image_size: Optional[int],
                data_dir: Optional[str] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """A whole split in source order: ``(uint8 [N, H, W, C], int32 labels [N] or None)``, read-only, memoised."""
    if image_size is not None and (not isinstance(image_size, (int, np.integer)) or image_size < 1):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}.")
    return _real_images(name, split, None if image_size is None else int(image_size),
                        os.path.abspath(default_data_dir(data_dir)))
