"""What every benchmark here needs besides its own workload: the machine, timing, XLA's facts about
a compiled program, and the output.

- the machine: ``cpu_info`` (model, cores, ISA flags; no JAX), ``load_average``, ``machine_info``
  (that plus jax / jaxlib / flax / torch / diffusers versions and devices; the ``machine`` entry
  of a benchmark's JSON) and ``device_memory``;
- timing: ``interleave`` (the contenders in alternating blocks, each block after a pause),
  ``timed``, ``median_ms``, ``matmul_peak`` (the device's achievable matmul FLOP/s), ``try_call``
  (an optional contender that fails becomes an ``n/a`` note);
- a compiled program: ``xla_flops`` (``cost_analysis``), ``xla_memory`` (``memory_analysis``),
  ``largest_batch`` (the largest batch within a memory budget, by secant search over probes),
  ``bench_params`` (random parameters from shapes, without compiling an init);
- output: ``markdown_table``, ``write_json``, ``fmt_bytes`` / ``parse_bytes``, ``fmt_load``,
  ``parse_xla_options`` (``--xla-option KEY=VALUE`` flags).

JAX and torch are imported inside the functions that need them: a benchmark of the input pipeline
does not pay for either.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import time
from typing import Any, Callable, Sequence

import numpy as np

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")


# ----------------------------------------------------------------------------- the machine
def cpu_info() -> dict:
    """``cpu`` (model name), ``cpu_cores`` (os.cpu_count) and ``cpu_isa`` (those of
    ``ISA_FLAGS`` the CPU has, comma-separated), from /proc/cpuinfo where there is one."""
    cpu = platform.processor() or platform.machine() or "unknown"
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": cpu, "cpu_cores": os.cpu_count(),
            "cpu_isa": ",".join(x for x in ISA_FLAGS if x in flags)}


def load_average() -> tuple[float, float, float] | None:
    """os.getloadavg() (1, 5, 15 minutes), or None where the OS has none."""
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def machine_info() -> dict:
    """The host, the JAX backend and the library versions (torch and diffusers where they import),
    with the date and the load average now (``loadavg_start``; a benchmark adds ``loadavg_end``)."""
    import jax
    import jaxlib

    dev = jax.devices()[0]
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        **cpu_info(),
        "jax_backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "num_devices": jax.device_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "loadavg_start": load_average(),
    }
    try:
        import flax
        info["flax"] = flax.__version__
    except ImportError:
        pass
    try:
        import torch
        import diffusers
        info["torch"] = torch.__version__
        info["diffusers"] = diffusers.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["torch_device"] = "cuda" if torch.cuda.is_available() else "cpu"
        if torch.cuda.is_available():
            info["torch_device_name"] = torch.cuda.get_device_name(0)
    except ImportError:
        info["torch"] = None
    return info


def device_memory() -> int:
    """Bytes the first JAX device may use: its ``bytes_limit`` (GPU), else MemAvailable (CPU)."""
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot tell the device memory; pass --mem-budget")


# ----------------------------------------------------------------------------- timing
def median_ms(ts: Sequence[float]) -> tuple[float, float]:
    """(median, min) of times in seconds, in milliseconds."""
    return 1e3 * float(np.median(ts)), 1e3 * float(np.min(ts))


def timed(fn: Callable[[], Any], steps: int, warmup: int) -> list[float]:
    """Seconds of each of ``steps`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def interleave(runs: dict[str, Callable[[], Any]], steps: int, blocks: int = 3,
               pause: float = 0.5, calls: dict[str, int] | None = None) -> dict[str, list[float]]:
    """Time each (already warmed-up) callable ``steps`` times, in ``blocks`` alternating blocks
    (``calls[name]``: that many calls per block instead, e.g. 1 for a whole sampling loop).

    Alternating spreads slow drifts of the machine's load evenly over the contenders, and the
    pause before each block lets the other framework's worker threads go idle (XLA's and
    OpenMP's pools spin for a while after their last task; measured: torch steps right after JAX
    work ran up to 8x slower on this 2-core machine)."""
    calls = calls or {}
    out = {k: [] for k in runs}
    per = [steps // blocks + (i < steps % blocks) for i in range(blocks)]
    for n in per:
        for name, fn in runs.items():
            k = calls.get(name, n)
            if k == 0:
                continue
            time.sleep(pause)
            for _ in range(k):
                t0 = time.perf_counter()
                fn()
                out[name].append(time.perf_counter() - t0)
    return out


def matmul_peak(dtype_name: str, n: int, repeats: int = 5) -> float:
    """FLOP/s of one big square ``jnp.dot`` (the achievable matmul peak of the device)."""
    import jax
    import jax.numpy as jnp

    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[dtype_name]
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=dtype))
    jax.block_until_ready(f(a, b))
    ts = timed(lambda: jax.block_until_ready(f(a, b)), repeats, 1)
    return 2 * n ** 3 / float(np.median(ts))


def try_call(fn, *args, **kwargs):
    """(result, None) or (None, 'n/a: error') -- torch.compile may fail on a machine without a
    working compiler toolchain; that is reported, not fatal."""
    try:
        return fn(*args, **kwargs), None
    except Exception as e:  # noqa: BLE001
        text = str(e).strip()
        msg = text.splitlines()[0][:80] if text else ""
        return None, f"n/a: {type(e).__name__}: {msg}"


# ----------------------------------------------------------------------------- a compiled program
def xla_flops(compiled) -> float:
    """FLOPs of a compiled JAX program by XLA's ``cost_analysis`` (nan where it has none)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


def xla_memory(compiled) -> int | None:
    """Bytes a compiled program needs by XLA's buffer assignment: arguments + outputs - aliased
    (donated) + temporaries; None where XLA has no ``memory_analysis``."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
               + m.temp_size_in_bytes)


def largest_batch(memory: Callable[[int], int], budget: int, start: int,
                  max_probes: int = 8, tolerance: float = 0.02) -> dict:
    """The largest batch ``b`` with ``memory(b) <= budget`` (``memory``: bytes a program of batch
    ``b`` needs, e.g. ``xla_memory`` of its compile; each call is a probe).

    Memory is close to affine in the batch (not exactly: small batches reuse buffers better),
    so the search probes ``start`` and ``2 * start``, then steps along the secant through the
    two probes nearest the budget, keeping the largest fitting and smallest failing batch as a
    bracket, until the bracket is within ``tolerance`` (or ``max_probes`` probes). Returns
    ``max_batch`` (None if no probe fits), the slope and intercept of the line through the two
    largest probes (``bytes_per_example``, ``fixed_bytes``) and every ``probes`` {batch: bytes}.
    """
    probes: dict[int, int] = {}

    def mem(b):
        if b not in probes:
            probes[b] = memory(b)
        return probes[b]

    mem(start)
    mem(2 * start)
    for _ in range(max_probes - 2):
        fit = [b for b, m in probes.items() if m <= budget]
        over = [b for b, m in probes.items() if m > budget]
        lo, hi = (max(fit) if fit else 0), (min(over) if over else None)
        if hi is not None and hi - lo <= max(1, tolerance * lo):
            break
        if hi is not None and lo:  # bracketed: secant through the bracket (regula falsi)
            (b1, m1), (b2, m2) = (lo, probes[lo]), (hi, probes[hi])
        else:  # extrapolate from the two largest probes
            (b1, m1), (b2, m2) = sorted(probes.items())[-2:]
        per = (m2 - m1) / (b2 - b1) if m2 != m1 else max(m1, 1) / max(b1, 1)
        guess = int(b1 + (budget - m1) / per)
        if guess <= lo:  # the line says lo is the largest: confirm with lo + 1
            guess = lo + 1
        elif hi is not None:
            margin = max(1, (hi - lo) // 10)  # keep secant steps off the bracket's ends
            if not lo + margin <= guess <= hi - margin:
                guess = (lo + hi) // 2
        if guess in probes:
            break
        mem(guess)
    fit = [b for b, m in probes.items() if m <= budget]
    best = max(fit) if fit else None
    big = sorted(probes.items())[-2:]
    per = (big[1][1] - big[0][1]) / (big[1][0] - big[0][0]) if len(big) == 2 else float("nan")
    return dict(max_batch=best, bytes_per_example=per, fixed_bytes=big[-1][1] - per * big[-1][0],
                probes={int(b): int(m) for b, m in sorted(probes.items())})


def bench_params(shapes, seed: int = 0):
    """Parameters for timing, drawn in NumPy from the shapes (no compile): kernels and embeddings
    ~ N(0, 1/fan_in), GroupNorm scales 1, biases 0. (A jitted ``model.init`` costs more XLA:CPU
    compile time than the train step itself: ~36 s for a 45k-parameter U-Net on 2 cores.)"""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return jnp.ones(s.shape, s.dtype)
        if name == "bias":
            return jnp.zeros(s.shape, s.dtype)
        fan_in = int(np.prod(s.shape[:-1])) or 1
        return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(fan_in), s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


# ----------------------------------------------------------------------------- output
def parse_bytes(s: str) -> int:
    """'2GiB', '512M', '1.5g', '1000' -> bytes (binary units; 'b' / 'ib' suffixes optional)."""
    units = {"k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}
    s = s.strip().lower().rstrip("b").rstrip("i")
    if s and s[-1] in units:
        return int(float(s[:-1]) * units[s[-1]])
    return int(float(s))


def fmt_bytes(n) -> str:
    """Bytes in the largest binary unit >= 1, one decimal ('1.5 GiB'); 'n/a' for None or nan."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "n/a"
    for unit, div in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def fmt_load(la) -> str:
    """A load average triple as '1.0/0.5/0.2' ('n/a' for None)."""
    return "n/a" if not la else "/".join(f"{x:.1f}" for x in la)


def parse_xla_options(items) -> dict:
    """``KEY=VALUE`` strings -> XLA compile options: 'true'/'false' -> bool, integers -> int,
    anything else stays a string."""
    out = {}
    for item in items or []:
        k, _, v = item.partition("=")
        v = {"true": True, "false": False}.get(v.lower(), v)
        if isinstance(v, str):
            try:
                v = int(v)
            except ValueError:
                pass
        out[k] = v
    return out


def markdown_table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Lines of a Markdown table whose first row is the header, columns padded to their widest
    cell (readable as text too)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for k, row in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        if k == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return lines


def write_json(path: str, result: dict) -> None:
    """A benchmark's result as JSON (indent 1; what JSON cannot hold, as its str)."""
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
