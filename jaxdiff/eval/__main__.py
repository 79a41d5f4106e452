"""``python -m jaxdiff.eval --samples FILE.npz [--data_dir DIR] [--json OUT.json]``
``python -m jaxdiff.eval --bpd --workdir RUN [--split test] [--batch_size 100] [--json OUT.json]``

Scores generated digits: the npz holds ``images`` uint8 [N, H, W, 1] and optionally ``labels`` int [N]
(the classes the samples were conditioned on). An npz with ``prompts`` [N] (``experiments.sample`` on
a text-to-image ``shapes`` run) is scored for prompt adherence instead (colour, position, shape read
from the pixels; ``jaxdiff.eval.shapes``). Prints a table; exit code 2 on bad input.

``python -m jaxdiff.eval --fid --samples S.npz --ref REF --inception inception_fid.safetensors
[--batch_size 50] [--is] [--pr] [--json OUT.json]``: FID of the npz's ``images`` (uint8 [N, H, W, 3]
or [N, H, W, 1]) against REF: an .npz of statistics (``mu``, ``sigma``: pytorch-fid / DDPM / EDM
files), an .npz of ``images``, or a prepared TFDS split ``NAME:SPLIT`` (``cifar10:train``; its
statistics cached under ``<data dir>/fid_stats``). ``--is``: the Inception Score too; ``--pr``:
precision and recall (k = 3) against the first N reference images. The weights come from
``python -m jaxdiff.interop.inception --convert pt_inception-2015-12-05-6726825d.pth --out
inception_fid.safetensors``. The last line is ``FID <value>`` (:mod:`jaxdiff.eval.fid`).

``--bpd``: the variational bound in bits/dim of a pixel-space run's EMA params on a split of its
dataset (:mod:`jaxdiff.eval.bpd`), split over all devices (and processes), with a progress bar;
the last line is ``bpd <value>``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxdiff.eval", description=__doc__.split("\n\n")[1])
    parser.add_argument("--samples", default=None, help="npz with 'images' uint8 [N,H,W,1], optional 'labels' [N]")
    parser.add_argument("--bpd", action="store_true", help="bits/dim of the run in --workdir on --split")
    parser.add_argument("--workdir", default=None, help="--bpd: the run directory (checkpoints/)")
    parser.add_argument("--split", default="test", help="--bpd: the dataset split (default: test)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="images per compiled call (default: 100 for --bpd, 50 for --fid)")
    parser.add_argument("--fid", action="store_true", help="FID of --samples against --ref")
    parser.add_argument("--ref", default=None, help="--fid: stats .npz (mu, sigma), images .npz, or NAME:SPLIT")
    parser.add_argument("--inception", default=None, help="--fid: the converted FID Inception .safetensors")
    parser.add_argument("--is", dest="inception_score", action="store_true", help="--fid: also the Inception Score")
    parser.add_argument("--pr", action="store_true", help="--fid: also precision/recall (k=3) vs the reference images")
    parser.add_argument("--cache_dir", default=None, help="--fid: where dataset statistics are cached")
    parser.add_argument("--data_dir", default=None, help="data dir (default: $JAXDIFF_DATA_DIR or TFDS's)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    from jaxdiff import parallel

    try:  # a multi-process job: join it before anything touches the backend (no-op on one host)
        parallel.initialize_distributed()
    except (parallel.DistributedInitError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    if args.bpd and args.fid:
        return fail("give one of --bpd and --fid.")
    if args.batch_size is not None and args.batch_size < 1:
        return fail(f"--batch_size must be >= 1, got {args.batch_size}.")
    if args.bpd:
        return _bpd(args, fail)
    if args.fid:
        return _fid(args, fail)
    if args.samples is None:
        return fail("give --samples FILE.npz (score samples) or --bpd --workdir RUN (bits/dim of a run).")
    if not os.path.isfile(args.samples):
        return fail(f"samples file {args.samples!r} does not exist.")
    import numpy as np

    try:
        with np.load(args.samples, allow_pickle=False) as npz:
            if "images" not in npz.files:
                return fail(f"{args.samples!r} has no 'images' array (it has {npz.files}).")
            images = npz["images"]
            labels = npz["labels"] if "labels" in npz.files else None
            prompts = [str(p) for p in npz["prompts"]] if "prompts" in npz.files else None
    except (OSError, ValueError) as e:
        return fail(f"cannot read {args.samples!r} as an npz file: {e}")

    try:
        if prompts is not None:
            from jaxdiff.eval.shapes import adherence_to_captions

            result, what = adherence_to_captions(images, prompts), "shapes prompt adherence"
        else:
            from jaxdiff.eval.classifier import evaluate_digits

            result, what = evaluate_digits(images, labels, data_dir=args.data_dir), "digits evaluation"
    except ValueError as e:
        return fail(str(e))
    width = max(len(k) for k in result)
    print(f"{what} of {args.samples}")
    for key, value in result.items():
        print(f"  {key:<{width}}  {_fmt(value)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _bpd(args, fail) -> int:
    if not args.workdir:
        return fail("--bpd needs --workdir RUN (a trained pixel-space run).")
    from jaxdiff import parallel, runs
    from jaxdiff.eval.bpd import dataset_bpd
    from jaxdiff.runs import CheckpointError

    try:
        run = runs.load_run(args.workdir)
        result = dataset_bpd(run, split=args.split, batch_size=args.batch_size or 100, data_dir=args.data_dir)
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        return fail(" ".join(str(e).split()))
    if not parallel.is_writer():
        return 0
    print(f"bits/dim of {os.path.abspath(args.workdir)} (step {run.step}, EMA params) on {result['num_examples']} "
          f"'{args.split}' examples: prior {result['prior_bpd']:.4f}, decoder (t=0) {result['decoder_bpd']:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**result, "workdir": os.path.abspath(args.workdir), "step": run.step}, f, indent=2)
        print(f"wrote {args.json}")
    print(f"bpd {result['bpd']:.6f}")
    return 0


def _fid(args, fail) -> int:
    from jaxdiff.interop.inception import CONVERT_HINT

    if not args.inception:
        return fail(f"--fid needs --inception WEIGHTS.safetensors (the FID Inception); {CONVERT_HINT}.")
    if not args.samples:
        return fail("--fid needs --samples FILE.npz (with 'images' uint8 [N, H, W, 3]).")
    if not args.ref:
        return fail("--fid needs --ref: an .npz of statistics (mu, sigma) or images, or a dataset NAME:SPLIT "
                    "such as cifar10:train.")
    import numpy as np

    from jaxdiff import parallel
    from jaxdiff.eval import fid as fid_lib
    from jaxdiff.interop.inception import load_inception

    try:
        if not os.path.isfile(args.samples):
            return fail(f"samples file {args.samples!r} does not exist.")
        f = fid_lib.read_npz(args.samples, "samples", ("images",))
        if "images" not in f:
            return fail(f"{args.samples!r} has no 'images' array (it has {f['__files__']}).")
        images = fid_lib.check_images(f["images"], f"'images' of {args.samples!r}")
        fid_lib.parse_ref(args.ref)  # a bad --ref fails before the weights are read
        params = load_inception(args.inception)
        ev = fid_lib.FIDEvaluator(params, batch_size=args.batch_size or 50, progress=True)
        ref = fid_lib.reference_stats(args.ref, ev, data_dir=args.data_dir, cache_dir=args.cache_dir)
        real = None
        if args.pr:
            real = ev.features(fid_lib.reference_images(args.ref, len(images), data_dir=args.data_dir))["pool3"]
        result = ev.evaluate(images, ref, inception=args.inception_score, real_feats=real)
    except (FileNotFoundError, ValueError) as e:
        return fail(" ".join(str(e).split()))
    if not parallel.is_writer():
        return 0
    rows = {"samples": f"{args.samples} ({result['num_images']} images)", "reference": args.ref}
    if ref.n:
        rows["reference images"] = ref.n
    if "is" in result:
        rows["Inception Score"] = f"{result['is']:.4f} +- {result['is_std']:.4f} (10 splits)"
    if "precision" in result:
        rows["precision (k=3)"] = f"{result['precision']:.4f}"
        rows["recall (k=3)"] = f"{result['recall']:.4f}"
    width = max(len(k) for k in rows)
    print("FID with pytorch-fid's Inception (pool3, 2048-d)")
    for key, value in rows.items():
        print(f"  {key:<{width}}  {value}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({**result, "samples": args.samples, "ref": args.ref,
                       "reference_images": int(ref.n)}, out, indent=2)
        print(f"wrote {args.json}")
    print(f"FID {result['fid']:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
