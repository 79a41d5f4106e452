"""Captioned batches tokenized on the host for a text-conditioned model."""
from __future__ import annotations

from typing import Any

import numpy as np


class TokenizedCaptions:
    """A dataset whose batches carry ``caption`` strings, with the captions tokenized on the host:
    batches hold ``image`` plus ``input_ids`` and ``attention_mask`` (int32 [B, L]); strings and
    the other annotations are dropped (they cannot be sharded onto devices). Other attributes
    (``image_shape``, ``num_examples``, ``autoencoder``, ...) are the wrapped dataset's."""

    def __init__(self, dataset, model: Any):
        if "caption" not in getattr(dataset, "annotation_keys", ()):
            raise ValueError(
                f"A text-conditioned model needs captions, but the batches of {dataset!r} have none: use a captioned "
                "dataset (data.name='shapes') with data.conditional=True.")
        self.dataset, self.model = dataset, model
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __getattr__(self, name):  # only called for attributes this wrapper lacks
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __repr__(self) -> str:
        return f"TokenizedCaptions({self.dataset!r}, max_length={self.model.max_length})"

    def _convert(self, batch: dict) -> dict:
        captions = [str(c) for c in batch["caption"]]
        missing = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if missing:
            for c, ids, mask in zip(missing, *self.model.tokenize(missing)):
                self._cache[c] = (ids, mask)
        out = {"image": batch["image"],
               "input_ids": np.stack([self._cache[c][0] for c in captions]),
               "attention_mask": np.stack([self._cache[c][1] for c in captions])}
        return out

    def batch(self, step: int, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        return self._convert(self.dataset.batch(step, rows))

    def iterate(self, start_step: int = 0, **kwargs):
        return (self._convert(b) for b in self.dataset.iterate(start_step, **kwargs))
