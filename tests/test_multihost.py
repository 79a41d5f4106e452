"""Many processes for real: OS processes joined by JAX's distributed runtime (gloo collectives on
this CPU), started with JAX's environment contract as a user would (or by ``experiments.launch``).

One reference run (1 process x 4 devices, the tiny digits config) anchors the comparisons. A
2 processes x 2 devices run gets SIGTERM at one process (a preemption notice), saves, and is
relaunched through ``experiments.launch``: it ends with the reference's params, loss curve and
samples. Its checkpoint resumes on 1x4 and 1x1 to the same end. The reference's checkpoint resumes
on a 2x2 data x fsdp mesh and trains to the reference's params; SIGKILL of one of those processes
ends the other within the peer timeout, and the run resumes. An unreadable checkpoint is set aside;
the VAE and text-to-image jobs train and sample on 2x2. Every launch costs 30-60 s on this 2-core
machine (imports, tracing, compiling at -O0, Orbax), hence the few, shared runs.

"Same params": the global relative difference ||a - b|| / ||a|| over every parameter except the
attention key biases. Those get no gradient (softmax is invariant to a constant added to every
key's logit), so they move only with the round-off of reduction order, which Adam's normalisation
scales up to lr-sized steps; they are reported, not counted.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxdiff import config as config_lib
from jaxdiff import parallel
from jaxdiff.train import build
from jaxdiff.train import loop
from jaxdiff.train.checkpoint import CheckpointError, Checkpointer
from jaxdiff.train.step import create_train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.usefixtures("xla_o0"), pytest.mark.slow]  # slow: real multi-process runs

TINY = {
    "train.eval_every": 0,  # in-training evaluation: tests/test_eval_in_training.py
    "data.image_size": 8, "model.ch": 16, "model.ch_mult": "(1,2)", "model.num_res_blocks": 1,
    "model.attn_resolutions": "(4,)", "model.num_groups": 8, "diffusion.num_timesteps": 100,
    "train.num_steps": 12, "train.batch_size": 16, "train.warmup_steps": 2, "train.cosine_decay": False,
    "train.log_every": 1, "train.checkpoint_every": 6, "train.keep_checkpoints": 5, "train.num_samples": 8,
    "sample.num_steps": 3,
}
NUM_STEPS = TINY["train.num_steps"]
PARAMS_RTOL = 1e-5


def flags(**overrides):
    return [f"--config.{k}={v}" for k, v in {**TINY, **overrides}.items()]


def env_for(data_dir, devices, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS_ID"))}
    xla = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f)
    env.update(JAXDIFF_DATA_DIR=data_dir, JAX_DISABLE_MOST_OPTIMIZATIONS="true", JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{xla} --xla_force_host_platform_device_count={devices}".strip(), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


class Job:
    """N processes of ``python -m MODULE ARGS`` with JAX's contract; output in files under ``logdir``."""

    def __init__(self, module_args, data_dir, logdir, processes=2, devices=2):
        os.makedirs(logdir, exist_ok=True)
        self.logdir, self.procs, self.files = logdir, [], []
        port = free_port()
        for i in range(processes):
            extra = {} if processes == 1 else dict(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                                    JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i))
            out, err = open(f"{logdir}/p{i}.out", "w"), open(f"{logdir}/p{i}.err", "w")
            self.files += [out, err]
            self.procs.append(subprocess.Popen([sys.executable, "-m", *module_args], cwd=ROOT, stdout=out, stderr=err,
                                               env=env_for(data_dir, devices, **extra)))

    def wait(self, timeout=300):
        codes = [p.wait(timeout=timeout) for p in self.procs]
        for f in self.files:
            f.close()
        return codes

    def log(self, i, stream="err"):
        with open(f"{self.logdir}/p{i}.{stream}") as f:
            return f.read()

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_job(workdir, data_dir, processes=2, devices=2, **overrides):
    extra = [f"--{k}" for k in overrides.pop("cli", [])]
    return Job(["experiments.train", f"--workdir={workdir}", *flags(**overrides), *extra], data_dir,
               f"{workdir}.logs", processes, devices)


def run_ok(job, timeout=300):
    codes = job.wait(timeout)
    assert codes == [0] * len(codes), "\n".join(job.log(i)[-3000:] for i in range(len(codes)))
    return job


def state_of(workdir, step=None):
    """The train state of a checkpoint as NumPy, read on this (one-device) process."""
    ck = Checkpointer(str(workdir), read_only=True)
    try:
        meta = ck.restore_meta(step)
        config = config_lib.parse(meta["config"], stored=True)
        model = build.build_model(config, meta["model"]["image_shape"], meta["model"]["num_classes"])
        abstract = jax.eval_shape(lambda: create_train_state(model.init_params(jax.random.key(0)),
                                                             loop._make_optimizer(config.train)))
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        state, _ = ck.restore(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), abstract),
                              step)
    finally:
        ck.close()
    return jax.tree.map(np.asarray, state)


