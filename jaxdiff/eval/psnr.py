"""Peak signal-to-noise ratio of reconstructions, and the VAE's reconstruction PSNR on held-out digits.

    >>> psnr(images, reconstructions)         # uint8 [N, H, W, C] each -> {'psnr': dB, ...}
    >>> digits_reconstruction_psnr(fn, 32)     # fn: uint8 [n, 32, 32, 1] -> uint8 reconstructions

PSNR = 10 log10(255^2 / MSE) on uint8 images (reconstructions rounded and clipped to uint8, as they
would be saved). ``psnr`` is computed from the MSE over every pixel of the set (so a few perfect
images cannot make it infinite); ``psnr_per_image_mean`` is the mean of per-image PSNRs (images
reconstructed exactly are left out of that mean and counted in ``num_exact``).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np


def psnr(reference: np.ndarray, reconstruction: np.ndarray, max_value: float = 255.0) -> dict[str, Any]:
    """PSNR figures of ``reconstruction`` against ``reference`` (same shape [N, ...], any numeric dtype,
    compared on the ``max_value`` scale; float64 arithmetic)."""
    a = np.asarray(reference, np.float64)
    b = np.asarray(reconstruction, np.float64)
    if a.shape != b.shape or a.ndim < 2 or len(a) == 0:
        raise ValueError(f"reference and reconstruction must have the same shape [N, ...] with N >= 1, "
                         f"got {a.shape} and {b.shape}.")
    err = np.square(a - b).reshape(len(a), -1).mean(axis=1)  # per-image MSE
    mse = float(err.mean())
    exact = err == 0
    per_image = 10.0 * np.log10(max_value ** 2 / err[~exact]) if (~exact).any() else np.array([np.inf])
    return {
        "psnr": float(10.0 * np.log10(max_value ** 2 / mse)) if mse > 0 else float("inf"),
        "psnr_per_image_mean": float(per_image.mean()),
        "mse": mse,
        "mae": float(np.abs(a - b).mean()),
        "num_images": int(len(a)),
        "num_exact": int(exact.sum()),
    }


def digits_reconstruction_psnr(reconstruct: Callable[[np.ndarray], np.ndarray], image_size: int,
                               split: str = "test", data_dir: Optional[str] = None) -> dict[str, Any]:
    """PSNR of ``reconstruct`` (uint8 [N, S, S, 1] -> uint8 [N, S, S, 1]) on the embedded digits'
    held-out ``test`` split (300 images), resized to ``image_size`` exactly as the training data."""
    from jaxdiff.data import real_images

    images, _ = real_images("digits", split, image_size, data_dir)
    rec = np.asarray(reconstruct(np.array(images)))
    if rec.shape != images.shape:
        raise ValueError(f"reconstruct returned {rec.shape}, expected {images.shape}.")
    if rec.dtype != np.uint8:
        raise ValueError(f"reconstruct must return uint8 images (rounded as saved), got {rec.dtype}.")
    return {"split": split, "image_size": int(image_size), **psnr(images, rec)}
