"""Evaluation: classifier-feature Frechet distance and sample quality on the embedded digits.

CLI: ``python -m jaxdiff.eval --samples samples.npz [--data_dir DIR] [--json out.json]``.
"""
from jaxdiff.eval.classifier import Classifier, DigitsCNN, evaluate_digits, train_digits_classifier
from jaxdiff.eval.frechet import frechet_distance, frechet_distance_from_stats, gaussian_stats

__all__ = [
    "Classifier",
    "DigitsCNN",
    "evaluate_digits",
    "frechet_distance",
    "frechet_distance_from_stats",
    "gaussian_stats",
    "train_digits_classifier",
]
