"""Prompt adherence on the embedded ``shapes`` dataset, read off the pixels (no learned model).

    >>> predict(images)            # uint8 [N, 32, 32, 3] -> {'shape', 'color', 'position': int32 [N]}
    >>> adherence(images, shape_ids, color_ids, position_ids)
    {'shape_accuracy': ..., 'color_accuracy': ..., 'position_accuracy': ..., 'all_accuracy': ...,
     'shape_chance': 1/3, 'color_chance': 1/7, 'position_chance': 1/9, 'all_chance': 1/189, ...}
    >>> adherence_to_captions(images, captions)   # the same, with the ids parsed from the prompts

How each attribute is read (ids index ``SHAPES``, ``COLORS``, ``POSITIONS`` of ``jaxdiff.data.shapes``):

* foreground: brightness = max over RGB; pixels at least half the image's 99th-percentile
  brightness, largest 8-connected blob. An image whose 99th percentile is below
  ``MIN_LEVEL`` (nothing drawn) has no foreground and gets -1 for every attribute (always wrong).
* colour: the blob's mean RGB divided by its largest channel; each channel is on if above 0.5.
  This is the nearest of the 7 pure colours, and it ignores brightness.
* position: the shape's brightness-weighted centroid, nearest of the 9 cell centres
  (16 + {-10, 0, 10} px, scaled with the image size).
* shape: from brightness-weighted moments of the shape (see ``features``). Circles and squares are
  point-symmetric, triangles are not: triangle if the skewness ``|(k3_x, k3_y)| / var^1.5`` exceeds
  ``SKEW_TRIANGLE`` (~0.68 for the dataset's triangles, < 0.07 for the others). A square's
  4th cumulant differs between its diagonals and its axes ((k4_diag - k4_axis) / var^2 ~ 0.6 for a
  uniform square, exactly 0 for a disc): square if that exceeds ``SQUARENESS_SQUARE`` in magnitude
  (a square turned 45 degrees also counts), else circle. Cumulants are unchanged by a symmetric
  blur, so blurry samples keep these signatures.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from jaxdiff.data.shapes import COLOR_RGB, COLORS, POSITIONS, SHAPES, cell_centers, parse_caption

MIN_LEVEL = 64         # 99th-percentile brightness below which an image counts as empty
REL_THRESHOLD = 0.5    # foreground: brightness >= REL_THRESHOLD * 99th-percentile brightness
SKEW_TRIANGLE = 0.2       # triangle if the skewness exceeds this (upward triangles: ~0.68)
SQUARENESS_SQUARE = 0.25  # else square if |squareness| exceeds this (squares ~0.6, discs ~0)
# 8-connectivity within each image of an [N, H, W] stack, none across images.
_EIGHT = np.zeros((3, 3, 3), bool)
_EIGHT[1] = True
_CHUNK = 1024
# Colour id of each on/off channel pattern r*4 + g*2 + b (0: black, never produced).
_CODE_TO_COLOR = np.full(8, -1, np.int32)
_CODE_TO_COLOR[COLOR_RGB @ np.array([4, 2, 1])] = np.arange(len(COLORS))


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] < 1:
        raise ValueError(f"images must be a uint8 array [N, H, W, 3] with N >= 1, got "
                         f"{images.dtype} {images.shape}.")
    return images


def _level(bright: np.ndarray) -> np.ndarray:
    """99th-percentile brightness of each image: float [N]."""
    return np.percentile(bright.reshape(len(bright), -1), 99, axis=1)


def foreground(images: np.ndarray) -> np.ndarray:
    """The shape's pixels: ``images: uint8 [N, H, W, 3]`` -> bool [N, H, W] (all False if empty)."""
    images = _check_images(images)
    n = len(images)
    bright = images.max(axis=-1)
    level = _level(bright)
    mask = (bright >= REL_THRESHOLD * level[:, None, None]) & (level >= MIN_LEVEL)[:, None, None]
    # One labelling for the whole batch: 8-connected within an image, never across images.
    labels, count = ndimage.label(mask, structure=_EIGHT)
    if count == 0:
        return mask
    size = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    image_of = np.empty(count + 1, np.int64)
    image_of[labels.ravel()] = np.repeat(np.arange(n), labels[0].size)
    image_of = image_of[1:]
    order = np.lexsort((size, image_of))  # by image, then size: each image's largest blob comes last
    last = np.r_[image_of[order][1:] != image_of[order][:-1], True]
    keep = np.zeros(count + 1, bool)
    keep[1 + order[last]] = True
    return keep[labels]


