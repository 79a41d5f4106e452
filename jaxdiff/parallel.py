"""One sharding story: ``jax.jit`` over a 2-D :class:`jax.sharding.Mesh` (axes ``data`` x ``fsdp``).

Batches are split over both axes; parameters, EMA parameters and optimizer state are replicated
over ``data`` and (when ``fsdp`` > 1) their large arrays split over ``fsdp``. The same code runs on
1 device, N fake CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``), one GPU, or
many processes on many hosts.

Many processes (JAX's distributed runtime): every entry point calls :func:`initialize_distributed`
before anything touches the backend. It reads, in this order,

- JAX's contract ``JAX_COORDINATOR_ADDRESS=host:port``, ``JAX_NUM_PROCESSES=N``,
  ``JAX_PROCESS_ID=i`` (what ``python -m experiments.launch`` sets);
- a task of a SLURM job step with more than one task (``srun``: ``SLURM_PROCID`` set and
  ``SLURM_STEP_NUM_TASKS`` / ``SLURM_NTASKS`` > 1; JAX derives the coordinator from the node list);
- a Cloud TPU pod slice (``TPU_WORKER_HOSTNAMES`` with more than one host, or
  ``JAXDIFF_DISTRIBUTED=auto`` for other environments that JAX auto-detects);

and is a no-op on one host. On the CPU it chooses gloo collectives. Each process then reads only its
own rows of every global batch (:func:`host_rows`, :func:`global_batch`); only process 0 writes
files. A :class:`PeerWatchdog` ends every process within a bounded time, with one line naming the
lost process, when another process dies without notice.
"""
from __future__ import annotations

import math
import os
import sys
import threading
import time
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch is split over both mesh axes


class DistributedInitError(RuntimeError):
    """The environment describes a cluster that cannot be joined; the message names the variable."""


# ----------------------------------------------------------------------------- initialisation
def cluster_from_env(env: Mapping[str, str] | None = None) -> dict | None:
    """The cluster the environment describes: None (one process), ``{"auto": True}`` (SLURM or
    TPU pod: JAX detects the rest), or ``{"coordinator_address", "num_processes", "process_id"}``.

    Raises :class:`DistributedInitError` naming the variable for a half-given or wrong contract.
    """
    env = os.environ if env is None else env
    names = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    given = {k: env[k].strip() for k in names if env.get(k, "").strip()}
    if given:
        missing = [k for k in names if k not in given]
        if missing:
            have = ", ".join(f"{k}={v}" for k, v in given.items())
            raise DistributedInitError(
                f"{missing[0]} is not set but {have} is: a multi-process run needs all of "
                "JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=0..N-1 "
                "(or unset them all for one process).")
        address = given["JAX_COORDINATOR_ADDRESS"]
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise DistributedInitError(
                f"JAX_COORDINATOR_ADDRESS={address!r} is not host:port (e.g. 10.0.0.1:1234): "
                "set it to the address of process 0 and a free port.")
        values = {}
        for k in names[1:]:
            try:
                values[k] = int(given[k])
            except ValueError:
                raise DistributedInitError(f"{k}={given[k]!r} is not an integer.") from None
        n, i = values["JAX_NUM_PROCESSES"], values["JAX_PROCESS_ID"]
        if n < 1:
            raise DistributedInitError(f"JAX_NUM_PROCESSES={n} must be >= 1.")
        if not 0 <= i < n:
            raise DistributedInitError(
                f"JAX_PROCESS_ID={i} must be in 0..{n - 1} (JAX_NUM_PROCESSES={n}): give each process "
                "its own index.")
        if n == 1:
            return None
        return {"coordinator_address": address, "num_processes": n, "process_id": i}
    if env.get("JAXDIFF_DISTRIBUTED", "").strip().lower() == "auto":
        return {"auto": True}
    # A task of an srun job step (SLURM_PROCID is set per task by srun, not in an salloc shell).
    ntasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS")
    if env.get("SLURM_JOB_ID") and env.get("SLURM_PROCID") and ntasks and ntasks.isdigit() and int(ntasks) > 1:
        return {"auto": True}
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return {"auto": True}
    return None


