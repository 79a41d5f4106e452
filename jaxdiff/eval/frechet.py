"""Frechet distance between Gaussians fitted to two feature sets (the FID formula, Heusel et al. 2017).

    d^2 = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2})

computed in float64 with ``scipy.linalg.sqrtm`` and pytorch-fid's numerical-stability handling.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg


def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``feats: [N, D]`` -> (mean ``[D]``, unbiased covariance ``[D, D]``), float64."""
    feats = np.asarray(feats, np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got shape {feats.shape}.")
    return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def frechet_distance_from_stats(mu_a, sigma_a, mu_b, sigma_b, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu_a, sigma_a) and N(mu_b, sigma_b), as in pytorch-fid."""
    mu_a, mu_b = np.atleast_1d(np.asarray(mu_a, np.float64)), np.atleast_1d(np.asarray(mu_b, np.float64))
    sigma_a, sigma_b = np.atleast_2d(np.asarray(sigma_a, np.float64)), np.atleast_2d(np.asarray(sigma_b, np.float64))
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape or sigma_a.shape != mu_a.shape * 2:
        raise ValueError(f"Mismatched statistics: mu {mu_a.shape} vs {mu_b.shape}, "
                         f"sigma {sigma_a.shape} vs {sigma_b.shape}.")
    diff = mu_a - mu_b
    covmean = scipy.linalg.sqrtm(sigma_a @ sigma_b)
    if not np.isfinite(covmean).all():
        # Product might be almost singular: add eps to the diagonals (pytorch-fid).
        offset = np.eye(sigma_a.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag)):.3g} in sqrtm(S_a S_b): "
                             "the covariances are too ill-conditioned (too few samples for the feature dim?).")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(covmean))


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to ``feats_a: [N_a, D]`` and ``feats_b: [N_b, D]``."""
    mu_a, sigma_a = gaussian_stats(feats_a)
    mu_b, sigma_b = gaussian_stats(feats_b)
    return frechet_distance_from_stats(mu_a, sigma_a, mu_b, sigma_b, eps=eps)
