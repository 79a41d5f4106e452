"""What every experiment CLI does first: join the cluster (if any), then set up JAX.

Flags shared by the CLIs that import this module:

    --init_timeout=300   seconds to wait for all processes to reach the coordinator
    --peer_timeout=60    seconds without a sign of life from another process before stopping

On one host with no cluster environment both are unused (see :mod:`jaxdiff.parallel`).
"""
import os
import sys

from absl import flags, logging

INIT_TIMEOUT = flags.DEFINE_float("init_timeout", 300.0, "Multi-process runs: seconds to wait for every process "
                                  "to reach the coordinator (JAX_COORDINATOR_ADDRESS) before giving up.")
PEER_TIMEOUT = flags.DEFINE_float("peer_timeout", 60.0, "Multi-process runs: seconds without a sign of life from "
                                  "another process before every process stops with a message naming it.")


def _usage(message: str):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (``app.run(main, flags_parser=common.parse_flags)``) with one line, exit
    code 2, for an unknown or mistyped flag or a ``--config`` file that does not load."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _usage(" ".join(str(e).split()))
    except Exception as e:  # ml_collections running the --config file (no get_config, an error in it)
        _usage(f"--config: could not load the config file ({type(e).__name__}: {' '.join(str(e).split())[:200]}).")


def define_config(default_file: str):
    """``config_flags.DEFINE_config_file("config", default_file)``, locked, with one line (exit code
    2) for a ``--config.A.B=V`` naming a key the config lacks (ml_collections reads those overrides
    from the command line while the flag is defined)."""
    from ml_collections import config_flags

    try:
        return config_flags.DEFINE_config_file("config", default_file, "Experiment config file.", lock_config=True)
    except (AttributeError, KeyError) as e:
        key = str(e).strip("'\"")
        given = [a.split("=")[0] for a in sys.argv[1:] if a.startswith("--config.") and key in a.split("=")[0].split(".")]
        _usage(f"{given[0] if given else key}: the config has no key {key!r} there; see the config file "
               "(--config=FILE) for its keys.")


def config_value(holder):
    """The loaded config of ``define_config``'s flag, or one line (exit code 2) when the ``--config``
    file is missing or fails to load."""
    try:
        config = holder.value
        config.keys()  # ml_collections reports a failed load on first use
        return config
    except OSError as e:
        lines = [l.strip() for l in str(e).splitlines() if l.strip()]
        _usage(f"--config: could not load the config file ({lines[-1] if lines else type(e).__name__}).")


def start_jax() -> None:
    """Join the cluster the environment describes (before anything touches the backend; a no-op on
    one host) and turn on the persistent XLA cache. A wrong or half-given cluster environment ends
    the program with one line naming the variable (exit code 2)."""
    logging.set_verbosity(logging.WARNING)  # keep Orbax's per-save INFO lines off the console
    from jaxdiff import parallel

    try:
        parallel.initialize_distributed(init_timeout=INIT_TIMEOUT.value, peer_timeout=PEER_TIMEOUT.value)
    except (parallel.DistributedInitError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    import jax

    # Persistent XLA cache: re-running (resuming) the same config skips recompilation.
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/jaxdiff/xla"))


def fail(message: str, code: int = 1) -> int:
    """One ``error:`` line; returns ``code`` for ``main`` to return. In a multi-process run the
    process leaves at once and the other processes are told and stop too (none waits forever)."""
    from jaxdiff import parallel

    parallel.exit_failed(message, code)
    return code


def fail_unexpected(error: BaseException) -> None:
    """In a multi-process run, an unexpected exception in one process would leave it waiting in
    JAX's exit-time shutdown and the others in their next collective: print its traceback, tell the
    others and leave. On one process, return (the caller re-raises)."""
    import jax

    if jax.process_count() > 1:
        import traceback

        traceback.print_exc()
        fail(f"{type(error).__name__}: {error}")


def done() -> None:
    """This process ends normally (its silence is no loss to the others)."""
    from jaxdiff import parallel

    parallel.finished()
