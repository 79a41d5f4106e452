"""Shared pytest setup.

- Makes the in-tree ``jaxdiff`` package importable without installing it.
- Compile-time economy for this 2-core CPU (set before JAX is imported, and inherited by the
  subprocesses that tests start): a per-session persistent compilation cache, so identical
  programs compiled by several tests or processes compile once, and LLVM's expensive passes off
  (3-4x faster CPU compiles; numerics unchanged to ~1e-7). Neither changes what is computed.
"""
import atexit
import os
import shutil
import sys
import tempfile

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxdiff_test_xla_cache_")
    # Only the process that made it (the xdist controller) removes it, after its workers exit.
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
if "xla_llvm_disable_expensive_passes" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_llvm_disable_expensive_passes=true").strip()