def params_rel_diff(a, b):
    """(global relative difference without the key biases, largest relative difference of a key bias)."""
    num = den = 0.0
    key_bias = 0.0
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a.params), jax.tree.leaves(b.params)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if "to_k" in jax.tree_util.keystr(path) and "bias" in jax.tree_util.keystr(path):
            key_bias = max(key_bias, float(np.abs(x - y).max() / (np.abs(x).max() + 1e-12)))
            continue
        num += float(np.sum((x - y) ** 2))
        den += float(np.sum(x ** 2))
    return (num / den) ** 0.5, key_bias


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def assert_same_training(ref, other):
    a, b = state_of(ref), state_of(other)
    assert int(a.step) == int(b.step) == NUM_STEPS
    rel, key_bias = params_rel_diff(a, b)
    print(f"params: global relative difference {rel:.2e}; attention key biases (not counted) {key_bias:.2e}")
    assert rel <= PARAMS_RTOL, rel
    # Training moved the params (the comparison means something): far more than the tolerance.
    init = state_of(ref, 6)
    assert params_rel_diff(a, init)[0] > 1e3 * PARAMS_RTOL


def copy_run(src, dst, keep_up_to):
    """A copy of a run directory with only its checkpoints up to ``keep_up_to``."""
    shutil.copytree(src, dst)
    for step in os.listdir(os.path.join(dst, "checkpoints")):
        if step.isdigit() and int(step) > keep_up_to:
            shutil.rmtree(os.path.join(dst, "checkpoints", step))
    return dst


# ----------------------------------------------------------------------------- runs shared by the tests
@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    return tmp_path_factory.mktemp("mh")


@pytest.fixture(scope="module")
def ref(runs, data_dir):
    """1 process x 4 devices, uninterrupted."""
    return run_ok(train_job(runs / "ref", data_dir, processes=1, devices=4)) and runs / "ref"


@pytest.fixture(scope="module")
def two_by_two(runs, data_dir):
    """2 processes x 2 devices: SIGTERM to process 1 once training started, then relaunched through
    experiments.launch as a user would. Returns (workdir, the step it was preempted at, the
    launcher's output)."""
    wd = runs / "2x2"
    job = train_job(wd, data_dir)
    deadline = time.time() + 120
    while "train:" not in job.log(0) and time.time() < deadline:  # process 0's loop has started
        time.sleep(0.2)
    job.procs[1].send_signal(signal.SIGTERM)
    assert job.wait(120) == [0, 0], job.log(0)[-2000:] + job.log(1)[-2000:]
    saved = Checkpointer(str(wd), read_only=True).latest_step()
    assert saved is not None and saved < NUM_STEPS, f"SIGTERM arrived too late (checkpoint {saved})"
    for i in (0, 1):
        assert f"Preempted: saved checkpoint step {saved}" in job.log(i, "out")
    out = subprocess.run([sys.executable, "-m", "experiments.launch", "--processes=2", "--devices_per_process=2", "--",
                          "experiments.train", f"--workdir={wd}", *flags()], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=env_for(data_dir, 1))
    assert out.returncode == 0, out.stderr[-4000:]
    assert f"[0] Resuming from checkpoint step {saved}" in out.stdout
    return wd, saved, out


# ----------------------------------------------------------------------------- the tests
def test_preempted_two_processes_end_like_one_uninterrupted(ref, two_by_two):
    wd, _, out = two_by_two
    assert_same_training(ref, wd)
    la, lb = losses(ref), losses(wd)
    assert sorted(la) == sorted(lb) == list(range(1, NUM_STEPS + 1))
    np.testing.assert_allclose([lb[s] for s in sorted(lb)], [la[s] for s in sorted(la)], rtol=1e-5)
    # Sampling ran on both processes; process 0 wrote the same images as the 1-process run.
    a, b = np.load(ref / "samples_final.npz"), np.load(wd / "samples_final.npz")
    np.testing.assert_array_equal(a["images"], b["images"])
    # Only process 0 shows progress and reports files.
    lines = (out.stdout + out.stderr).splitlines()
    assert any(l.startswith("[0] ") and "Wrote" in l for l in lines)
    assert not any(l.startswith("[1] ") and ("Wrote" in l or "train:" in l) for l in lines)


