"""The embedded captioned dataset ``shapes``: one coloured shape on black, with a caption.

Procedural and deterministic (no download): every example is drawn from
``np.random.Generator(np.random.PCG64([SEED, split_seed]))``, rendered with NumPy and written as a
real TFDS dataset in ``array_record`` format without TensorFlow (images as PNG bytes), then read
back with ``builder.as_data_source`` like ``digits``.

    >>> caption(0, 0, 0)                      # 'a red circle at the top left'
    >>> caption(1, 2, 4)                      # 'a blue square in the center'
    >>> all_prompts()[:2], all_labels()[:2]   # the 189 prompts and their (shape, color, position)
    >>> ex = generate(8, seed=0)              # {'image': uint8 [8, 32, 32, 3], 'caption': [8] str, ...}

An image is 32x32 RGB uint8 with exactly one shape from ``SHAPES`` in a pure colour from
``COLORS`` (channels 0 or 255) centred in one cell of a 3x3 grid (``POSITIONS``; cell centres at
16 + {-10, 0, +10} px, jittered uniformly by up to 1 px on each axis). The size ``s`` is drawn
uniformly from [4, 5] px: circles have radius ``s``, squares (axis-aligned) half-size ``0.9 s``,
triangles point up and fill the box of half-size ``s`` (apex at the top centre, base at the
bottom), so every shape stays inside the image and its cell. Shapes are drawn 4x supersampled and
box-downsampled: interior pixels are the pure colour, edge pixels a darker shade of it. (The
supersampling quantises centres and sizes to about 1/4 px, so identical renderings recur now and
then: 1.2% of ``train`` images are repeats, and 23 of the 1,000 ``test`` images also occur in
``train``.)

Labels are balanced: each of the 189 (shape, color, position) combinations appears ``N // 189``
times, ``N % 189`` random distinct ones once more, in random order. Each caption uses one of
``TEMPLATES``, drawn uniformly.

Features:
    image: uint8 [32, 32, 3] (PNG)
    caption: Text, e.g. "a green triangle on the right"
    shape: ClassLabel(SHAPES), color: ClassLabel(COLORS), position: ClassLabel(POSITIONS)
    index: int64, the example's position in ``generate(N, split_seed)`` (TFDS stores records in
        its own hash-of-key order; ``index`` maps back)

Splits: ``train`` 10,000 examples (split seed 0), ``test`` 1,000 (split seed 1). Building both takes
a few seconds and is race-safe in the same way as ``digits``.
"""
from __future__ import annotations

import re
import struct
import zlib
from typing import Iterator, Optional

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from jaxdiff.data.builders import DatasetSpec, as_text, data_source, default_data_dir, prepare_local_builder

NAME = "shapes"
SHAPES_VERSION = "1.0.0"
IMAGE_SIZE = 32
SEED = 20240601
SPLITS = {"train": (10_000, 0), "test": (1_000, 1)}  # split -> (num examples, split seed)

SHAPES = ["circle", "square", "triangle"]
COLORS = ["red", "green", "blue", "yellow", "magenta", "cyan", "white"]
POSITIONS = ["top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right"]
# RGB in {0, 1} of each colour in COLORS.
COLOR_RGB = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1]],
                     np.uint8)
CELL_OFFSET = 10.0  # px between neighbouring cell centres
# (row, col) in {0, 1, 2} of each position; centre (x, y) = 16 + (col - 1, row - 1) * CELL_OFFSET.
POSITION_GRID = np.array([(r, c) for r in range(3) for c in range(3)], np.int64)
# The phrase each position takes in a caption ("in the center", "on the left", "at the top").
WHERE = {p: ("in the center" if p == "center" else
             f"on the {p}" if p in ("left", "right") else f"at the {p}") for p in POSITIONS}
TEMPLATES = [
    "a {color} {shape} {where}",
    "a small {color} {shape} {where}",
    "there is a {color} {shape} {where}",
    "a {color} {shape} {where} on a black background",
]
NUM_PROMPTS = len(SHAPES) * len(COLORS) * len(POSITIONS)  # 189

