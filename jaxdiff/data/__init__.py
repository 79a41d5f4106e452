"""Datasets and host input pipelines: TFDS array_record sources read without TensorFlow.

``digits`` (sklearn's 8x8 handwritten digits, built locally on first use) is the embedded default;
``shapes`` (procedural captioned 32x32 shapes, ``jaxdiff.data.shapes``) is the embedded text-to-image
dataset, also built on first use; any other TFDS dataset prepared as array_record in the data dir is
read the same way.
"""
from jaxdiff.data.pipeline import (
    DatasetNotPreparedError,
    ImageDataset,
    default_data_dir,
    get_builder,
    load_source,
    real_images,
    resize_image,
)

__all__ = [
    "DatasetNotPreparedError",
    "ImageDataset",
    "default_data_dir",
    "get_builder",
    "load_source",
    "real_images",
    "resize_image",
]
