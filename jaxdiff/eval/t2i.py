"""Prompt adherence of a text-to-image run on the embedded ``shapes``, over guidance scales.

    >>> from jaxdiff import runs
    >>> from jaxdiff.eval.t2i import evaluate
    >>> prompts, images, results = evaluate(runs.load_run("runs/t2i_shapes"), [1.0, 3.0, 7.0])
    >>> results[3.0]["all_accuracy"]

Prompts: every (shape, colour, position) combination (189) in each of the first ``templates``
caption templates; every guidance scale samples the same prompts from the same noise. The images
are read by :func:`jaxdiff.eval.shapes.adherence` (colour, position and shape from pixels).
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import jax
import numpy as np

from jaxdiff import generation
from jaxdiff.data import shapes
from jaxdiff.eval.shapes import adherence


def evaluate(run, guidance_scales, *, templates=2, seed=0, batch_size=189,
             log: Optional[Callable[[str], None]] = None, **sampler):
    """Sample every prompt at every guidance scale; returns ``(prompts, images [G, N, H, W, 3], results)``
    with ``results[g]`` the :func:`jaxdiff.eval.shapes.adherence` dict of guidance ``g``. For a run
    trained with ``data.holdout``, ``results[g]["held_out"]`` and ``results[g]["seen"]`` score the
    held-out combinations' prompts and the others apart. ``log`` gets one line per scale."""
    log = log or (lambda line: None)
    if not 1 <= templates <= len(shapes.TEMPLATES):
        raise ValueError(f"--templates must be in [1, {len(shapes.TEMPLATES)}], got {templates}.")
    labels = np.concatenate([shapes.all_labels()] * templates)
    prompts = [p for t in range(templates) for p in shapes.all_prompts(t)]
    holdout = run.config.data.holdout
    held = shapes.is_held_out(labels, holdout) if holdout else None
    all_images, results = [], {}
    for g in guidance_scales:
        t0 = time.perf_counter()
        images = generation.generate_text(run.model, run.params, run.schedule, run.config, prompts=prompts,
                                         key=jax.random.key(seed), batch_size=batch_size, guidance=float(g), **sampler)
        r = adherence(images, labels[:, 0], labels[:, 1], labels[:, 2])
        if held is not None:
            for part, m in (("held_out", held), ("seen", ~held)):
                r[part] = adherence(images[m], labels[m, 0], labels[m, 1], labels[m, 2])
                r[part]["num_prompts"] = int(m.sum())
        r["seconds"] = time.perf_counter() - t0
        results[float(g)] = r
        all_images.append(images)
        log(f"guidance {g}: colour {r['color_accuracy']:.3f}, position {r['position_accuracy']:.3f}, shape "
              f"{r['shape_accuracy']:.3f}, all three {r['all_accuracy']:.3f} ({len(prompts)} prompts, "
              f"{r['seconds']:.0f} s)")
        if held is not None:
            log("  " + "; ".join(f"{part.replace('_', '-')} ({r[part]['num_prompts']} prompts): all three "
                                   f"{r[part]['all_accuracy']:.3f}, shape {r[part]['shape_accuracy']:.3f}"
                                   for part in ("held_out", "seen")))
    return prompts, np.stack(all_images), results