_STATE: dict[str, Any] = {}


def is_initialized() -> bool:
    """True once :func:`initialize_distributed` joined a cluster in this process."""
    return bool(_STATE.get("initialized"))


def initialize_distributed(*, init_timeout: float = 300, peer_timeout: float = 60) -> bool:
    """Join the cluster the environment describes (see the module docstring); no-op on one host.

    Call it before anything touches the JAX backend (``jax.devices()``, any computation).
    ``init_timeout``: seconds to wait for every process to reach the coordinator; past it the
    process ends with one ``error:`` line naming the variables (exit code 2: jaxlib would abort
    with a stack trace). A wrong or half-given environment raises :class:`DistributedInitError`
    at once. ``peer_timeout``: seconds without a sign of life from another
    process before this one exits with a line naming it (:class:`PeerWatchdog`; JAX's own heartbeat
    timeout is set above it). Returns True when a cluster was joined (now or earlier).
    """
    if is_initialized():
        return True
    spec = cluster_from_env()
    if spec is None:
        return False
    if init_timeout <= 0 or peer_timeout <= 0:
        raise ValueError(f"init_timeout ({init_timeout}) and peer_timeout ({peer_timeout}) must be > 0 seconds.")
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise DistributedInitError(
            "JAX's backend was initialised before jaxdiff.parallel.initialize_distributed(): call it first, "
            "before jax.devices(), jax.process_count() or any computation.")
    # CPU collectives across processes: gloo (a no-op for GPU/TPU computations). A value the user
    # set in JAX_CPU_COLLECTIVES_IMPLEMENTATION wins.
    if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {} if spec.get("auto") else dict(spec)
    if spec.get("auto"):
        where = "the cluster JAX detected from the environment (SLURM / TPU pod)"
    else:
        where = (f"the coordinator JAX_COORDINATOR_ADDRESS={spec['coordinator_address']} with "
                 f"JAX_NUM_PROCESSES={spec['num_processes']} (this is JAX_PROCESS_ID={spec['process_id']})")
    _join(kwargs, where, spec.get("coordinator_address"), init_timeout, peer_timeout)
    _STATE["initialized"] = True
    if jax.process_count() > 1:
        _STATE["watchdog"] = PeerWatchdog(peer_timeout)
        _STATE["watchdog"].start()
    return True


def _join(kwargs: dict, where: str, address: str | None, init_timeout: float, peer_timeout: float) -> None:
    """``jax.distributed.initialize`` bounded by ``init_timeout`` with a one-line error.

    jaxlib ends a process that cannot join (coordinator unreachable, processes missing) with a fatal
    C++ log and a stack trace, not an exception. So its timeout is set past ours, its output is held
    back while it connects, and a timer ends the process first with one line naming the variables."""
    import tempfile

    joined = threading.Event()
    saved = os.dup(2)
    held = tempfile.TemporaryFile()
    os.dup2(held.fileno(), 2)

    def give_up():
        if joined.wait(init_timeout):
            return
        if address and not _reachable(address):
            why = (f"nothing answers at JAX_COORDINATOR_ADDRESS={address}: start process 0 (JAX_PROCESS_ID=0) "
                   "there, or fix the address")
        else:
            why = "not every process joined: check that all JAX_NUM_PROCESSES processes were started with the same address"
        os.write(saved, (f"error: Could not join {where} within {init_timeout:g} s ({why}); the wait is set by "
                         "--init_timeout.\n").encode())
        os._exit(2)

    threading.Thread(target=give_up, name="jaxdiff-init-timeout", daemon=True).start()
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=int(math.ceil(init_timeout)) + 60,
                                   heartbeat_timeout_seconds=max(10, int(math.ceil(2 * peer_timeout + 10))))
    except Exception as e:  # bad auto-detection, a bad address: raised before connecting
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DistributedInitError(f"Could not join {where} ({first[:200]}).") from None
    finally:
        joined.set()
        os.dup2(saved, 2)
        os.close(saved)
        held.close()


