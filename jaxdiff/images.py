"""Images on the host: [-1, 1] floats to uint8, grids, PNG and npz files."""
from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image


def to_uint8(x: jax.Array, value_range: tuple[float, float] = (-1.0, 1.0)) -> jax.Array:
    """Float images -> uint8 [0, 255]: ``value_range`` maps linearly to [0, 255], then rounded (half to
    even) and clipped. The default (-1, 1) is the models' pixel range; (0, 1) is diffusers'
    ``output_type="np"`` (:func:`jaxdiff.text_to_image.text_to_image`), rounded as its ``numpy_to_pil``."""
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"to_uint8: value_range must be (low, high) with high > low, got {value_range!r}.")
    return jnp.clip(jnp.round((x - lo) * (255.0 / (hi - lo))), 0, 255).astype(jnp.uint8)


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 1) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 [rows*(H+pad)+pad, ncol*(W+pad)+pad, C] image."""
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"make_grid needs uint8 [N, H, W, C], got {images.dtype} {images.shape}.")
    n, h, w, c = images.shape
    ncol = ncol or int(np.ceil(np.sqrt(n)))
    nrow = int(np.ceil(n / ncol))
    grid = np.zeros((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = images[i]
    return grid


def save_png(path: str, image: np.ndarray, scale: int = 1) -> None:
    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


def save_samples(path: str, images: np.ndarray, labels: np.ndarray | None = None, ncol: int | None = None,
                 prompts: Sequence[str] | None = None) -> None:
    """Write ``path.png`` (a grid, upscaled for small images) and ``path.npz`` (``images``, and
    ``labels`` int32 [N] / ``prompts`` str [N] when given)."""
    path = path[:-4] if path.endswith((".png", ".npz")) else path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if ncol is None and labels is not None:
        ncol = int(len(np.unique(labels)))
    h = images.shape[1]
    save_png(path + ".png", make_grid(images, ncol), scale=max(1, 64 // h))
    arrays = {"images": images}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, np.int32)
    if prompts is not None:
        arrays["prompts"] = np.asarray(list(prompts), dtype=str)
    np.savez(path + ".npz", **arrays)
