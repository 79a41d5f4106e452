"""Bits/dim of a trained pixel-space run on a dataset split: the variational bound that the DDPM,
iDDPM and VDM tables report (Ho et al. 2020, eq. 5: the prior term, the T-1 KL terms and the
discretised decoder term), averaged over every example of the split.

    >>> from jaxdiff import runs
    >>> from jaxdiff.eval.bpd import dataset_bpd
    >>> dataset_bpd(runs.load_run("runs/ddpm_digits"), split="test")["bpd"]

Every batch runs :func:`jaxdiff.diffusion.calc_bpd` (all T timesteps in one ``lax.scan``) on the
run's EMA params, split over the mesh the params live on (all devices, every process; a short last
batch is padded and the padding dropped). Batch ``i`` draws its noise from ``fold_in(key, i)``, so
the figure does not depend on the number of devices; each process reads only its rows of a batch.
A class-conditional model is scored given each
example's true label (the conditional likelihood).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import numpy as np
from tqdm import tqdm

from jaxdiff import parallel, xla
from jaxdiff.data import ImageDataset
from jaxdiff.diffusion import Denoiser, calc_bpd


@functools.lru_cache(maxsize=8)
def _bpd_fn(model):
    """``(params, schedule, x0 [B,H,W,C], labels [B] or None, key) -> {"total_bpd", "prior_bpd",
    "terms_bpd"}``, jitted once per model."""
    def fn(params, schedule, x0, labels, key):
        def model_fn(x_t, t):
            return model.apply(params, x_t, t, labels)

        out = calc_bpd(Denoiser(model_fn, model.prediction), schedule, x0, key)
        return {k: out[k] for k in ("total_bpd", "prior_bpd", "terms_bpd")}

    return xla.jit(fn)


def dataset_bpd(run, *, split: str = "test", batch_size: int = 100, key: Optional[jax.Array] = None,
                data_dir: Optional[str] = None, progress: bool = True) -> dict:
    """Bits/dim of ``run`` (:func:`jaxdiff.runs.load_run`) on every example of ``split`` of its dataset.

    Returns ``{"bpd", "prior_bpd", "decoder_bpd" (the t = 0 term), "num_examples", "split"}``
    (float64 means over the examples). Raises ValueError for a latent or text-to-image run (their
    bound is not over pixels) or a dataset without ``split``.
    """
    model, config = run.model, run.config
    if model.autoencoder is not None or model.text_conditional:
        raise ValueError("bits/dim is defined here for pixel-space class-conditional or unconditional runs; this "
                         "run is a latent or text-to-image model.")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    d = config.data
    ds = ImageDataset(d.name, split, batch_size=1, image_size=d.image_size, data_dir=data_dir or d.data_dir,
                      drop_labels=not model.conditional, cache_in_memory=False)
    key = jax.random.key(0) if key is None else key
    sharding = jax.tree.leaves(run.params)[0].sharding
    mesh = sharding.mesh if isinstance(sharding, jax.sharding.NamedSharding) else None
    devices = 1 if mesh is None else parallel.batch_devices(mesh)
    size = -(-batch_size // devices) * devices
    rows = np.arange(size) if mesh is None else parallel.host_rows(size, mesh)  # this process reads only these
    fn = _bpd_fn(model)
    sums = {"bpd": 0.0, "prior_bpd": 0.0, "decoder_bpd": 0.0}
    n = ds.num_examples
    bar = tqdm(total=n, desc=f"bpd {split}", disable=not (progress and parallel.is_writer()), dynamic_ncols=True)
    for i, lo in enumerate(range(0, n, size)):
        idx = np.minimum(np.arange(lo, lo + size), n - 1)  # the last batch padded with its last example
        images, labels = ds.examples(idx[rows])
        batch = {"x0": images.astype(np.float32) / 127.5 - 1.0, "labels": labels if model.conditional else None}
        if mesh is not None:
            batch = parallel.global_batch(batch, rows, size, mesh)
        out = parallel.to_host(fn(run.params, run.schedule, batch["x0"], batch["labels"], jax.random.fold_in(key, i)))
        m = min(size, n - lo)
        sums["bpd"] += float(np.sum(out["total_bpd"][:m], dtype=np.float64))
        sums["prior_bpd"] += float(np.sum(out["prior_bpd"][:m], dtype=np.float64))
        sums["decoder_bpd"] += float(np.sum(out["terms_bpd"][:m, 0], dtype=np.float64))
        bar.update(m)
    bar.close()
    return {**{k: v / n for k, v in sums.items()}, "num_examples": int(n), "split": split}
