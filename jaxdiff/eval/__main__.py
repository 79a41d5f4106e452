"""``python -m jaxdiff.eval --samples FILE.npz [--data_dir DIR] [--json OUT.json]``

Scores generated digits: the npz holds ``images`` uint8 [N, H, W, 1] and optionally ``labels`` int [N]
(the classes the samples were conditioned on). An npz with ``prompts`` [N] (``experiments.sample`` on
a text-to-image ``shapes`` run) is scored for prompt adherence instead (colour, position, shape read
from the pixels; ``jaxdiff.eval.shapes``). Prints a table; exit code 2 on bad input.
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
    parser.add_argument("--samples", required=True, help="npz with 'images' uint8 [N,H,W,1], optional 'labels' [N]")
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


if __name__ == "__main__":
    sys.exit(main())
