"""Batches of a frozen VAE's scaled latents of an image dataset (latent diffusion's training data)."""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from jaxdiff.data.pipeline import ImageDataset, prefetched


class LatentDataset:
    """Batches of scaled VAE latents of an :class:`ImageDataset`, in the same (seed, step) order.

    Examples are encoded (posterior mean and std, times the scale factor) when a batch first needs
    them, by the process whose rows hold them, and kept in memory; a process never encodes the rows
    of other processes. Batch ``step`` holds ``scale * (mean + std * eps)`` (a posterior sample, as
    latent diffusion trains; ``sample_posterior=False``: the means), eps from
    ``Generator(PCG64([seed, step, 2]))`` for the whole global batch: pure in (seed, step), so resume
    is exact and the global batch is the same for any number of processes.

    ``autoencoder``: a :class:`jaxdiff.models.LatentAutoencoder`, or anything with its
    ``encode(uint8 images) -> (mean, std)``, ``vae.latent_shape``, ``workdir``, ``step`` and
    ``scale_factor``.

    ``cache=False``: nothing is kept; every batch reads and encodes its rows again (memory stays
    flat for datasets whose latents would not fit; each step pays the encoder). The batches are the
    same either way.

    Attributes as :class:`ImageDataset`: ``name``, ``split``, ``batch_size``, ``seed``,
    ``num_examples``, ``num_classes``, ``image_shape`` (the latent shape), plus ``autoencoder``.
    """

    def __init__(self, images: ImageDataset, autoencoder: Any, *, sample_posterior: bool = True, cache: bool = True):
        self.images, self.autoencoder, self.sample_posterior = images, autoencoder, bool(sample_posterior)
        self.cache = bool(cache)
        self.name, self.split = images.name, images.split
        self.batch_size, self.seed, self.num_examples = images.batch_size, images.seed, images.num_examples
        self.num_classes, self.class_names = images.num_classes, images.class_names
        self.image_shape = tuple(autoencoder.vae.latent_shape)
        self.annotation_keys = tuple(getattr(images, "annotation_keys", ()))
        n = self.num_examples if self.cache else 0
        self._mean = np.empty((n, *self.image_shape), np.float32)
        self._std = np.empty_like(self._mean)
        self._labels = np.zeros((n,), np.int32)
        self._annotations: dict[str, np.ndarray] = {}  # filled with the latents: each image is read once
        self._encoded = np.zeros((n,), bool)

    def __repr__(self) -> str:
        return (f"LatentDataset({self.name!r}, {self.split!r}, batch_size={self.batch_size}, "
                f"latent_shape={self.image_shape}, num_examples={self.num_examples}, vae={self.autoencoder.workdir!r} "
                f"step {self.autoencoder.step}, scale_factor={self.autoencoder.scale_factor:.5g})")

    def latents(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scaled posterior ``(mean, std)`` of examples ``indices``: float32 [n, h, w, c] each,
        encoding those not encoded yet (``cache=False``: encoding them now)."""
        if not self.cache:
            return self.autoencoder.encode(self.images.read(np.asarray(indices, np.int64))[0])
        self._encode(np.asarray(indices, np.int64))
        return self._mean[indices], self._std[indices]

    def _encode(self, indices: np.ndarray) -> None:
        """Read (once) and encode the examples of ``indices`` not encoded yet, keeping their labels
        and annotations beside the latents."""
        missing = np.unique(indices[~self._encoded[indices]])
        if not missing.size:
            return
        pixels, labels, annotations = self.images.read(missing)
        self._mean[missing], self._std[missing] = self.autoencoder.encode(pixels)
        self._labels[missing] = labels
        for k, v in annotations.items():
            if k not in self._annotations:
                self._annotations[k] = np.empty((self.num_examples,), v.dtype if v.dtype.kind != "U" else object)
            self._annotations[k][missing] = v
        self._encoded[missing] = True

    def batch(self, step: int, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``{'image': float32 [B, h, w, c] scaled latents, 'label': int32 [B]}`` (no label if unconditional),
        plus the image dataset's ``annotation_keys`` (e.g. ``caption``). ``rows``: only those rows of
        the global batch (one process's share), as :meth:`ImageDataset.batch`."""
        if not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}.")
        idx = self.images.indices(int(step))
        if rows is not None:
            idx = idx[np.asarray(rows)]
        if not self.cache:
            return self._encoded_batch(int(step), idx, rows)
        z, std = self.latents(idx)
        if self.sample_posterior:
            eps = np.random.Generator(np.random.PCG64([self.seed, int(step), 2])).standard_normal(
                (self.batch_size, *self.image_shape), np.float32)
            z = z + std * (eps if rows is None else eps[np.asarray(rows)])
        out = {"image": z}
        if self.num_classes is not None:
            out["label"] = self._labels[idx]
        for k in self.annotation_keys:  # captions (str) and attribute ids, as ImageDataset
            v = self._annotations[k][idx]
            out[k] = v.astype(str) if v.dtype == object else v
        return out

    def _encoded_batch(self, step: int, idx: np.ndarray, rows: np.ndarray | None) -> dict[str, np.ndarray]:
        """``cache=False``: read and encode the rows of batch ``step`` now (the same values as cached)."""
        pixels, labels, annotations = self.images.read(idx)
        z, std = self.autoencoder.encode(pixels)
        if self.sample_posterior:
            eps = np.random.Generator(np.random.PCG64([self.seed, step, 2])).standard_normal(
                (self.batch_size, *self.image_shape), np.float32)
            z = z + std * (eps if rows is None else eps[np.asarray(rows)])
        out = {"image": z}
        if self.num_classes is not None:
            out["label"] = labels
        for k in self.annotation_keys:
            out[k] = annotations[k]
        return out

    def iterate(self, start_step: int = 0, prefetch: int = 0, rows: np.ndarray | None = None):
        """Endless batches from ``start_step`` (``prefetch`` ahead on a thread; 0: none)."""
        if not isinstance(start_step, (int, np.integer)) or start_step < 0:
            raise ValueError(f"start_step must be a non-negative int, got {start_step!r}.")
        return prefetched(functools.partial(self.batch, rows=rows), int(start_step), int(prefetch))