_SUPERSAMPLE = 4
_SIZE_RANGE = (4.0, 5.0)
_JITTER = 1.0
_SQUARE_SCALE = 0.9
_WINDOW = 14  # px side of the window a shape is drawn in


# ----------------------------------------------------------------------------------- prompts
def caption(shape: int, color: int, position: int, template_index: int = 0) -> str:
    """The caption of ``(SHAPES[shape], COLORS[color], POSITIONS[position])`` with ``TEMPLATES[template_index]``."""
    return TEMPLATES[template_index].format(
        color=COLORS[color], shape=SHAPES[shape], where=WHERE[POSITIONS[position]])


def all_labels() -> np.ndarray:
    """Every ``(shape, color, position)`` combination: int32 [189, 3], shape-major then colour, position."""
    s, c, p = np.meshgrid(np.arange(len(SHAPES)), np.arange(len(COLORS)), np.arange(len(POSITIONS)),
                          indexing="ij")
    return np.stack([s.ravel(), c.ravel(), p.ravel()], axis=1).astype(np.int32)


HOLDOUTS = ("compositional",)


def holdout_labels(name: str) -> np.ndarray:
    """The ``(shape, color, position)`` combinations a held-out split named ``name`` leaves out of
    training (``ImageDataset(..., holdout=name)``, config ``data.holdout``): int32 [k, 3].

    ``"compositional"``: 21 combinations, one per (shape, colour), at position
    ``(3 * shape + color) % 9``. Every shape, colour and position, and every *pair* of them
    (shape-colour, shape-position, colour-position), still occurs in training; only these triples
    are new at test time: can the model compose attributes it has only seen apart?
    """
    if name == "compositional":
        rows = [(s, c, (3 * s + c) % len(POSITIONS)) for s in range(len(SHAPES)) for c in range(len(COLORS))]
        return np.asarray(rows, np.int32)
    raise ValueError(f"Unknown holdout {name!r}; choose one of {HOLDOUTS}.")


def is_held_out(labels: np.ndarray, name: str) -> np.ndarray:
    """bool [N]: which rows of ``labels`` (int [N, 3] of (shape, color, position)) ``name`` holds out."""
    labels = np.asarray(labels)
    held = holdout_labels(name)
    return (labels[:, None, :] == held[None, :, :]).all(-1).any(-1)


def held_out_examples(examples, name: str) -> np.ndarray:
    """bool [N]: which of a split's decoded examples (dicts with ``shape``, ``color``, ``position``)
    ``name`` holds out; raises ValueError for an unknown name, even with no examples
    (``SPEC.holdout``, used by ``ImageDataset(..., holdout=name)``)."""
    labels = np.asarray([[e["shape"], e["color"], e["position"]] for e in examples], np.int64)
    return is_held_out(labels.reshape(-1, 3), name)


def all_prompts(template_index: int = 0) -> list[str]:
    """The 189 captions of ``all_labels()`` rows, in that order, with ``TEMPLATES[template_index]``."""
    return [caption(*map(int, row), template_index) for row in all_labels()]


def vocabulary() -> list[str]:
    """Every word of every caption (templates, colours, shapes, positions), in first-seen order:
    the word list of a :class:`jaxdiff.tokenizers.WordTokenizer` for this dataset."""
    words: list[str] = []
    texts = [re.sub(r"\{\w+\}", " ", t) for t in TEMPLATES] + COLORS + SHAPES + list(WHERE.values())
    for text in texts:
        for w in re.findall(r"\w+", text):
            if w not in words:
                words.append(w)
    return words


_CAPTION_RE = re.compile(
    r"\b(" + "|".join(COLORS) + r") (" + "|".join(SHAPES) + r") ("
    + "|".join(sorted(map(re.escape, WHERE.values()), key=len, reverse=True)) + r")\b")
_WHERE_TO_POSITION = {w: POSITIONS.index(p) for p, w in WHERE.items()}