def test_a_two_process_checkpoint_resumes_on_one_process(ref, two_by_two, data_dir, tmp_path):
    """2 x 2 -> 1 x 4 and 1 x 1 (one process with 4 devices runs both)."""
    wd, saved, _ = two_by_two
    a, b = copy_run(wd, tmp_path / "to_1x4", keep_up_to=6), copy_run(wd, tmp_path / "to_1x1", keep_up_to=6)
    script = tmp_path / "resume.py"
    script.write_text(
        "import sys\nsys.path[:0] = [{root!r}, {tests!r}]\n"
        "from _testutil import override\nfrom experiments.configs import ddpm_digits\n"
        "from jaxdiff.train.loop import train\n"
        "c = lambda: override(ddpm_digits.get_config(), {{**{tiny!r}, 'train.num_samples': 0}})\n"
        "train(c(), {a!r}, num_devices=4)\ntrain(c(), {b!r}, num_devices=1)\n".format(
            root=ROOT, tests=os.path.join(ROOT, "tests"), tiny=TINY, a=str(a), b=str(b)))
    out = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=env_for(data_dir, 4))
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.count("Resuming from checkpoint step 6") == 2
    assert_same_training(ref, a)
    assert_same_training(ref, b)


def test_fsdp_mesh_resumes_one_process_checkpoint_and_survives_sigkill(ref, data_dir, tmp_path, capsys):
    """1 x 4 -> 2 x 2 with params, EMA and optimizer state split over a 2-device fsdp axis: the same
    params at step 12 as the reference. Then SIGKILL of process 1: process 0 ends within the peer
    timeout with one line naming it, and a relaunch resumes from the last complete checkpoint."""
    wd = copy_run(ref, tmp_path / "fsdp", keep_up_to=6)
    os.remove(wd / "metrics.jsonl")
    job = train_job(wd, data_dir, cli=["peer_timeout=4"],
                    **{"mesh.fsdp": 2, "train.num_steps": 100000, "train.num_samples": 0})
    deadline = time.time() + 180
    while not os.path.isdir(wd / "checkpoints" / str(NUM_STEPS)) and time.time() < deadline:
        time.sleep(0.2)
    job.procs[1].kill()
    t0 = time.time()
    try:
        code = job.procs[0].wait(timeout=60)
    finally:
        job.kill()
    job.wait()
    took = time.time() - t0
    assert "Resuming from checkpoint step 6" in job.log(0, "out")
    err = job.log(0).strip().splitlines()
    assert code != 0 and took < 4 + 15, (code, took)
    assert err[-1].startswith("error: process 1 of 2 stopped responding") and "Traceback" not in job.log(0)
    a, b = state_of(ref), state_of(wd, NUM_STEPS)
    rel, key_bias = params_rel_diff(a, b)
    print(f"fsdp 2x2 vs 1x4 at step {NUM_STEPS}: {rel:.2e} (key biases {key_bias:.2e})")
    assert rel <= PARAMS_RTOL
    # The relaunch (here on this one process) resumes from the last complete checkpoint.
    from _testutil import override
    from experiments.configs import ddpm_digits

    last = Checkpointer(str(wd), read_only=True).latest_step()
    summary = loop.train(override(ddpm_digits.get_config(), {**TINY, "train.num_steps": last + 1,
                                                             "train.num_samples": 0}), str(wd))
    assert f"Resuming from checkpoint step {last}" in capsys.readouterr().out and summary["step"] == last + 1


