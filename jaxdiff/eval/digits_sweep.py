"""Guidance sweep of a class-conditional digits run, scored by two independent readers.

    >>> from jaxdiff import runs
    >>> from jaxdiff.eval.digits_sweep import guidance_sweep
    >>> rows = guidance_sweep(runs.load_run("runs/ddpm_digits"), [1, 2, 3, 4], num=500)
    >>> rows[0]["accuracy"], rows[0]["judge_accuracy"], rows[0]["frechet_ratio"]

Every scale samples the same ``num`` labels (0..9 cycling) from the same key, so the rows differ
only in the guidance scale. Each row holds the project classifier's figures
(:func:`jaxdiff.eval.evaluate_digits`: ``accuracy``, ``frechet``, ``frechet_real_vs_real`` at the
same N, ``frechet_ratio`` = their quotient) and the scikit-learn judge's
(:func:`jaxdiff.eval.judge.judge_digits`: ``judge_accuracy``, per-class accuracy, within-class
``diversity_ratio`` against real digits). :func:`svg_plot` draws the sweep.
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from jaxdiff import generation
from jaxdiff.eval.classifier import evaluate_digits
from jaxdiff.eval.judge import judge_digits


def guidance_sweep(run, guidance_scales: Sequence[float], *, num: int = 500, seed: int = 0,
                   batch_size: Optional[int] = 250, log: Optional[Callable[[str], None]] = None,
                   **sampler) -> list[dict]:
    """One row per guidance scale (see the module docstring); ``sampler`` overrides ``config.sample``."""
    if run.config.data.name != "digits" or not run.config.data.conditional:
        raise ValueError("the guidance sweep needs a class-conditional model trained on the embedded digits "
                         f"(this run: data.name={run.config.data.name!r}).")
    if num < 20:
        raise ValueError(f"num must be at least 20 (two samples per class), got {num}.")
    log = log or (lambda line: None)
    data_dir = run.config.data.data_dir
    rows = []
    for g in guidance_scales:
        t0 = time.perf_counter()
        images, labels = generation.generate(run.model, run.params, run.schedule, run.config, num=num,
                                             key=jax.random.key(seed), batch_size=batch_size,
                                             guidance=float(g), **sampler)
        seconds = time.perf_counter() - t0
        m = evaluate_digits(images, labels, data_dir=data_dir)
        j = judge_digits(images, labels)
        row = {"guidance": float(g), "num": num, "seconds": seconds,
               "accuracy": m["accuracy"], "frechet": m["frechet"], "frechet_real_vs_real": m["frechet_real_vs_real"],
               "frechet_ratio": m["frechet"] / m["frechet_real_vs_real"],
               "classifier_test_accuracy": m["classifier_test_accuracy"], **j}
        rows.append(row)
        log(f"guidance {g:g}: accuracy {row['accuracy']:.3f} (judge {row['judge_accuracy']:.3f}), Frechet "
            f"{row['frechet']:.2f} = {row['frechet_ratio']:.2f}x real-vs-real, diversity "
            f"{row['diversity_ratio']:.2f}x real ({seconds:.1f} s)")
    return rows


def svg_plot(rows: Sequence[dict], title: str = "") -> str:
    """A small SVG line chart of a sweep: accuracy (both readers) and the diversity ratio on the
    left axis (0..1.1), the Frechet ratio on the right axis, against the guidance scale."""
    W, H, L, R, T, B = 560, 320, 56, 56, 34, 44
    gs = [r["guidance"] for r in rows]
    x0, x1 = min(gs), max(gs)
    fr_max = max(2.0, max(r["frechet_ratio"] for r in rows) * 1.1)

    def px(g):
        return L + (W - L - R) * ((g - x0) / (x1 - x0) if x1 > x0 else 0.5)

    def py(v, top):
        return T + (H - T - B) * (1 - v / top)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
           f'font-size="11"><rect width="{W}" height="{H}" fill="white"/>']
    out.append(f'<text x="{W / 2}" y="16" text-anchor="middle" font-size="13">{title}</text>')
    for v in (0, 0.25, 0.5, 0.75, 1.0):
        y = py(v, 1.1)
        out.append(f'<line x1="{L}" x2="{W - R}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{L - 6}" y="{y + 4:.1f}" text-anchor="end">{v:.2f}</text>')
        out.append(f'<text x="{W - R + 6}" y="{y + 4:.1f}">{v * fr_max / 1.1:.2f}</text>')
    for g in gs:
        out.append(f'<text x="{px(g):.1f}" y="{H - B + 16}" text-anchor="middle">{g:g}</text>')
    out.append(f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle">guidance scale</text>')
    y15 = py(1.5 * 1.1 / fr_max, 1.1)
    out.append(f'<line x1="{L}" x2="{W - R}" y1="{y15:.1f}" y2="{y15:.1f}" stroke="#d62728" stroke-dasharray="2,3"/>')
    series = [("accuracy (project classifier)", "accuracy", "#1f77b4", 1.1),
              ("accuracy (sklearn SVM judge)", "judge_accuracy", "#2ca02c", 1.1),
              ("within-class diversity / real", "diversity_ratio", "#9467bd", 1.1),
              ("Frechet / real-vs-real (right; dotted: 1.5)", "frechet_ratio", "#d62728", fr_max)]
    for i, (name, key, colour, top) in enumerate(series):
        values = [r[key] * 1.1 / top for r in rows]  # the right-axis series scaled onto the left axis
        pts = " ".join(f"{px(r['guidance']):.1f},{py(v, 1.1):.1f}" for r, v in zip(rows, values))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for r, v in zip(rows, values):
            out.append(f'<circle cx="{px(r["guidance"]):.1f}" cy="{py(v, 1.1):.1f}" r="3" fill="{colour}"/>')
        ly = H - B - 50 + 15 * i  # legend in the lower right, below the accuracy and diversity lines
        out.append(f'<line x1="{L + 180}" x2="{L + 200}" y1="{ly}" y2="{ly}" stroke="{colour}" '
                   f'stroke-width="2"/><text x="{L + 206}" y="{ly + 4}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out)
