"""experiments.launch: N local processes with JAX's multi-process environment contract.

Most children are tiny scripts (no JAX) written to tmp_path; one test runs real multi-process JAX.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from experiments.launch import child_env

pytestmark = pytest.mark.slow  # subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTRACT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_PLATFORMS",
            "JAX_CPU_COLLECTIVES_IMPLEMENTATION", "XLA_FLAGS", "PYTHONUNBUFFERED")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in CONTRACT}
    env.update(extra)
    return env


def _script(tmp_path, body, name="child.py"):
    path = tmp_path / name
    path.write_text("import json, os, signal, sys, time\nI = int(os.environ['JAX_PROCESS_ID'])\n"
                    + textwrap.dedent(body))
    return str(path)


def _launch(args, timeout=30, env=None):
    return subprocess.run([sys.executable, "-m", "experiments.launch", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env or _env())


def _start(args, env=None):
    # Own session: no controlling terminal, so a SIGINT sent here is always forwarded.
    return subprocess.Popen([sys.executable, "-m", "experiments.launch", *args], cwd=ROOT, env=env or _env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_ready(proc, n):
    seen = set()
    while len(seen) < n:
        line = proc.stdout.readline()
        assert line, f"launcher ended early: {proc.wait()} {proc.stderr.read()}"
        if line.rstrip().endswith("ready"):
            seen.add(line.split()[0])


def test_environment_contract_and_prefixes(tmp_path):
    child = _script(tmp_path, """
        print(json.dumps({k: os.environ.get(k) for k in %r}))
        print("to stderr", I, file=sys.stderr)
    """ % (CONTRACT,))
    flags = "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=8"
    r = _launch(["--processes=2", "--devices_per_process=3", "--", child, "--ignored=1"], env=_env(XLA_FLAGS=flags))
    assert r.returncode == 0, r.stderr
    out = sorted(r.stdout.splitlines())
    assert [line[:4] for line in out] == ["[0] ", "[1] "]
    envs = [json.loads(line[4:]) for line in out]
    assert sorted(r.stderr.splitlines()) == ["[0] to stderr 0", "[1] to stderr 1"]
    host, port = envs[0]["JAX_COORDINATOR_ADDRESS"].split(":")
    assert host == "127.0.0.1" and int(port) > 0
    for i, env in enumerate(envs):
        assert env["JAX_COORDINATOR_ADDRESS"] == envs[0]["JAX_COORDINATOR_ADDRESS"]
        assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == ("2", str(i))
        assert env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "gloo"
        assert env["JAX_PLATFORMS"] is None and env["PYTHONUNBUFFERED"] == "1"
        count_flags = [f for f in env["XLA_FLAGS"].split() if "device_count" in f]
        assert count_flags == ["--xla_force_host_platform_device_count=3"]
        assert "--xla_cpu_enable_fast_math=false" in env["XLA_FLAGS"].split()


def test_child_env_options():
    base = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "mpi"}
    env = child_env(base, 1, 4, 1234, "cpu", None)
    assert env["JAX_PLATFORMS"] == "cpu" and env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:1234"
    assert env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "mpi"  # already set: kept
    assert env["XLA_FLAGS"] == base["XLA_FLAGS"]  # no --devices_per_process: untouched
    assert "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in child_env({}, 0, 1, 1, None, None)  # one process
    assert "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in child_env({}, 0, 2, 1, "cuda", None)
    assert child_env({}, 0, 2, 1, None, 2)["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"


def test_failure_ends_the_others(tmp_path):
    child = _script(tmp_path, f"""
        if I == 1:
            print("failing", flush=True)
            sys.exit(3)
        open(os.path.join({str(tmp_path)!r}, "sleeper.pid"), "w").write(str(os.getpid()))
        time.sleep(60)
    """)
    t0 = time.monotonic()
    r = _launch(["--processes=2", "--grace=1", "--", child])
    assert r.returncode == 3, r.stderr
    assert time.monotonic() - t0 < 1 + 8
    assert "[1] failing" in r.stdout
    assert r.stderr.splitlines()[-1] == "launch: process 1 exited with code 3; ended the other 1 process(es)"
    with pytest.raises(ProcessLookupError):
        os.kill(int((tmp_path / "sleeper.pid").read_text()), 0)


def test_killed_child_exit_code(tmp_path):
    child = _script(tmp_path, "os.kill(os.getpid(), signal.SIGKILL)\n")
    r = _launch(["--processes=1", "--", child])
    assert r.returncode == 128 + 9
    assert r.stderr.splitlines()[-1] == "launch: process 0 killed by SIGKILL"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_is_forwarded(tmp_path, sig):
    child = _script(tmp_path, f"""
        def on_signal(signum, frame):
            print("got", signal.Signals(signum).name[3:], flush=True)
            sys.exit(0)
        signal.signal({int(sig)}, on_signal)
        print("ready", flush=True)
        time.sleep(60)
    """)
    proc = _start(["--processes=2", "--", child])
    try:
        _wait_ready(proc, 2)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    name = sig.name[3:]
    assert proc.returncode == 0, err
    assert sorted(line for line in out.splitlines() if "got" in line) == [f"[0] got {name}", f"[1] got {name}"]


@pytest.mark.parametrize("second_signal", [True, False])
def test_stubborn_children_are_killed(tmp_path, second_signal):
    child = _script(tmp_path, """
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(60)
    """)
    proc = _start(["--processes=2", "--kill_after=1", "--", child])
    try:
        _wait_ready(proc, 2)
        proc.send_signal(signal.SIGTERM)
        if second_signal:
            time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 128 + 9
    why = "after a second signal (SIGTERM)" if second_signal else "1 s after SIGTERM"
    assert err.splitlines()[-1] == f"launch: ended 2 process(es) still running {why}"


@pytest.mark.parametrize("args", [[], ["--processes=2", "x"], ["--processes=0", "--", "x"], ["--"],
                                  ["--devices_per_process=0", "--", "x"], ["--bogus", "--", "x"]])
def test_bad_usage(args):
    r = _launch(args)
    assert r.returncode == 2
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("launch: error: ")
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_real_jax_two_processes_two_devices(tmp_path):
    """Real multi-process JAX (gloo CPU collectives): 2 processes x 2 fake CPU devices."""
    child = _script(tmp_path, """
        import jax
        jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], int(os.environ["JAX_NUM_PROCESSES"]),
                                   int(os.environ["JAX_PROCESS_ID"]))
        print(jax.process_count(), jax.device_count())
    """)
    r = _launch(["--processes=2", "--devices_per_process=2", "--platform=cpu", "--", child], timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == ["[0] 2 4", "[1] 2 4"]
