"""Evaluation during training (``train.eval_every``): the job's metrics on a fixed-key sample set.

    >>> ev = InTrainingEval(settings, model, schedule, config, mesh=mesh)  # once per run
    >>> scalars = ev(ema_params)        # {"eval/accuracy": 0.93, "eval/frechet": 17.4, ...}
    >>> print(ev.line(250, scalars))    # step 250 eval (100 EMA samples, 3.1 s): accuracy 0.930, ...

Which metrics (:func:`choose_metrics`, from the data and the model):

* ``digits`` (pixel or latent, any resolution): the project classifier's accuracy on the requested
  labels (class-conditional runs) and the Frechet distance of its features to the real ``test``
  digits, with the real-vs-real floor at the same N (:func:`jaxdiff.eval.classifier.evaluate_digits`):
  ``eval/accuracy``, ``eval/frechet``, ``eval/frechet_real_vs_real``.
* ``judge``: class-conditional digits at their native 8x8: the scikit-learn SVM judge
  (:func:`jaxdiff.eval.judge.judge_digits`): ``eval/judge_accuracy``, ``eval/diversity_ratio``.
* ``shapes``: a text-to-image run on ``shapes``: pixel-read prompt adherence
  (:func:`jaxdiff.eval.shapes.adherence`): ``eval/{shape,color,position,all}_accuracy``,
  ``eval/empty_fraction``; with ``data.holdout`` also ``eval/held_out_all_accuracy`` and
  ``eval/seen_all_accuracy``.
* ``fid`` (any run, when :attr:`EvalSettings.inception` names the FID Inception weights):
  ``eval/fid`` of the samples against the statistics of the training split at the data's
  resolution (cached in ``<data dir>/fid_stats``), or of :attr:`EvalSettings.fid_ref`.

Every evaluation also logs ``eval/seconds``. A run none of these fit (e.g. a folder of images
without ``eval_inception``) has no metrics: :func:`choose_metrics` returns ``()``.

The sample set: :attr:`EvalSettings.num` images from the key ``fold_in(key(seed), EVAL_KEY_FOLD)``
(``seed``: ``sample.seed``), the config's sampler (``sample.method``, ``num_steps``, ``guidance``,
...), labels ``0, 1, ..., K-1`` cycling (class-conditional) or prompts cycling over the 189 shapes
prompts, template by template (text-to-image on ``shapes``; ``sample.prompts`` on other data), in
batches of at most ``MAX_BATCH``. It is the same set at every evaluation, for any number of devices
or processes (:func:`jaxdiff.generation.generate`), so the curves move only with the params; the
sampler compiles once per run.

Processes: every process samples (generation is sharded over the mesh) and computes the FID (also
sharded); the host-side metrics (classifier, judge, adherence) run on the writer process only, so
the other processes return only ``eval/fid`` (when on) and ``eval/seconds``.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Optional

import jax
import numpy as np

from jaxdiff import generation, parallel

EVAL_KEY_FOLD = 0x6576616C  # "eval": the sample set's key is fold_in(key(sample.seed), EVAL_KEY_FOLD)
MAX_BATCH = 500  # images per compiled sampler call
FID_BATCH = 50  # images per compiled Inception call
DIGITS_JUDGE_SIZE = 8  # the judge reads the digits' native 8x8


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What an in-training evaluation samples and scores (the ``train.eval_*`` keys of a config).

    ``every``: steps between evaluations (0 = off; the final step is always evaluated when on);
    ``num``: samples per evaluation; ``seed``: the sample set's seed (``sample.seed``);
    ``inception``: path of the FID Inception safetensors ("" = no FID); ``fid_ref``: FID reference
    for :func:`jaxdiff.eval.fid.reference_stats` ("" = the training split at ``image_size``);
    ``data_name``, ``data_dir``, ``image_size``, ``holdout``: the run's data; ``prompts``: the
    prompts of a text-to-image run on data other than ``shapes`` (``sample.prompts``)."""

    every: int = 0
    num: int = 100
    seed: int = 0
    inception: str = ""
    fid_ref: str = ""
    data_name: str = "digits"
    data_dir: Optional[str] = None
    image_size: Optional[int] = None
    holdout: Optional[str] = None
    prompts: tuple = ()


def eval_key(seed: int) -> jax.Array:
    """The sample set's key: ``fold_in(key(seed), EVAL_KEY_FOLD)``, the same at every evaluation."""
    return jax.random.fold_in(jax.random.key(int(seed)), EVAL_KEY_FOLD)


def choose_metrics(settings: EvalSettings, model) -> tuple[str, ...]:
    """The metric groups that fit this run: a subset of ``("digits", "judge", "shapes", "fid")``."""
    out = []
    name = settings.data_name.split(":")[0]
    if name == "digits" and not model.text_conditional:
        out.append("digits")
        if model.conditional and tuple(model.output_shape) == (DIGITS_JUDGE_SIZE, DIGITS_JUDGE_SIZE, 1):
            out.append("judge")
    if name == "shapes" and model.text_conditional:
        out.append("shapes")
    if settings.inception:
        out.append("fid")
    return tuple(out)