def features(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image measurements behind the predictions (NaN where the image is empty).

    Moments use soft weights ``w = min(brightness / level, 1)`` (``level``: the 99th-percentile
    brightness) over the foreground grown by one pixel, so anti-aliased or blurred edges count by
    how bright they are and background noise away from the shape does not count at all.

    Returns:
      ``{'empty': bool [N], 'centroid': float [N, 2] (x, y) in px, 'rgb': float [N, 3] mean colour
      of the foreground divided by its largest channel, 'skew': float [N] norm of the (x, y)
      skewness, 'squareness': float [N] (mean 4th cumulant along the diagonals - along the axes)
      / variance^2}``.
    """
    images = _check_images(images)
    if len(images) > _CHUNK:  # bounded memory: ~30 float64 copies of a chunk's pixels
        parts = [features(images[i:i + _CHUNK]) for i in range(0, len(images), _CHUNK)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    masks = foreground(images)
    n, h, w = masks.shape
    empty = ~masks.any(axis=(1, 2))
    bright = images.max(axis=-1).astype(np.float64)
    region = ndimage.binary_dilation(masks, _EIGHT)
    with np.errstate(invalid="ignore", divide="ignore"):
        rgb = (images * masks[..., None]).sum(axis=(1, 2)) / masks.sum(axis=(1, 2))[:, None]
        rgb = rgb / rgb.max(axis=1, keepdims=True)
        wt = np.minimum(bright / _level(bright)[:, None, None], 1.0) * region
        total = wt.sum(axis=(1, 2))
        ys, xs = np.mgrid[0:h, 0:w] + 0.5
        cx = (wt * xs).sum(axis=(1, 2)) / total
        cy = (wt * ys).sum(axis=(1, 2)) / total
        dx, dy = xs - cx[:, None, None], ys - cy[:, None, None]
        r = np.sqrt(0.5)
        k2, k3, k4 = [], [], []
        for p in (dx, dy, r * (dx + dy), r * (dx - dy)):  # the two axes, then the two diagonals
            wp2 = wt * p * p
            m2, m3, m4 = (q.sum(axis=(1, 2)) / total for q in (wp2, wp2 * p, wp2 * p * p))
            k2.append(m2), k3.append(m3), k4.append(m4 - 3 * m2 ** 2)
        var = np.mean(k2, axis=0)
        skew = np.hypot(k3[0], k3[1]) / var ** 1.5
        squareness = (k4[2] + k4[3] - k4[0] - k4[1]) / 2 / var ** 2
    nan = np.where(empty, np.nan, 1.0)
    return {"empty": empty, "centroid": np.stack([cx, cy], 1) * nan[:, None], "rgb": rgb * nan[:, None],
            "skew": skew * nan, "squareness": squareness * nan}


def _predict_from(f: dict[str, np.ndarray], image_size: tuple[int, int]) -> dict[str, np.ndarray]:
    empty = f["empty"]
    with np.errstate(invalid="ignore"):
        shape = np.where(f["skew"] > SKEW_TRIANGLE, 2, np.where(np.abs(f["squareness"]) > SQUARENESS_SQUARE, 1, 0))
        on = (f["rgb"] > 0.5).astype(np.int64)
    color = _CODE_TO_COLOR[on[:, 0] * 4 + on[:, 1] * 2 + on[:, 2]]
    h, w = image_size
    centres = cell_centers(w) * np.array([1.0, h / w])  # (x, y), scaled to the image's size
    d2 = ((f["centroid"][:, None, :] - centres[None]) ** 2).sum(-1)
    position = np.argmin(np.where(np.isnan(d2), np.inf, d2), axis=1)
    return {k: np.where(empty, -1, v).astype(np.int32)
            for k, v in (("shape", shape), ("color", color), ("position", position))}


def predict(images: np.ndarray) -> dict[str, np.ndarray]:
    """``images: uint8 [N, H, W, 3]`` -> ``{'shape', 'color', 'position': int32 [N]}``, -1 where empty."""
    images = _check_images(images)
    return _predict_from(features(images), images.shape[1:3])


def predict_shape(images: np.ndarray) -> np.ndarray:
    """Index into ``SHAPES`` of each image's shape: int32 [N], -1 where empty."""
    return predict(images)["shape"]


def predict_color(images: np.ndarray) -> np.ndarray:
    """Index into ``COLORS`` of each image's shape colour: int32 [N], -1 where empty."""
    return predict(images)["color"]


def predict_position(images: np.ndarray) -> np.ndarray:
    """Index into ``POSITIONS`` of each image's shape position: int32 [N], -1 where empty."""
    return predict(images)["position"]


def adherence(images: np.ndarray, shape_ids: np.ndarray, color_ids: np.ndarray,
              position_ids: np.ndarray) -> dict[str, float]:
    """How often images show what their prompts asked for.

    Args:
      images: uint8 [N, H, W, 3], e.g. samples for prompts ``caption(shape, color, position)``.
      shape_ids, color_ids, position_ids: int [N], the prompted attributes.

    Returns:
      ``{'<attr>_accuracy', '<attr>_chance'}`` for attr in shape, color, position and ``all`` (all
      three right; chance 1/189), plus ``'empty_fraction'`` and ``'num_images'``.
    """
    images = _check_images(images)
    n = len(images)
    want = {}
    for name, ids, k in (("shape", shape_ids, len(SHAPES)), ("color", color_ids, len(COLORS)),
                         ("position", position_ids, len(POSITIONS))):
        ids = np.asarray(ids)
        if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= k:
            raise ValueError(f"{name}_ids must be ints in [0, {k}) of shape ({n},), got {ids.dtype} {ids.shape}.")
        want[name] = ids
    got = predict(images)
    right = {k: got[k] == want[k] for k in want}
    out: dict[str, float] = {}
    for k, chance in (("shape", 1 / len(SHAPES)), ("color", 1 / len(COLORS)),
                      ("position", 1 / len(POSITIONS))):
        out[f"{k}_accuracy"] = float(right[k].mean())
        out[f"{k}_chance"] = chance
    out["all_accuracy"] = float((right["shape"] & right["color"] & right["position"]).mean())
    out["all_chance"] = 1 / (len(SHAPES) * len(COLORS) * len(POSITIONS))
    out["empty_fraction"] = float((got["shape"] < 0).mean())
    out["num_images"] = n
    return out


def adherence_to_captions(images: np.ndarray, captions: Sequence[str]) -> dict[str, float]:
    """``adherence`` with the prompted attributes parsed from ``captions`` (``parse_caption``)."""
    ids = np.array([parse_caption(c) for c in captions], np.int64).reshape(-1, 3)
    return adherence(images, ids[:, 0], ids[:, 1], ids[:, 2])
