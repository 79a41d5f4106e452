"""One sharding story: ``jax.jit`` over a :class:`jax.sharding.Mesh` with ``NamedSharding``.

Batches are split over the mesh's ``data`` axis; parameters are replicated, or (FSDP) their large
arrays are split over the same axis. The same code runs on 1 device, N fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``), one GPU, or a multi-host pod (call
:func:`initialize_distributed` first).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed() -> None:
    """Initialise multi-host JAX when the environment describes a cluster (no-op on one host).

    Triggers on ``JAX_COORDINATOR_ADDRESS`` (with ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``) or
    on environments that ``jax.distributed.initialize()`` auto-detects (SLURM, Cloud TPU pods).
    """
    auto = any(k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES"))
    if auto and jax.process_count() == 1 and not getattr(initialize_distributed, "_done", False):
        jax.distributed.initialize()
        initialize_distributed._done = True


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh named ``data`` over the first ``num_devices`` devices (all by default)."""
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices={num_devices} but {len(devices)} device(s) are visible.")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``."""
    return NamedSharding(mesh, P(DATA_AXIS))


def fsdp_spec(shape: tuple[int, ...], num_shards: int, min_size: int) -> P:
    """Shard the largest axis divisible by ``num_shards`` if the array has >= ``min_size`` elements."""
    if num_shards == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % num_shards == 0:
            spec = [None] * len(shape)
            spec[axis] = DATA_AXIS
            return P(*spec)
    return P()


def param_shardings(tree: Any, mesh: Mesh, *, fsdp: bool = False, min_size: int = 2**16) -> Any:
    """Shardings for a params-like pytree (arrays or ShapeDtypeStructs): replicated, or FSDP."""
    n = mesh.shape[DATA_AXIS]

    def one(x):
        shape = tuple(getattr(x, "shape", ()))
        return NamedSharding(mesh, fsdp_spec(shape, n, min_size) if fsdp else P())

    return jax.tree.map(one, tree)


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    n = mesh.shape[DATA_AXIS]
    if global_batch_size % n:
        lo = global_batch_size // n * n or n
        raise ValueError(
            f"The batch size {global_batch_size} is not divisible by the {n} devices of the '{DATA_AXIS}' "
            f"mesh axis. Use a multiple of {n}, e.g. --config.train.batch_size={lo} or {lo + n}."
        )


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Host NumPy batch (this process's share) -> global ``jax.Array``s split over ``data``."""
    sharding = data_sharding(mesh)

    def one(x):
        x = np.asarray(x)
        check_batch_size(x.shape[0] * jax.process_count(), mesh)
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(one, batch)