def sample_conditioning(settings: EvalSettings, model) -> tuple[Optional[np.ndarray], Optional[list]]:
    """``(labels int32 [num] or None, prompts [num] or None)`` of the sample set."""
    n = settings.num
    if model.text_conditional:
        if settings.data_name.split(":")[0] == "shapes":
            from jaxdiff.data import shapes

            pool = [p for t in range(len(shapes.TEMPLATES)) for p in shapes.all_prompts(t)]
        else:
            pool = list(settings.prompts)
            if not pool:
                raise ValueError("train.eval_every on a text-to-image run needs prompts to sample: set sample.prompts.")
        return None, generation.cycle_prompts(pool, n)
    if model.conditional:
        return (np.arange(n) % model.num_classes).astype(np.int32), None
    return None, None


class InTrainingEval:
    """The evaluation of one run; build it once (before training), call it at each evaluation step.

    ``model``, ``schedule``, ``config``: as for :func:`jaxdiff.generation.generate` (``config``
    supplies the sampler settings); ``mesh``: the training mesh (the FID Inception runs on it).
    Construction prepares what every evaluation reuses: the digits classifier and the judge (writer
    process), the FID Inception and reference statistics (all processes). Raises ValueError (one
    line) when ``settings.num`` is too small for the chosen metrics."""

    def __init__(self, settings: EvalSettings, model, schedule, config, *, mesh=None):
        self.settings, self.model, self.schedule, self.config = settings, model, schedule, config
        self.metrics = choose_metrics(settings, model)
        self.key = eval_key(settings.seed)
        self.labels, self.prompts = sample_conditioning(settings, model)
        self.writer = parallel.is_writer()
        n = settings.num
        if n < 2:
            raise ValueError(f"train.eval_num must be >= 2 (a Frechet distance needs two samples), got {n}.")
        if "judge" in self.metrics and n < 2 * model.num_classes:
            raise ValueError(f"train.eval_num={n} is too small for the digits judge: give at least "
                             f"{2 * model.num_classes} (two samples per class).")
        if "digits" in self.metrics and self.writer:  # trained (~10 s) or read from its cache once, now
            from jaxdiff.eval.classifier import train_digits_classifier

            train_digits_classifier(model.output_shape[0], data_dir=settings.data_dir)
        if "judge" in self.metrics and self.writer:
            from jaxdiff.eval.judge import digits_svm_judge

            digits_svm_judge()
        self.fid = None
        if "fid" in self.metrics:
            self.fid = self._fid_evaluator(mesh)

    # ------------------------------------------------------------------ sampling
    def samples(self, params: Any) -> np.ndarray:
        """The sample set of ``params``: uint8 [num, H, W, C] on every process (all take part)."""
        s, batch = self.settings, min(self.settings.num, MAX_BATCH)
        if self.model.text_conditional:
            return generation.generate_text(self.model, params, self.schedule, self.config, prompts=self.prompts,
                                            key=self.key, batch_size=batch)
        images, _ = generation.generate(self.model, params, self.schedule, self.config, num=s.num, key=self.key,
                                        labels=self.labels, batch_size=batch)
        return images

    # ------------------------------------------------------------------ scoring
    def __call__(self, params: Any) -> dict[str, float]:
        """``{"eval/<name>": float}`` of the sample set of ``params`` (every process must call it)."""
        t0 = time.perf_counter()
        images = self.samples(params)
        out = self.score(images)
        out["eval/seconds"] = time.perf_counter() - t0
        return out

    def score(self, images: np.ndarray) -> dict[str, float]:
        """The chosen metrics of ``images`` (the sample set); host metrics on the writer only.

        A metric that cannot be computed for these samples (ValueError: e.g. an ill-conditioned
        Frechet distance of a few degenerate samples early in training) is left out with a
        one-line warning instead of stopping the training run."""
        out: dict[str, float] = {}
        for name in self.metrics:
            if name != "fid" and not self.writer:
                continue
            try:
                out.update(getattr(self, f"_{name}")(images))
            except ValueError as e:
                if self.writer:
                    print(f"warning: in-training eval: {name} left out this time ({' '.join(str(e).split())[:200]})",
                          flush=True)
        return out

    def _digits(self, images: np.ndarray) -> dict[str, float]:
        from jaxdiff.eval.classifier import evaluate_digits

        d = evaluate_digits(images, self.labels, data_dir=self.settings.data_dir)
        out = {} if d["accuracy"] is None else {"eval/accuracy": d["accuracy"]}
        return {**out, "eval/frechet": d["frechet"], "eval/frechet_real_vs_real": d["frechet_real_vs_real"]}

    def _judge(self, images: np.ndarray) -> dict[str, float]:
        from jaxdiff.eval.judge import judge_digits

        j = judge_digits(images, self.labels)
        return {"eval/judge_accuracy": j["judge_accuracy"], "eval/diversity_ratio": j["diversity_ratio"]}

    def _fid(self, images: np.ndarray) -> dict[str, float]:
        return {"eval/fid": self.fid.fid(images)}

    def _shapes(self, images: np.ndarray) -> dict[str, float]:
        from jaxdiff.data.shapes import is_held_out, parse_caption
        from jaxdiff.eval.shapes import adherence

        ids = np.array([parse_caption(p) for p in self.prompts], np.int64)
        a = adherence(images, ids[:, 0], ids[:, 1], ids[:, 2])
        out = {f"eval/{k}": a[k] for k in ("shape_accuracy", "color_accuracy", "position_accuracy",
                                             "all_accuracy", "empty_fraction")}
        if self.settings.holdout:
            held = is_held_out(ids, self.settings.holdout)
            for part, m in (("held_out", held), ("seen", ~held)):
                if m.any():
                    out[f"eval/{part}_all_accuracy"] = adherence(images[m], ids[m, 0], ids[m, 1], ids[m, 2])["all_accuracy"]
        return out

    def line(self, step: int, scalars: dict[str, float]) -> str:
        """One line for the log: ``step 250 eval (100 EMA samples, 3.1 s): accuracy 0.930, ...``."""
        g = scalars.get
        parts = []
        if "eval/accuracy" in scalars:
            parts.append(f"accuracy {g('eval/accuracy'):.3f}")
        if "eval/frechet" in scalars:
            parts.append(f"Frechet {g('eval/frechet'):.2f} (real-vs-real {g('eval/frechet_real_vs_real'):.2f})")
        if "eval/judge_accuracy" in scalars:
            parts.append(f"judge {g('eval/judge_accuracy'):.3f}, diversity {g('eval/diversity_ratio'):.2f}x real")
        if "eval/all_accuracy" in scalars:
            parts.append(f"shape {g('eval/shape_accuracy'):.3f}, colour {g('eval/color_accuracy'):.3f}, "
                         f"position {g('eval/position_accuracy'):.3f}, all three {g('eval/all_accuracy'):.3f}")
        if "eval/held_out_all_accuracy" in scalars:
            parts.append(f"held-out all three {g('eval/held_out_all_accuracy'):.3f}")
        if "eval/fid" in scalars:
            parts.append(f"FID {g('eval/fid'):.2f}")
        return (f"step {step} eval ({self.settings.num} EMA samples, {g('eval/seconds', float('nan')):.1f} s): "
                + ", ".join(parts))

    # ------------------------------------------------------------------ FID
    def _fid_evaluator(self, mesh):
        from jaxdiff.eval import fid
        from jaxdiff.interop.inception import load_inception

        s = self.settings
        ev = fid.FIDEvaluator(load_inception(s.inception), batch_size=min(FID_BATCH, s.num), mesh=mesh)
        if s.fid_ref:
            ev.ref = fid.reference_stats(s.fid_ref, ev, data_dir=s.data_dir)
        else:
            ev.ref = self._training_split_stats(ev)
        return ev

    def _training_split_stats(self, ev):
        """pool3 statistics of the run's training split at the data's resolution, cached as
        ``<data dir>/fid_stats/<name>_train_<H>px_<weights fingerprint>.npz``."""
        from jaxdiff.data import ImageDataset
        from jaxdiff.data.pipeline import default_data_dir
        from jaxdiff.eval import fid

        s = self.settings
        ds = ImageDataset(s.data_name, "train", batch_size=1, image_size=s.image_size, data_dir=s.data_dir,
                          drop_labels=True, cache_in_memory=False)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in s.data_name)
        path = os.path.join(default_data_dir(s.data_dir), "fid_stats",
                            f"{safe}_train_{ds.image_shape[0]}px_{ev.fingerprint}.npz")
        have = os.path.isfile(path)
        if jax.process_count() > 1:  # compute together unless every process can read the cache
            from jax.experimental import multihost_utils

            have = bool(np.min(multihost_utils.process_allgather(np.int32(have))))
        if have:
            return fid.load_stats_npz(path)
        if self.writer:
            print(f"FID reference: {ds.num_examples} '{s.data_name}' train images at {ds.image_shape[0]} px "
                  f"(once; cached in {path})", flush=True)
        stats = ev.stats_from_reader(lambda idx: ds.examples(idx)[0], ds.num_examples, desc="fid reference")
        fid.save_stats_npz(path, stats, dataset=np.str_(f"{s.data_name}:train"), weights=np.str_(ev.fingerprint))
        parallel.sync("jaxdiff-eval-fid-reference")
        return stats
