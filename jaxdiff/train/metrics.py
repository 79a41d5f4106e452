"""Scalar metrics to ``WORKDIR/metrics.jsonl`` and TensorBoard event files (tensorboardX, no TF)."""
from __future__ import annotations

import json
import os
import time


class MetricWriter:
    """``write(step, {name: float})`` appends one JSON line and one TensorBoard scalar per name.

    TensorBoard: ``tensorboard --logdir WORKDIR/tensorboard``.
    """

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"), flush_secs=30)

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **scalars}) + "\n")
        for name, value in scalars.items():
            self._tb.add_scalar(name, float(value), int(step))

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()
