"""The training machinery end to end on a tiny digits config: determinism, resume after SIGKILL,
1 vs 8 devices, checkpoint restore across device counts, and the bad-input rules."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from _testutil import assert_trees_equal, leaves, override
from experiments.configs import ddpm_digits
from jaxdiff.data import DatasetNotPreparedError
from jaxdiff.train.checkpoint import Checkpointer
from jaxdiff.train.loop import TrainingDivergedError, train

# XLA -O0 for this module (conftest.xla_o0; run_cli passes it to subprocesses): compiles dominate here.
pytestmark = [pytest.mark.usefixtures("xla_o0"), pytest.mark.slow]  # slow: end-to-end training runs and subprocesses
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# CLI overrides that make the digits config tiny (8x8, 2 levels, T=100, 6 steps).
TINY = {
    "train.eval_every": 0,  # in-training evaluation: tests/test_eval_in_training.py
    "data.image_size": 8,
    "model.ch": 16,
    "model.ch_mult": "(1,2)",
    "model.num_res_blocks": 1,
    "model.attn_resolutions": "(4,)",
    "model.num_groups": 8,
    "model.dropout": 0.0,
    "diffusion.num_timesteps": 100,
    "train.num_steps": 6,
    "train.batch_size": 16,
    "train.warmup_steps": 2,
    "train.cosine_decay": False,
    "train.log_every": 1,
    "train.checkpoint_every": 3,
    "train.keep_checkpoints": 5,
    "train.num_samples": 0,
}


def tiny_config(**overrides):
    return override(ddpm_digits.get_config(), {**TINY, **overrides})


def cli_flags(**overrides):
    return [f"--config.{k}={v}" for k, v in {**TINY, **overrides}.items()]


def run_cli(args, data_dir, timeout=300, extra_env=None):
    """Run python ``args`` with the data dir set and, like this module's own programs, XLA at -O0
    (conftest.xla_o0: the same computation, compiled several times faster)."""
    env = {**os.environ, "JAXDIFF_DATA_DIR": data_dir, "JAX_DISABLE_MOST_OPTIMIZATIONS": "true",
           **(extra_env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_same_seed_bit_identical_and_resume(data_dir, tmp_path):
    a = train(tiny_config(), str(tmp_path / "a"))
    b = train(tiny_config(), str(tmp_path / "b"))
    assert a["step"] == b["step"] == 6
    assert np.isfinite(a["loss"])
    assert_trees_equal(a["state"].params, b["state"].params)
    assert_trees_equal(a["state"].ema_params, b["state"].ema_params)
    # Training moved the params away from their initial values (the equality above means something).
    from jaxdiff.train import build

    c = tiny_config()
    init = jax.jit(build.build_model(c, (8, 8, 1), 10).init_params)(jax.random.key(c.seed))
    assert all(not np.array_equal(x, y) for x, y in zip(leaves(init), leaves(a["state"].params)) if x.size > 1)
    # Stopped at step 3, then the same config resumed to 6: identical to the uninterrupted run.
    train(tiny_config(**{"train.num_steps": 3}), str(tmp_path / "r"))
    r = train(tiny_config(), str(tmp_path / "r"))
    assert_trees_equal(a["state"].params, r["state"].params)
    assert_trees_equal(a["state"].opt_state, r["state"].opt_state)
    # Metrics: JSONL lines for every logged step, TensorBoard event files, checkpoints 3 and 6.
    lines = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
    assert [l["step"] for l in lines] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(l["loss"]) for l in lines)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "a" / "tensorboard"))
    ck = Checkpointer(str(tmp_path / "a"), read_only=True)
    assert ck.all_steps() == [3, 6]
    ck.close()


def test_sigkill_then_rerun_resumes_to_identical_params(data_dir, tmp_path):
    flags = cli_flags(**{"train.num_steps": 9})
    ref = run_cli(["-m", "experiments.train", f"--workdir={tmp_path / 'ref'}", *flags], data_dir)
    assert ref.returncode == 0, ref.stderr[-3000:]
    # Start the same command, SIGKILL it once checkpoint 3 exists, then re-run it.
    killed_dir = tmp_path / "killed"
    env = {**os.environ, "JAXDIFF_DATA_DIR": data_dir, "JAX_DISABLE_MOST_OPTIMIZATIONS": "true"}  # as run_cli
    p = subprocess.Popen([sys.executable, "-m", "experiments.train", f"--workdir={killed_dir}", *flags],
                         cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    ckdir = killed_dir / "checkpoints" / "3"
    while time.time() < deadline and p.poll() is None and not (ckdir / "_CHECKPOINT_METADATA").exists():
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    ck = Checkpointer(str(killed_dir), read_only=True)
    steps_at_kill = ck.all_steps()
    ck.close()
    assert steps_at_kill and max(steps_at_kill) < 9
    again = run_cli(["-m", "experiments.train", f"--workdir={killed_dir}", *flags], data_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Resuming from checkpoint step" in again.stdout
    cfg = tiny_config(**{"train.num_steps": 9})
    from jaxdiff import runs

    run_ref = runs.load_run(str(tmp_path / "ref"))
    run_res = runs.load_run(str(killed_dir))
    assert run_ref.step == run_res.step == 9
    assert_trees_equal(run_ref.params, run_res.params)


MULTI_DEVICE_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    sys.path.insert(0, {root!r}); sys.path.insert(0, os.path.join({root!r}, "tests"))
    import jax, numpy as np
    assert jax.device_count() == 8
    from test_train import tiny_config
    from jaxdiff import parallel, runs
    from jaxdiff.train import build
    from jaxdiff.data import ImageDataset
    from jaxdiff.train import Checkpointer, TrainState, create_train_state, make_optimizer, make_train_step
    from jaxdiff.train.loop import train

    c = tiny_config()
    model = build.build_model(c, (8, 8, 1), 10)
    opt = make_optimizer(learning_rate=c.train.lr, warmup_steps=c.train.warmup_steps)
    step_fn = make_train_step(model.train_apply_fn(0.1), opt, build.build_schedule(c), ema_decay=0.9)
    ds = ImageDataset("digits", "train", batch_size=16, image_size=8)

    def run(n, fsdp=False):  # fsdp: all n devices on the mesh's fsdp axis
        mesh = parallel.make_mesh(n, fsdp=n if fsdp else 1)
        state = create_train_state(jax.jit(model.init_params)(jax.random.key(0)), opt)
        sh = TrainState(step=parallel.replicated(mesh), params=parallel.param_shardings(state.params, mesh, min_size=256),
                        ema_params=parallel.param_shardings(state.params, mesh, min_size=256),
                        opt_state=parallel.param_shardings(state.opt_state, mesh, min_size=256))
        state = jax.device_put(state, sh)
        f = jax.jit(step_fn, in_shardings=(sh, parallel.data_sharding(mesh)), out_shardings=(sh, parallel.replicated(mesh)))
        losses = []
        for s in range(3):
            state, m = f(state, parallel.shard_batch(ds.batch(s), mesh))
            losses.append(float(m["loss"]))
        return state, losses

    def maxrel(a, b):  # largest absolute difference relative to the largest magnitude
        la, lb = [np.asarray(x, np.float64) for x in jax.tree.leaves(a)], [np.asarray(y, np.float64) for y in jax.tree.leaves(b)]
        return max(float(np.max(np.abs(x - y))) for x, y in zip(la, lb)) / max(float(np.max(np.abs(x))) for x in la)

    one, l1 = run(1)
    eight, l8 = run(8)
    fsdp, lf = run(8, fsdp=True)
    specs = [l.sharding.spec for l in jax.tree.leaves(fsdp.params)]
    print("LOSS", max(abs(a - b) / abs(a) for a, b in zip(l1, l8)), max(abs(a - b) / abs(a) for a, b in zip(l1, lf)))
    print("PARAMS", maxrel(one.params, eight.params), maxrel(one.params, fsdp.params))
    print("SHARDED", sum(any(p is not None for p in s) for s in specs), len(specs))
    # A checkpoint written from 8 (FSDP-sharded) devices restores onto 1 device and onto 2.
    ck = Checkpointer({workdir!r} + "/ck", async_save=False)
    ck.save(3, fsdp, {{"note": "8 devices"}})
    for n in (1, 2):
        mesh = parallel.make_mesh(n)
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=parallel.replicated(mesh)), fsdp)
        restored, meta = ck.restore(target)
        assert len(jax.tree.leaves(restored)[1].sharding.device_set) == n
        print("RESTORED", n, maxrel(fsdp, restored), meta["note"])
    ck.close()
    try:
        train(tiny_config(**{{"train.batch_size": 12}}), {workdir!r} + "/bad", num_devices=8)
    except ValueError as e:
        print("BATCHERR", e)
    """
)