def parse_caption(text: str) -> tuple[int, int, int]:
    """Inverse of ``caption`` (any template): ``(shape, color, position)`` ids.

    Raises:
      ValueError: the text names no ``"<color> <shape> <where>"`` of this dataset.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    m = _CAPTION_RE.search(str(text))
    if m is None:
        raise ValueError(f"Not a shapes caption: {text!r}.")
    return SHAPES.index(m.group(2)), COLORS.index(m.group(1)), _WHERE_TO_POSITION[m.group(3)]


# --------------------------------------------------------------------------------- rendering
def cell_centers(image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Centres ``(x, y)`` in pixels of the 9 cells, in ``POSITIONS`` order: float64 [9, 2].

    Pixel ``(i, j)`` covers ``[j, j + 1] x [i, i + 1]``; for other image sizes the grid scales.
    """
    scale = image_size / IMAGE_SIZE
    rc = POSITION_GRID.astype(np.float64)
    return np.stack([IMAGE_SIZE / 2 + (rc[:, 1] - 1) * CELL_OFFSET,
                     IMAGE_SIZE / 2 + (rc[:, 0] - 1) * CELL_OFFSET], axis=1) * scale


def render(shape: np.ndarray, color: np.ndarray, cx: np.ndarray, cy: np.ndarray,
           size: np.ndarray) -> np.ndarray:
    """Draws one shape per image: int ids and float centres/sizes [N] -> uint8 [N, 32, 32, 3].

    ``size`` is the circle's radius, the triangle's half-width (and half-height) and the square's
    half-side over 0.9 (sizes up to 6 px). Coverage is computed on a 4x supersampled grid and
    box-averaged, only in a 14x14 px window around each shape.
    """
    shape, color = np.asarray(shape), np.asarray(color)
    cx, cy = np.asarray(cx, np.float64), np.asarray(cy, np.float64)
    n, k, w = len(shape), _SUPERSAMPLE, _WINDOW
    x0 = np.clip(np.floor(cx).astype(np.int64) - w // 2, 0, IMAGE_SIZE - w)
    y0 = np.clip(np.floor(cy).astype(np.int64) - w // 2, 0, IMAGE_SIZE - w)
    g = (np.arange(w * k) + 0.5) / k
    dx = g[None, None, :] - (cx - x0)[:, None, None]
    dy = g[None, :, None] - (cy - y0)[:, None, None]
    s = np.asarray(size, np.float64)[:, None, None]
    mask = np.empty((n, w * k, w * k), bool)
    for sid, inside in enumerate([
            lambda dx, dy, s: dx * dx + dy * dy <= s * s,
            lambda dx, dy, s: (np.abs(dx) <= _SQUARE_SCALE * s) & (np.abs(dy) <= _SQUARE_SCALE * s),
            lambda dx, dy, s: (np.abs(dy) <= s) & (2 * np.abs(dx) <= dy + s)]):
        i = np.flatnonzero(shape == sid)
        mask[i] = inside(dx[i], dy[i], s[i])
    coverage = mask.reshape(n, w, k, w, k).mean(axis=(2, 4), dtype=np.float32)
    rgb = COLOR_RGB[color].astype(np.float32)[:, None, None, :]
    patch = np.round(coverage[..., None] * rgb * 255.0).astype(np.uint8)
    images = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    rows = (y0[:, None] + np.arange(w))[:, :, None]
    cols = (x0[:, None] + np.arange(w))[:, None, :]
    images[np.arange(n)[:, None, None], rows, cols] = patch
    return images


def generate(num: int, seed: int, chunk: int = 2000) -> dict[str, np.ndarray]:
    """``num`` examples drawn from ``PCG64([SEED, seed])``, a pure function of ``(num, seed)``.

    Returns:
      ``{'image': uint8 [num, 32, 32, 3], 'caption': str [num], 'shape', 'color', 'position',
      'template': int32 [num]}``.
    """
    rng = np.random.Generator(np.random.PCG64([SEED, int(seed)]))
    full, rest = divmod(num, NUM_PROMPTS)
    labels = np.concatenate([np.tile(all_labels(), (full, 1)),
                             all_labels()[np.sort(rng.permutation(NUM_PROMPTS)[:rest])]])
    labels = labels[rng.permutation(num)]
    template = rng.integers(0, len(TEMPLATES), num).astype(np.int32)
    size = rng.uniform(*_SIZE_RANGE, num)
    jitter = rng.uniform(-_JITTER, _JITTER, (num, 2))
    centre = cell_centers()[labels[:, 2]] + jitter
    images = np.empty((num, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for a in range(0, num, chunk):
        b = min(num, a + chunk)
        images[a:b] = render(labels[a:b, 0], labels[a:b, 1], centre[a:b, 0], centre[a:b, 1], size[a:b])
    captions = np.array([caption(*map(int, l), int(t)) for l, t in zip(labels, template)], dtype=str)
    return {"image": images, "caption": captions, "shape": labels[:, 0].copy(),
            "color": labels[:, 1].copy(), "position": labels[:, 2].copy(), "template": template}


# ------------------------------------------------------------------------------------- TFDS
def _png(image: np.ndarray) -> bytes:
    """``image: uint8 [H, W, 3]`` as PNG bytes (8-bit RGB, no filter, zlib level 6).

    A minimal encoder: PIL's ``Image.save`` costs ~0.3 ms of Python per tiny image, most of the
    build time; this writes the same pixels in ~0.03 ms. Any PNG decoder (PIL, TFDS) reads it.
    """
    h, w, _ = image.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), image.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


class Shapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder for the embedded shapes (kept out of TFDS's global registry on purpose)."""

    VERSION = tfds.core.Version(SHAPES_VERSION)
    RELEASE_NOTES = {SHAPES_VERSION: "Procedural 32x32 shapes with captions, 10,000 train / 1,000 test."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)  # see Digits.code_path

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="One coloured circle, square or triangle on black at one of 9 positions, "
                        "with a caption naming its colour, shape and position.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="png"),
                "caption": tfds.features.Text(),
                "shape": tfds.features.ClassLabel(names=SHAPES),
                "color": tfds.features.ClassLabel(names=COLORS),
                "position": tfds.features.ClassLabel(names=[p.replace(" ", "_") for p in POSITIONS]),
                "index": tfds.features.Scalar(dtype=np.int64),
            }),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the data is procedural
        return {split: self._generate_examples(num, seed) for split, (num, seed) in SPLITS.items()}

    def _generate_examples(self, num: int, seed: int) -> Iterator[tuple[int, dict]]:
        ex = generate(num, seed)
        for i in range(num):
            yield i, {"image": _png(ex["image"][i]), "caption": str(ex["caption"][i]),
                      "shape": int(ex["shape"][i]), "color": int(ex["color"][i]),
                      "position": int(ex["position"][i]), "index": i}


def shapes_builder(data_dir: str) -> Shapes:
    """Returns the shapes builder over ``data_dir``, preparing it there first if needed (race-safe)."""
    return prepare_local_builder(Shapes, data_dir, NAME, SHAPES_VERSION)


def load_split(split: str, data_dir: Optional[str] = None) -> dict[str, np.ndarray]:
    """A whole split of the prepared dataset, in ``index`` order (built on first use).

    Returns:
      ``{'image': uint8 [N, 32, 32, 3], 'caption': str [N], 'shape', 'color', 'position': int32 [N],
      'index': int64 [N]}``; equal to ``generate(*SPLITS[split])`` field by field.
    """
    source = data_source(shapes_builder(default_data_dir(data_dir)), split)
    examples = source.__getitems__(list(range(len(source))))
    index = np.array([ex["index"] for ex in examples], np.int64)
    order = np.argsort(index)
    out = {"image": np.stack([np.asarray(ex["image"]) for ex in examples]),
           "caption": np.array([as_text(ex["caption"]) for ex in examples], dtype=str)}
    for key in ("shape", "color", "position"):
        out[key] = np.array([ex[key] for ex in examples], np.int32)
    out["index"] = index
    return {k: v[order] for k, v in out.items()}


SPEC = DatasetSpec(
    NAME, shapes_builder, annotations=("caption", "shape", "color", "position"),
    random_flip_error="random_flip would mirror shapes left-right away from the positions "
                      "their captions name; use random_flip=False for 'shapes'.",
    holdout=held_out_examples)
