"""Evaluation: classifier-feature Frechet distance and sample quality on the embedded digits;
pixel-based prompt adherence on the embedded ``shapes`` (``jaxdiff.eval.shapes``); reconstruction
PSNR of autoencoders (``psnr``).

CLI: ``python -m jaxdiff.eval --samples samples.npz [--data_dir DIR] [--json out.json]``.
"""
from jaxdiff.eval.classifier import Classifier, DigitsCNN, evaluate_digits, train_digits_classifier
from jaxdiff.eval.frechet import frechet_distance, frechet_distance_from_stats, gaussian_stats
from jaxdiff.eval import shapes
from jaxdiff.eval.psnr import psnr
from jaxdiff.eval.shapes import adherence as shapes_adherence
from jaxdiff.eval.shapes import adherence_to_captions as shapes_adherence_to_captions

__all__ = [
    "Classifier",
    "DigitsCNN",
    "evaluate_digits",
    "frechet_distance",
    "frechet_distance_from_stats",
    "gaussian_stats",
    "psnr",
    "shapes",
    "shapes_adherence",
    "shapes_adherence_to_captions",
    "train_digits_classifier",
]