def test_eight_devices_match_one_device(data_dir, tmp_path):
    script = tmp_path / "multi.py"
    script.write_text(MULTI_DEVICE_SCRIPT.format(root=ROOT, workdir=str(tmp_path)))
    out = run_cli([str(script)], data_dir, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    lines = {}
    for l in out.stdout.splitlines():
        if l.split() and l.split()[0].isupper():
            lines.setdefault(l.split()[0], []).append(l.split(None, 1)[1])
    d8, df = map(float, lines["LOSS"][0].split())
    assert d8 < 1e-5 and df < 1e-5, lines["LOSS"]
    # Params: reduction order differs across devices (~1e-7 in the gradients); Adam divides by
    # sqrt(v), so a parameter whose gradient is ~0 turns such round-off into a step of up to lr
    # (lr * warm-up = 1e-3 here). Well under one update, far from a real mismatch (~1e-1).
    p8, pf = map(float, lines["PARAMS"][0].split())
    assert p8 < 1e-3 and pf < 1e-3, lines["PARAMS"]
    sharded, total = map(int, lines["SHARDED"][0].split())
    assert sharded > 0, "FSDP sharded no parameter"
    assert [r.split()[0] for r in lines["RESTORED"]] == ["1", "2"]
    assert all(float(r.split()[1]) == 0.0 for r in lines["RESTORED"])
    assert "not divisible" in lines["BATCHERR"][0] and "8" in lines["BATCHERR"][0]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    # Corrupt data: from step 4 on the batches hold NaNs, so the loss of step 4 is NaN.
    from jaxdiff import runs
    from jaxdiff.train import build

    real_make_dataset = build.make_dataset

    def corrupt_dataset(config, split="train", **kwargs):
        ds = real_make_dataset(config, split, **kwargs)
        real_iterate = ds.iterate

        def iterate(start_step=0, prefetch=2, rows=None):
            for step, batch in enumerate(real_iterate(start_step, prefetch, rows), start_step):
                if step >= 4:
                    batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
                yield batch

        ds.iterate = iterate
        return ds

    monkeypatch.setattr(build, "make_dataset", corrupt_dataset)
    cfg = tiny_config(**{"train.num_steps": 8})
    with pytest.raises(TrainingDivergedError, match=r"nan .*at step 4;") as e:
        train(cfg, str(tmp_path / "nan"))
    assert "last good checkpoint is step 3" in str(e.value)
    ck = Checkpointer(str(tmp_path / "nan"), read_only=True)
    assert ck.all_steps() == [3]
    ck.close()
    run = runs.load_run(str(tmp_path / "nan"))
    assert all(np.all(np.isfinite(x)) for x in leaves(run.params))


def test_bad_inputs_give_clear_errors(data_dir, tmp_path):
    with pytest.raises(DatasetNotPreparedError, match="array_record"):
        train(tiny_config(**{"data.name": "mnist"}), str(tmp_path / "m"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="workdir"):
        train(tiny_config(), str(blocker / "run"))
    with pytest.raises(ValueError, match="train.num_steps"):
        train(tiny_config(**{"train.num_steps": 0}), str(tmp_path / "z"))
    # Unknown config key on the CLI: a clear message, non-zero exit, nothing written.
    out = run_cli(["-m", "experiments.train", f"--workdir={tmp_path / 'u'}", "--config.train.bogus_key=1"], data_dir)
    assert out.returncode != 0
    assert "bogus_key" in out.stderr
    assert not (tmp_path / "u").exists()
    # A changed model config refuses to resume into the old workdir.
    train(tiny_config(**{"train.num_steps": 3}), str(tmp_path / "cfg"))
    from jaxdiff.train.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="different model config"):
        train(tiny_config(**{"model.ch": 24}), str(tmp_path / "cfg"))


@pytest.mark.parametrize("args, message", [
    (["--config.train.no_such_key=1"], "error: --config.train.no_such_key: the config has no key 'no_such_key'"),
    (["--config.nosection.a=1"], "error: --config.nosection.a: the config has no key 'nosection'"),
    (["--config=no_such_config.py"], "error: --config: could not load the config file ([Errno 2] No such file"),
    (["--config=experiments/configs/__init__.py"], "error: --config: could not load the config file (AttributeError"),
    (["--config.train.batch_size=abc"], "error: flag --config.train.batch_size=abc: invalid literal for int()"),
    (["--no_such_flag=1"], "error: Unknown command line flag 'no_such_flag'"),
])
def test_command_line_mistakes_give_one_line_and_touch_nothing(data_dir, tmp_path, args, message):
    workdir = tmp_path / "w"
    out = run_cli(["-m", "experiments.train", f"--workdir={workdir}", *args], data_dir, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), out.stderr[-2000:]
    assert not workdir.exists()