def _reachable(address: str) -> bool:
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
            return True
    except OSError:
        return False


def check_initialized() -> None:
    """Raise a clear error when the environment describes a cluster this process has not joined."""
    if not is_initialized() and cluster_from_env() is not None:
        raise DistributedInitError(
            "The environment describes a multi-process run (JAX_COORDINATOR_ADDRESS / SLURM / TPU pod) but "
            "jaxdiff.parallel.initialize_distributed() was not called: call it first thing in your program.")


def exit_failed(message: str, code: int = 1) -> None:
    """Print ``error: message`` (one line). In a multi-process run, also tell the other processes
    and leave at once: a failed process must not run JAX's exit-time shutdown (it waits for peers
    that will never arrive); the peers see the failure within a second and exit too. On one
    process it returns, and the caller exits with ``code``."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    dog = _STATE.get("watchdog")
    if dog is not None:
        dog.report_failure(message)
        sys.stdout.flush()
        os._exit(code)


def finished() -> None:
    """Tell the other processes that this one ends normally (its silence is then no loss)."""
    dog = _STATE.get("watchdog")
    if dog is not None:
        dog.stop()


class PeerWatchdog(threading.Thread):
    """Every process bumps a counter in the coordinator's key-value store about every
    ``timeout / 5`` s and watches the others'. A process whose counter stands still for ``timeout``
    s (killed, hung, a lost host), a process that reported a failure, or a coordinator that stopped
    answering (process 0 died) ends this process with one line naming it, exit code 1. JAX's own
    heartbeat check (set above ``timeout``) would otherwise abort with a C++ stack trace."""

    PREFIX = "jaxdiff/peer"

    def __init__(self, timeout: float):
        super().__init__(name="jaxdiff-peer-watchdog", daemon=True)
        from jax._src import distributed

        self.client = distributed.global_state.client
        self.timeout = float(timeout)
        self.me, self.n = jax.process_index(), jax.process_count()
        self._halt = threading.Event()

    def _key(self, kind: str, i: int) -> str:
        return f"{self.PREFIX}/{kind}/{i}"

    def report_failure(self, message: str) -> None:
        try:
            self.client.key_value_set(self._key("failed", self.me), message[:500], allow_overwrite=True)
        except Exception:
            pass

    def stop(self) -> None:
        self._halt.set()
        try:
            self.client.key_value_set(self._key("done", self.me), "1", allow_overwrite=True)
        except Exception:
            pass

    def _die(self, message: str) -> None:
        if self._halt.is_set():
            return
        # Process 0's progress bar may hold the line (it ends in a carriage return): start a new one.
        print(f"{chr(10) if self.me == 0 else ''}error: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)

    def run(self) -> None:
        counter, seen = 0, {}
        start = time.monotonic()
        interval = min(1.0, self.timeout / 5)
        fix = "Relaunch the same command to resume from the last complete checkpoint."
        while not self._halt.wait(interval):
            now = time.monotonic()
            try:
                counter += 1
                self.client.key_value_set(self._key("alive", self.me), str(counter), allow_overwrite=True)
                # One listing a round: {"alive/j": counter, "failed/j": message, "done/j": "1"}.
                entries = {k[len(self.PREFIX) + 1:]: v for k, v in self.client.key_value_dir_get(self.PREFIX + "/")}
            except Exception as e:  # the coordinator (process 0) is gone
                if not self._halt.is_set() and now - start > 2 * interval:
                    self._die(f"lost contact with the coordinator, process 0 of {self.n} ({type(e).__name__}); "
                              f"this process ({self.me}) stops too. {fix}")
                continue
            for j in range(self.n):
                if j == self.me or f"done/{j}" in entries:
                    continue
                if f"failed/{j}" in entries:
                    self._die(f"process {j} of {self.n} failed ({entries[f'failed/{j}']}); this process "
                              f"({self.me}) stops too. {fix}")
                value = entries.get(f"alive/{j}")
                last_value, last_time = seen.get(j, (None, start))
                if value != last_value:
                    seen[j] = (value, now)
                elif now - last_time > self.timeout:
                    self._die(f"process {j} of {self.n} stopped responding {self.timeout:g} s ago (killed, crashed "
                              f"or its host lost); this process ({self.me}) stops too. {fix}")


# ----------------------------------------------------------------------------- preemption
_SIGTERM = {"received": False}


def install_preemption_handler():
    """On one process, make SIGTERM (a cloud preemption notice) a request to checkpoint and stop
    (:func:`reached_preemption`) until the returned ``restore()`` is called. Many processes use JAX's
    own preemption notifier instead (installed by ``jax.distributed.initialize``): a no-op then."""
    import signal

    if is_initialized() or threading.current_thread() is not threading.main_thread():
        return lambda: None
    _SIGTERM["received"] = False

    def handler(signum, frame):
        _SIGTERM["received"] = True

    previous = signal.signal(signal.SIGTERM, handler)

    def restore():
        signal.signal(signal.SIGTERM, previous)

    return restore


def reached_preemption(step: int) -> bool:
    """True when this step is where every process should save a checkpoint and stop: with many
    processes the step all of them agreed on after one got SIGTERM (JAX's preemption sync point;
    call it once per step on every process with the same steps), on one process any step after
    SIGTERM."""
    if is_initialized() and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return bool(multihost_utils.reached_preemption_sync_point(int(step)))
    return _SIGTERM["received"]


# ----------------------------------------------------------------------------- meshes and shardings
def make_mesh(num_devices: int | None = None, *, data: int = 0, fsdp: int = 1) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``num_devices`` devices (all by default; on one process only
    may it be fewer). ``data = 0`` puts all devices not on ``fsdp`` on ``data``.

    Device order comes from JAX's mesh utilities: with several slices (TPU multislice) or several
    processes whose devices can each hold whole ``fsdp`` groups, a hybrid mesh keeps the ``fsdp``
    all-gathers inside a slice/host and only ``data`` crosses the slower network (DCN)."""
    from jax.experimental import mesh_utils

    devices = jax.devices()
    if num_devices is not None and num_devices != len(devices):
        if jax.process_count() > 1:
            raise ValueError(f"num_devices={num_devices}: a multi-process run uses all {len(devices)} devices "
                             "(set num_devices to 0).")
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices={num_devices} but {len(devices)} device(s) are visible.")
        devices = devices[:num_devices]
    n = len(devices)
    if fsdp < 1 or data < 0:
        raise ValueError(f"mesh.fsdp must be >= 1 and mesh.data >= 0 (0 = the rest), got data={data}, fsdp={fsdp}.")
    if n % fsdp:
        raise ValueError(f"mesh.fsdp={fsdp} does not divide the {n} devices: use a divisor of {n}.")
    data = data or n // fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh.data x mesh.fsdp = {data} x {fsdp} = {data * fsdp} but there are {n} devices: "
                         f"set mesh.data=0 (the rest) or make the product {n}.")
    slices = {getattr(d, "slice_index", 0) for d in devices}
    local = n // jax.process_count() if len(devices) == jax.device_count() else n
    if len(slices) > 1 and data % len(slices) == 0:
        grid = mesh_utils.create_hybrid_device_mesh((data // len(slices), fsdp), (len(slices), 1), devices)
    elif jax.process_count() > 1 and local % fsdp == 0 and data % jax.process_count() == 0:
        grid = mesh_utils.create_hybrid_device_mesh((data // jax.process_count(), fsdp), (jax.process_count(), 1),
                                                     devices, process_is_granule=True)
    else:
        grid = mesh_utils.create_device_mesh((data, fsdp), devices, allow_split_physical_axes=True)
    return Mesh(grid, BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over all devices: ``data`` x ``fsdp``."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_devices(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def fsdp_spec(shape: tuple[int, ...], num_shards: int, min_size: int) -> P:
    """Shard the largest axis divisible by ``num_shards`` over ``fsdp`` if the array has >= ``min_size`` elements."""
    if num_shards == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % num_shards == 0:
            spec = [None] * len(shape)
            spec[axis] = FSDP_AXIS
            return P(*spec)
    return P()


def param_shardings(tree: Any, mesh: Mesh, *, min_size: int = 2**16) -> Any:
    """Shardings for a params-like pytree (arrays or ShapeDtypeStructs): replicated over ``data``,
    and arrays of ``min_size`` elements or more split over ``fsdp`` (when the mesh has ``fsdp`` > 1)."""
    n = mesh.shape[FSDP_AXIS]

    def one(x):
        return NamedSharding(mesh, fsdp_spec(tuple(getattr(x, "shape", ())), n, min_size))

    return jax.tree.map(one, tree)


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    n = batch_devices(mesh)
    if global_batch_size % n:
        lo = global_batch_size // n * n or n
        raise ValueError(
            f"The batch size {global_batch_size} is not divisible by the {n} devices the batch is split over "
            f"(mesh data x fsdp). Use a multiple of {n}, e.g. --config.train.batch_size={lo} or {lo + n}."
        )


def host_rows(global_batch_size: int, mesh: Mesh) -> np.ndarray:
    """The rows of a global batch that this process's devices hold: sorted int64 indices into
    ``0..global_batch_size-1`` (all of them on one process). Each process reads only these."""
    check_batch_size(global_batch_size, mesh)
    index_map = data_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
    rows = set()
    for (sl,) in index_map.values():
        rows.update(range(*sl.indices(global_batch_size)))
    return np.asarray(sorted(rows), np.int64)


def global_batch(local: Any, rows: np.ndarray, global_batch_size: int, mesh: Mesh) -> Any:
    """This process's rows (``local``: a pytree of NumPy arrays ``[len(rows), ...]``, in the order
    of :func:`host_rows`) -> global ``jax.Array``s ``[global_batch_size, ...]`` split over the batch axes."""
    sharding = data_sharding(mesh)
    rows = np.asarray(rows)

    def one(x):
        x = np.asarray(x)
        if x.shape[0] != len(rows):
            raise ValueError(f"Expected this process's {len(rows)} rows, got an array of {x.shape[0]}.")

        def shard(index):
            lo, hi, _ = index[0].indices(global_batch_size)
            i = int(np.searchsorted(rows, lo))
            return x[i : i + (hi - lo)]

        return jax.make_array_from_callback((global_batch_size, *x.shape[1:]), sharding, shard)

    return jax.tree.map(one, local)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """A whole global batch (the same NumPy arrays on every process) -> global ``jax.Array``s split
    over the batch axes; each process places only its own rows."""
    sizes = {np.shape(x)[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(f"The arrays of a batch must have one leading size, got {sorted(sizes)}.")
    (b,) = sizes
    rows = host_rows(b, mesh)
    return global_batch(jax.tree.map(lambda x: np.asarray(x)[rows], batch), rows, b, mesh)


def to_host(x: Any) -> Any:
    """Global arrays (any sharding, any number of processes) -> the whole NumPy arrays on every process."""
    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable and not a.is_fully_replicated:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(a)

    return jax.tree.map(one, x)


def is_writer() -> bool:
    """Only process 0 writes files, logs and progress."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """A barrier across processes (no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