def test_unreadable_checkpoint_is_reported_set_aside_and_an_older_one_resumed(ref, data_dir, tmp_path, capsys):
    from _testutil import override
    from experiments.configs import ddpm_digits

    wd = copy_run(ref, tmp_path / "broken", keep_up_to=NUM_STEPS)
    os.remove(wd / "metrics.jsonl")
    broken = wd / "checkpoints" / str(NUM_STEPS)
    for root, _, files in os.walk(broken):  # truncate every file of the newest checkpoint
        for f in files:
            with open(os.path.join(root, f), "r+b") as fh:
                fh.truncate(os.path.getsize(os.path.join(root, f)) // 3)
    sizes = {os.path.relpath(os.path.join(r, f), broken): os.path.getsize(os.path.join(r, f))
             for r, _, fs in os.walk(broken) for f in fs}
    summary = loop.train(override(ddpm_digits.get_config(), TINY), str(wd))
    out = capsys.readouterr().out
    assert f"checkpoint step {NUM_STEPS} at {broken} is unreadable" in out and "trying step 6" in out
    assert "Resuming from checkpoint step 6" in out and summary["step"] == NUM_STEPS
    kept = wd / "checkpoints.corrupt" / str(NUM_STEPS)  # kept byte for byte, not deleted
    assert {os.path.relpath(os.path.join(r, f), kept): os.path.getsize(os.path.join(r, f))
            for r, _, fs in os.walk(kept) for f in fs} == sizes
    assert_same_training(ref, wd)
    # When no checkpoint is readable the run stops (it never restarts from scratch over a run).
    only = copy_run(ref, tmp_path / "all_broken", keep_up_to=6)
    for root, _, files in os.walk(only / "checkpoints" / "6"):
        for f in files:
            with open(os.path.join(root, f), "r+b") as fh:
                fh.truncate(0)
    with pytest.raises(CheckpointError, match="No checkpoint in .* could be read; moved aside"):
        loop.train(override(ddpm_digits.get_config(), TINY), str(only))
    assert os.listdir(only / "checkpoints.corrupt") == ["6"] and not Checkpointer(str(only), read_only=True).all_steps()


def test_vae_and_text_to_image_jobs_train_and_sample_on_two_processes(runs, data_dir):
    vae, t2i = runs / "vae", runs / "t2i"
    run_ok(Job(["experiments.train", "--config=experiments/configs/vae_shapes.py", f"--workdir={vae}",
                "--config.data.image_size=8", "--config.model.block_out_channels=(8,8)", "--config.model.layers_per_block=1",
                "--config.model.norm_num_groups=4", "--config.model.mid_block_add_attention=False",
                "--config.train.num_steps=2", "--config.train.batch_size=8", "--config.train.checkpoint_every=2",
                "--config.train.warmup_steps=0", "--config.train.log_every=1"], data_dir, f"{vae}.logs"))
    assert os.path.isfile(vae / "reconstructions.png")
    run_ok(Job(["experiments.train", "--config=experiments/configs/t2i_shapes.py", f"--workdir={t2i}",
                f"--config.vae.workdir={vae}", "--config.data.image_size=8", "--config.model.block_out_channels=(16,32)",
                "--config.model.down_block_types=('CrossAttnDownBlock2D','DownBlock2D')",
                "--config.model.up_block_types=('UpBlock2D','UpBlock2D')", "--config.model.mid_block_type=",
                "--config.model.attention_head_dim=2", "--config.text.hidden_size=16", "--config.text.intermediate_size=32",
                "--config.text.num_layers=1", "--config.text.num_heads=2", "--config.diffusion.num_timesteps=100",
                "--config.train.num_steps=2", "--config.train.batch_size=8", "--config.train.checkpoint_every=2",
                "--config.train.warmup_steps=0", "--config.train.log_every=1", "--config.train.num_samples=6",
                "--config.sample.num_steps=2", "--config.train.eval_every=0"], data_dir, f"{t2i}.logs"))
    images = np.load(t2i / "samples_final.npz")
    assert images["images"].shape == (6, 8, 8, 3) and len(images["prompts"]) == 6
    assert np.isfinite([r["loss"] for r in map(json.loads, open(t2i / "metrics.jsonl"))]).all()


# ----------------------------------------------------------------------------- joining a cluster
@pytest.mark.parametrize("env, match", [
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234"}, "JAX_NUM_PROCESSES is not set"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID is not set"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     r"JAX_PROCESS_ID=2 must be in 0\.\.1"),
    ({"JAX_COORDINATOR_ADDRESS": "localhost", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "not host:port"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES='two' is not an integer"),
])
def test_a_wrong_cluster_environment_names_the_variable(env, match):
    with pytest.raises(parallel.DistributedInitError, match=match):
        parallel.cluster_from_env(env)


def test_cluster_environments():
    assert parallel.cluster_from_env({}) is None
    assert parallel.cluster_from_env({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "1",
                                      "JAX_PROCESS_ID": "0"}) is None  # one process: nothing to join
    assert parallel.cluster_from_env({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
                                      "JAX_PROCESS_ID": "3"}) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    assert parallel.cluster_from_env({"SLURM_JOB_ID": "7", "SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "8"}) == {
        "auto": True}
    assert parallel.cluster_from_env({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None
    assert parallel.cluster_from_env({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}) is None  # an salloc shell, no srun
    assert parallel.cluster_from_env({"TPU_WORKER_HOSTNAMES": "t0,t1"}) == {"auto": True}
    assert parallel.cluster_from_env({"TPU_WORKER_HOSTNAMES": "localhost"}) is None


def test_unreachable_coordinator_and_half_given_env_end_with_one_line(data_dir, tmp_path):
    env = env_for(data_dir, 1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}", JAX_NUM_PROCESSES="2",
                  JAX_PROCESS_ID="1")
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "experiments.train", f"--workdir={tmp_path / 'w'}", "--init_timeout=2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2 and time.time() - t0 < 60
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]  # one line
    assert "nothing answers at JAX_COORDINATOR_ADDRESS" in out.stderr and "--init_timeout" in out.stderr
    del env["JAX_NUM_PROCESSES"]
    out = subprocess.run([sys.executable, "-m", "experiments.train", f"--workdir={tmp_path / 'w'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2 and out.stderr.startswith("error: JAX_NUM_PROCESSES is not set")
    assert "Traceback" not in out.stderr and not (tmp_path / "w").exists()
