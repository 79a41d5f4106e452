"""Evaluation: FID / Inception Score / precision-recall with pytorch-fid's Inception (``jaxdiff.eval.fid``);
classifier-feature Frechet distance and sample quality on the embedded digits;
pixel-based prompt adherence on the embedded ``shapes`` (``jaxdiff.eval.shapes``); reconstruction
PSNR of autoencoders (``psnr``).

CLI: ``python -m jaxdiff.eval --samples samples.npz [--data_dir DIR] [--json out.json]``;
``python -m jaxdiff.eval --fid --samples S.npz --ref REF --inception inception_fid.safetensors``.
"""
from jaxdiff.eval.classifier import Classifier, DigitsCNN, evaluate_digits, train_digits_classifier
from jaxdiff.eval import fid
from jaxdiff.eval.fid import FIDEvaluator, inception_score, precision_recall, reference_stats
from jaxdiff.eval.frechet import frechet_distance, frechet_distance_from_stats, gaussian_stats
from jaxdiff.eval import shapes
from jaxdiff.eval.psnr import psnr
from jaxdiff.eval.shapes import adherence as shapes_adherence
from jaxdiff.eval.shapes import adherence_to_captions as shapes_adherence_to_captions

__all__ = [
    "Classifier",
    "DigitsCNN",
    "FIDEvaluator",
    "evaluate_digits",
    "fid",
    "frechet_distance",
    "frechet_distance_from_stats",
    "gaussian_stats",
    "inception_score",
    "precision_recall",
    "psnr",
    "reference_stats",
    "shapes",
    "shapes_adherence",
    "shapes_adherence_to_captions",
    "train_digits_classifier",
]
