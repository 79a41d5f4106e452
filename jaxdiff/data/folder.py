"""The user's own images as a dataset: ``data.name = "folder:PATH"`` on any config.

Two layouts (as diffusers' training scripts and Hugging Face image folders have them):

- ``PATH/<class_name>/*.{png,jpg,jpeg,webp}``: class-conditional; the class names, sorted, are
  the label ids (``label`` feature, names kept in the dataset and in each run's metadata).
- ``PATH/*.{png,jpg,...}``: unlabelled, or captioned by ``PATH/metadata.jsonl`` (one
  ``{"file_name": "a.png", "text": "a caption"}`` per line) or by a ``.txt`` file beside each image
  (``a.png`` -> ``a.txt``); captioned images carry a ``caption`` Text feature.

Each image is decoded once, turned upright by its EXIF orientation, converted to RGB (greyscale is
replicated, alpha dropped), centre-cropped to a square and resized to ``image_size`` (PIL bicubic,
as :func:`jaxdiff.data.builders.resize_image`), and written as PNG into a TFDS array_record dataset
in the data dir (no TensorFlow), ``split="train"``. Files that do not decode are listed by name and
skipped, with their count, at build time; they can never stop a run mid-epoch.

Change detection: the dataset's name is ``folder_<fingerprint>``, a SHA-256 over the folder's
absolute path, the image size, and the relative path, size and modification time of every image
and caption file. An unchanged folder reuses its build; any added, removed, edited or touched file
builds a new one (the old stays in the data dir until removed).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image, ImageOps

from jaxdiff.data.builders import prepare_local_builder, resize_image

PREFIX = "folder:"
VERSION = "1.0.0"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


class FolderError(ValueError):
    """The folder cannot be a dataset (missing, empty, mixed layout, bad captions); one line says why."""


def is_folder(name: str) -> bool:
    return name.startswith(PREFIX)


def _images_in(directory: str) -> list[str]:
    return sorted(f for f in os.listdir(directory)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(directory, f)))


def scan(path: str) -> dict:
    """The folder's layout: ``{"path", "kind": "classes" | "captions" | "images", "files": [rel paths],
    "labels": [int] | None, "class_names": [str] | None, "captions": [str] | None, "inputs": [rel paths]}``
    (``inputs``: every file the dataset depends on, for the fingerprint)."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise FolderError(f"folder:{path} is not a directory: give --config.data.name=folder:PATH of a folder "
                          "of images (or of one folder of images per class).")
    top = _images_in(path)
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith(".")
                     and _images_in(os.path.join(path, d)))
    if top and classes:
        raise FolderError(f"{path} has images at its top level and in the class folders {classes[:3]}: use one "
                          "layout (PATH/<class>/*.png for classes, or PATH/*.png with captions).")
    if not top and not classes:
        raise FolderError(f"{path} has no images ({', '.join(IMAGE_EXTENSIONS)}) at its top level or in class "
                          "folders: add images, or point data.name=folder:PATH at the right folder.")
    if classes:
        files, labels = [], []
        for i, c in enumerate(classes):
            names = _images_in(os.path.join(path, c))
            files += [os.path.join(c, f) for f in names]
            labels += [i] * len(names)
        return {"path": path, "kind": "classes", "files": files, "labels": labels, "class_names": classes,
                "captions": None, "inputs": list(files)}
    meta = os.path.join(path, "metadata.jsonl")
    captions, inputs = None, list(top)
    if os.path.isfile(meta):
        by_name = {}
        with open(meta, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    by_name[str(row["file_name"])] = str(row["text"])
                except (ValueError, KeyError, TypeError):
                    raise FolderError(f"{meta} line {n} is not a JSON object with \"file_name\" and \"text\": "
                                      f"{line.strip()[:80]!r}") from None
        missing = [f for f in top if f not in by_name]
        if missing:
            raise FolderError(f"{meta} has no caption for {len(missing)} image(s), e.g. {missing[0]!r}: add a line "
                              "{\"file_name\": ..., \"text\": ...} for each image.")
        captions, inputs = [by_name[f] for f in top], inputs + ["metadata.jsonl"]
    else:
        txt = [os.path.splitext(f)[0] + ".txt" for f in top]
        have = [os.path.isfile(os.path.join(path, t)) for t in txt]
        if any(have):
            if not all(have):
                missing = [f for f, h in zip(top, have) if not h]
                raise FolderError(f"{path}: {len(missing)} image(s) have no .txt caption beside them, e.g. "
                                  f"{missing[0]!r}: caption every image, or none.")
            captions = []
            for t in txt:
                with open(os.path.join(path, t), encoding="utf-8") as f:
                    captions.append(" ".join(f.read().split()))
            inputs += txt
    return {"path": path, "kind": "captions" if captions is not None else "images", "files": top, "labels": None,
            "class_names": None, "captions": captions, "inputs": inputs}


def fingerprint(layout: dict, image_size: int) -> str:
    """SHA-256 (hex, 16 chars) of the folder path, the image size and every input's path, size, mtime."""
    h = hashlib.sha256(f"{layout['path']}\n{int(image_size)}\n".encode())
    for rel in sorted(layout["inputs"]):
        st = os.stat(os.path.join(layout["path"], rel))
        h.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def load_image(path: str, image_size: int) -> np.ndarray:
    """One file -> uint8 [image_size, image_size, 3]: EXIF-upright, RGB, centre-cropped, resized."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        img = img.convert("RGB")
        return resize_image(np.asarray(img), image_size)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _builder_class(layout: dict, image_size: int, fp: str):
    builder_name = f"folder_{fp}"
    skipped: list[str] = []  # files that did not decode, filled while the examples are written

    class Folder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = builder_name
        VERSION = tfds.core.Version(VERSION)

        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls) -> epath.Path:
            return epath.Path(__file__)

        def _info(self) -> tfds.core.DatasetInfo:
            features = {"image": tfds.features.Image(shape=(image_size, image_size, 3), encoding_format="png"),
                        "file": tfds.features.Text(), "index": tfds.features.Scalar(dtype=np.int64)}
            if layout["class_names"] is not None:
                features["label"] = tfds.features.ClassLabel(names=layout["class_names"])
            if layout["captions"] is not None:
                features["caption"] = tfds.features.Text()
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                         description=f"Images of {layout['path']} at {image_size}x{image_size}.")

        def _split_generators(self, dl_manager):
            del dl_manager
            return {"train": self._generate_examples()}

        def _generate_examples(self) -> Iterator[tuple[int, dict]]:
            """One image decoded at a time (a large folder never sits in memory)."""
            written = 0
            for i, rel in enumerate(layout["files"]):
                try:
                    png = _png(load_image(os.path.join(layout["path"], rel), image_size))
                except Exception as e:  # corrupt, truncated or not an image at all: listed and skipped
                    skipped.append(f"{rel} ({type(e).__name__})")
                    continue
                written += 1
                ex = {"image": png, "file": rel, "index": i}
                if layout["class_names"] is not None:
                    ex["label"] = layout["labels"][i]
                if layout["captions"] is not None:
                    ex["caption"] = layout["captions"][i]
                yield i, ex
            if not written:  # the build fails; its temporary folder is removed
                raise FolderError(f"none of the {len(layout['files'])} image files in {layout['path']} could be "
                                  f"read (e.g. {skipped[0]}).")

    return Folder, builder_name, skipped


def folder_builder(name: str, data_dir: str, image_size: int | None) -> tfds.core.DatasetBuilder:
    """The prepared builder of ``name = "folder:PATH"`` at ``image_size``, built on first use and
    whenever the folder changed (see the module docstring). Prints what it skipped when it builds."""
    if not image_size:
        raise FolderError(f"{name}: a folder dataset needs an image size: set --config.data.image_size=N.")
    layout = scan(name[len(PREFIX):])
    fp = fingerprint(layout, int(image_size))
    cls, tfds_name, skipped = _builder_class(layout, int(image_size), fp)
    prepared = cls(data_dir=data_dir, file_format="array_record").is_prepared()
    builder = prepare_local_builder(cls, data_dir, tfds_name, VERSION)
    if not prepared:
        n = len(layout["files"]) - len(skipped)
        print(f"Built {name} ({layout['kind']}, {n} images at {image_size}x{image_size}) into "
              f"{os.path.join(data_dir, tfds_name)}" + (f"; skipped {len(skipped)} unreadable file(s): "
                                                         f"{', '.join(skipped)}" if skipped else ""),
              file=sys.stderr, flush=True)
    return builder
