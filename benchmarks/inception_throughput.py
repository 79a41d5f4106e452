"""Images/s of the FID Inception: jaxdiff's Flax network vs pytorch-fid's (vendored in tests/reference) on
the same uint8 images in the same run.

    nice -n 5 python -m benchmarks.inception_throughput [--batch 50] [--size 32] [--rounds 3] [--no_ynn]

Both sides take uint8 ``[B, size, size, 3]`` images and return pool3 ``[B, 2048]``: jaxdiff through
``FIDEvaluator`` 's jitted program (``x / 255``, torch's bilinear resize to 299, the network; jaxdiff's
XLA options, i.e. YNNPACK fusions off on the CPU), pytorch-fid through ``ToTensor``-style ``/ 255`` and
``InceptionV3([3])`` (resize inside) under ``torch.no_grad()`` with torch's default threads. Unless
``--no_ynn``, also jaxdiff's network compiled with jaxlib's default options (YNNPACK convolutions on).
The weights are seeded random values (speed does not depend on them; BatchNorm statistics are
calibrated on random inputs so activations stay O(1), no denormals). One warm-up batch each (compile),
then ``--rounds`` rounds that time one batch of each implementation in turn (interleaved, so load from
other processes falls on all alike); images/s from the median batch time. Prints the machine first.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

from benchmarks.harness import interleave, load_average, machine_info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _torch_reference():
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from reference.pytorch_fid_inception import InceptionV3, fid_inception_v3

    torch.manual_seed(0)
    net = fid_inception_v3()
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    net.train()
    with torch.no_grad():
        net(torch.rand(2, 3, 299, 299) * 2 - 1)
    state_dict = net.state_dict()
    return InceptionV3([3], state_dict=state_dict).eval(), state_dict


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.inception_throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--size", type=int, default=32, help="input images are size x size (resized to 299)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no_ynn", action="store_true", help="skip the jaxlib-default-options variant")
    args = p.parse_args(argv)

    import jax
    import torch

    from jaxdiff.eval import fid as fid_lib
    from jaxdiff.interop.inception import params_from_state_dict

    info = machine_info()
    print(f"machine: {info['cpu']} ({info['cpu_cores']} cores, {info['cpu_isa']}), jax {info['jax']} "
          f"{info['jax_backend']}, torch {info['torch']} ({torch.get_num_threads()} threads), "
          f"load avg at start {info['loadavg_start']}")
    ref, state_dict = _torch_reference()
    params = params_from_state_dict(state_dict)
    images = np.random.default_rng(0).integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)

    ev = fid_lib.FIDEvaluator(params, batch_size=args.batch)
    x_dev = jax.device_put(images, jax.sharding.NamedSharding(ev.mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
    runs = {"jaxdiff (Flax, XLA options)": lambda: fid_lib._features_fn()(ev.params, x_dev)["pool3"].block_until_ready()}
    if not args.no_ynn:
        default_fn = jax.jit(lambda p, x: fid_lib._network(p, fid_lib._prepare(x)))
        runs["jaxdiff (Flax, jaxlib default options)"] = lambda: default_fn(ev.params, x_dev)["pool3"].block_until_ready()

    def torch_run():
        with torch.no_grad():
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
            return ref(x)[0]

    runs["pytorch-fid (torch CPU)"] = torch_run
    for name, fn in runs.items():  # warm-up: compile / first-call allocation
        t = time.perf_counter()
        fn()
        print(f"warm-up {name}: {time.perf_counter() - t:.1f} s")
    # rounds of one batch of each implementation in turn, no pause between them
    times = interleave(runs, steps=args.rounds, blocks=args.rounds, pause=0.0)
    base = statistics.median(times["pytorch-fid (torch CPU)"])
    print(f"\n{args.batch} images {args.size}x{args.size} uint8 -> 299 -> pool3, median of {args.rounds} interleaved batches")
    print(f"{'implementation':<42} {'s/batch':>8} {'images/s':>9} {'vs torch':>9}")
    result = {"machine": info, "batch": args.batch, "size": args.size, "rows": {}}
    for name, ts in times.items():
        med = statistics.median(ts)
        result["rows"][name] = {"seconds_per_batch": med, "images_per_s": args.batch / med, "times": ts}
        print(f"{name:<42} {med:>8.2f} {args.batch / med:>9.1f} {base / med:>8.2f}x")
    print(f"load avg at end {load_average()}")
    return result


if __name__ == "__main__":
    main()
