"""Shared pytest setup.

- Makes the in-tree ``jaxdiff`` package importable without installing it.
- Compile-time economy for this 2-core CPU (set before JAX is imported, and inherited by the
  subprocesses that tests start): a per-session persistent compilation cache, so identical
  programs compiled by several tests or processes compile once, and LLVM's expensive passes off
  (3-4x faster CPU compiles; numerics unchanged to ~1e-7). Neither changes what is computed.
- Opt-in module fixtures for the heavy modules: ``xla_o0`` (XLA backend at -O0) and
  ``torch_one_thread`` (no OpenMP contention with XLA on 2 cores).
- Under ``pytest -n``: ONE_WORKER_MODULES run on one worker each, so their module-scoped
  fixtures are built once.
"""
import atexit
import os
import shutil
import sys
import tempfile

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxdiff_test_xla_cache_")
    # Only the process that made it (the xdist controller) removes it, after its workers exit.
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
# One OpenMP thread for torch (the reference implementations) in every test process: on this
# 2-core CPU torch's default two threads contend with XLA's pool and another xdist worker (a tiny
# UNet2DConditionModel forward: 2.0 s with 2 threads, 0.024 s with 1). Results agree to rounding.
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "xla_llvm_disable_expensive_passes" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_llvm_disable_expensive_passes=true").strip()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A fresh TFDS data dir for the module, also set as ``$JAXDIFF_DATA_DIR`` (so configs and
    subprocesses find the embedded datasets built there); the old value is restored afterwards.
    Modules that only pass the dir explicitly define their own plain ``data_dir``."""
    d = str(tmp_path_factory.mktemp("tfds"))
    old = os.environ.get("JAXDIFF_DATA_DIR")
    os.environ["JAXDIFF_DATA_DIR"] = d
    yield d
    if old is None:
        os.environ.pop("JAXDIFF_DATA_DIR")
    else:
        os.environ["JAXDIFF_DATA_DIR"] = old


@pytest.fixture(scope="module")
def xla_o0():
    """XLA's LLVM backend at -O0 (``jax_disable_most_optimizations``) for the module that asks for it:
    compiles of these small CPU programs are 5-10x faster (a VAE train-state init: 31 s -> 3-4 s),
    what is computed is the same, and the level is part of the persistent-cache key. Restored after
    the module, so other modules' programs are compiled as before."""
    import jax
    from jax._src import compiler

    old = compiler._DISABLE_MOST_OPTIMIZATIONS.value
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


@pytest.fixture(scope="module")
def torch_one_thread():
    """One torch intra-op thread for the module that asks for it. On this 2-core CPU, shared with
    XLA's thread pool (and another xdist worker), torch's default 2 OpenMP threads contend: a tiny
    UNet2DConditionModel forward took 2.0 s with 2 threads vs 0.024 s with 1. Results agree to float
    rounding (reduction order), far inside the parity tolerances."""
    torch = pytest.importorskip("torch")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# pytest-xdist: ``-n`` distributes single tests ("load"), so a module's tests land on both workers
# and each worker builds the module-scoped fixtures again. For these modules that is the costly
# part (test_latent: the shared VAE runs, ~70 s twice; test_text_to_image: the SD folder, the
# torch pipeline and the compiled generation), so each runs on one worker as a unit; every other
# test is still scheduled on its own, as with "load".
ONE_WORKER_MODULES = ("tests/test_latent.py", "tests/test_text_to_image.py", "tests/test_t2i.py",
                      "tests/test_multihost.py")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "load":
        return None  # an explicit --dist other than load is left alone
    from xdist.scheduler import LoadScopeScheduling

    class ModuleUnitsScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            module = nodeid.split("::", 1)[0]
            return module if module in ONE_WORKER_MODULES else nodeid

    return ModuleUnitsScheduling(config, log)
