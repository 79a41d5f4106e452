"""Run N local processes of a program as one multi-process JAX job (multi-host JAX on one machine).

    python -m experiments.launch --processes=2 --devices_per_process=2 -- \\
        experiments.train --config=experiments/configs/ddpm_digits.py --workdir=runs/ddpm_2x2

Everything after ``--`` is the program: a module run as ``python -m MODULE ARGS...``, or, if its
first token ends in ``.py``, a script run as ``python SCRIPT ARGS...``. Process ``i`` of ``N`` gets
the parent's environment plus JAX's multi-process contract:

    JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT   (--port; 0, the default, picks a free port)
    JAX_NUM_PROCESSES=N  JAX_PROCESS_ID=i
    JAX_PLATFORMS=P                          (only with --platform=P, e.g. --platform=cpu)
    JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo  (N > 1 on CPU or no --platform; a value already set wins)
    XLA_FLAGS=... --xla_force_host_platform_device_count=D   (only with --devices_per_process=D)
    PYTHONUNBUFFERED=1

The program passes these to ``jax.distributed.initialize(address, num_processes, process_id)``.
Every process prints to the launcher's stdout/stderr, each line prefixed ``[i] ``. In jaxdiff's
training every process computes, but only process 0 writes files (checkpoints, metrics, samples)
and shows the progress bar; the others print little besides warnings and errors.

Signals: SIGINT/SIGTERM are forwarded to the running processes (the training loop saves a
checkpoint on SIGTERM and exits 0) and the launcher waits for them; a second signal, or processes
still running ``--kill_after`` seconds after the first, gets SIGKILL. A Ctrl-C typed in the terminal
already reaches every process (they share the launcher's process group), so it is not sent twice.
If a process fails, the others usually notice the lost peer and say why; after ``--grace`` seconds
the launcher kills those still running. Exit code: 0 if every process exits 0, else the first
failure's code (128 + s for a process killed by signal s).
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

_LOCK = threading.Lock()
_EOL = re.compile(rb"\r\n|\n|\r")
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2, no usage block
        sys.stderr.write(f"launch: error: {message} (see --help)\n")
        sys.exit(2)


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = _Parser(prog="python -m experiments.launch", usage="%(prog)s [options] -- MODULE|SCRIPT.py [ARGS...]",
                description="Run N local processes of a program as one multi-process JAX job.")
    p.add_argument("--processes", type=int, default=2, help="number of processes N (default 2)")
    p.add_argument("--devices_per_process", type=int, default=None,
                   help="fake CPU devices per process (XLA_FLAGS); default: leave XLA_FLAGS alone")
    p.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (default: a free one)")
    p.add_argument("--platform", default=None, help="sets JAX_PLATFORMS, e.g. cpu (default: unset)")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds the others may run on after a process fails (default 10)")
    p.add_argument("--kill_after", type=float, default=60.0,
                   help="SIGKILL processes still running this long after SIGINT/SIGTERM (default 60)")
    if "--" not in argv:
        if "-h" in argv or "--help" in argv:
            p.parse_args(["--help"])
        p.error("missing '--' before the module to run")
    i = argv.index("--")
    args, program = p.parse_args(argv[:i]), argv[i + 1:]
    if not program:
        p.error("no module or script after '--'")
    if args.processes < 1:
        p.error(f"--processes must be >= 1, got {args.processes}")
    if args.devices_per_process is not None and args.devices_per_process < 1:
        p.error(f"--devices_per_process must be >= 1, got {args.devices_per_process}")
    return args, program


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(base: dict, index: int, num: int, port: int, platform: str | None,
              devices_per_process: int | None) -> dict:
    """``base`` plus the multi-process contract for process ``index`` of ``num``."""
    env = dict(base, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num),
               JAX_PROCESS_ID=str(index), PYTHONUNBUFFERED="1")
    if platform is not None:
        env["JAX_PLATFORMS"] = platform
    if num > 1 and platform in (None, "cpu"):
        env.setdefault("JAX_CPU_COLLECTIVES_IMPLEMENTATION", "gloo")
    if devices_per_process is not None:
        kept = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT_FLAG)]
        env["XLA_FLAGS"] = " ".join(kept + [f"{_DEVICE_COUNT_FLAG}={devices_per_process}"])
    return env


def _emit(stream, data: bytes) -> None:
    with _LOCK:
        try:
            if hasattr(stream, "buffer"):
                stream.buffer.write(data)
            else:  # e.g. a StringIO
                stream.write(data.decode(errors="replace"))
            stream.flush()
        except (OSError, ValueError):  # closed reader (`| head`): keep draining the child's pipe
            pass


def _pump(index: int, src, dst) -> None:
    """Copy ``src`` to ``dst`` line by line with a ``[index] `` prefix; ``\\r`` (progress bars) kept."""
    prefix, pending, fd = f"[{index}] ".encode(), b"", src.fileno()
    while chunk := os.read(fd, 65536):
        pending += chunk
        out, start = [], 0
        for m in _EOL.finditer(pending):
            if m.group() == b"\r" and m.end() == len(pending):
                break  # maybe the first half of "\r\n": wait for more
            if m.start() > start or m.group() != b"\r":  # drop empty "\r" segments (tqdm's leading \r)
                out.append(prefix + pending[start:m.start()] + (b"\r" if m.group() == b"\r" else b"\n"))
            start = m.end()
        pending = pending[start:]
        if out:
            _emit(dst, b"".join(out))
    if pending.strip(b"\r"):
        _emit(dst, prefix + pending.rstrip(b"\r") + b"\n")
    src.close()


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def _from_terminal(signum: int) -> bool:
    """Whether a SIGINT probably came from the terminal (Ctrl-C), which also sent it to the children."""
    if signum != signal.SIGINT:
        return False
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


def run(cmd: list[str], envs: list[dict], grace: float, kill_after: float) -> int:
    """Start one process of ``cmd`` per environment; supervise them; return the exit code."""
    received: list[int] = []
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            handlers[s] = signal.signal(s, lambda signum, _: received.append(signum))
    procs: list[subprocess.Popen] = []
    threads: list[threading.Thread] = []
    try:
        for i, env in enumerate(envs):
            if received:
                break
            p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            procs.append(p)
            for src, dst in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
                threads.append(threading.Thread(target=_pump, args=(i, src, dst), daemon=True))
                threads[-1].start()
        codes: list[int | None] = [None] * len(procs)
        first = None  # (index, code) of the first failure observed
        deadline, why, handled, ended = None, "", 0, []

        def arm(t: float, reason: str) -> None:  # SIGKILL whoever is still running at time t
            nonlocal deadline, why
            if deadline is None or t < deadline:
                deadline, why = t, reason

        while None in codes:
            now = time.monotonic()
            for signum in received[handled:]:
                handled += 1
                name = signal.Signals(signum).name
                if handled > 1:
                    arm(now, f"after a second signal ({name})")
                    continue
                alive = [p for p, c in zip(procs, codes) if c is None]
                if not _from_terminal(signum):
                    for p in alive:
                        p.send_signal(signum)
                _emit(sys.stderr, f"launch: {name}: waiting for {len(alive)} process(es) to exit\n".encode())
                arm(now + kill_after, f"{kill_after:g} s after {name}")
            for i, p in enumerate(procs):
                if codes[i] is None and (c := p.poll()) is not None:
                    codes[i] = c
                    if c != 0 and first is None:
                        first = (i, c)
                        arm(now + grace, f"{grace:g} s after process {i} failed")
            if deadline is not None and now >= deadline and None in codes:
                ended = [i for i, c in enumerate(codes) if c is None]
                for i in ended:
                    procs[i].kill()
                for i in ended:
                    codes[i] = procs[i].wait()
                    first = first or (i, codes[i])
                break
            time.sleep(0.05)
        end = time.monotonic() + 5  # wait (briefly) for the last output before the summary line
        for t in threads:
            t.join(max(0.0, end - time.monotonic()))
        if first is None:
            return 0
        i, code = first
        if i in ended:  # the launcher's own SIGKILL after a signal
            msg = f"launch: ended {len(ended)} process(es) still running {why}"
        else:
            msg = f"launch: process {i} {_how(code)}" + (f"; ended the other {len(ended)} process(es)" if ended else "")
        _emit(sys.stderr, (msg + "\n").encode())
        return 128 - code if code < 0 else code
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
        for s, h in handlers.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    args, program = _parse(sys.argv[1:] if argv is None else list(argv))
    port = args.port or _free_port()
    cmd = [sys.executable, *program] if program[0].endswith(".py") else [sys.executable, "-m", *program]
    envs = [child_env(os.environ, i, args.processes, port, args.platform, args.devices_per_process)
            for i in range(args.processes)]
    return run(cmd, envs, args.grace, args.kill_after)


if __name__ == "__main__":
    sys.exit(main())
