"""Train a model: ``python -m experiments.train [--config=FILE] [--workdir=DIR] [--config.KEY=VALUE ...]``.

With no flags it trains the embedded class-conditional digits model into ``runs/ddpm_digits/``.
Re-running the same command resumes from the latest checkpoint in the workdir. Latent diffusion:

    python -m experiments.train --config=experiments/configs/vae_digits.py --workdir=runs/vae_digits
    python -m experiments.train --config=experiments/configs/ldm_digits.py --workdir=runs/ldm_digits

Many processes (README "Many hosts"): start one per host with JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID (or under SLURM / on a TPU pod), or try it locally with
``python -m experiments.launch --processes=2 --devices_per_process=2 -- experiments.train ...``.
SIGTERM saves a checkpoint and exits 0; re-running resumes.
"""
import os

from absl import app, flags
from ml_collections import config_flags

from experiments import common

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
_CONFIG = common.define_config(os.path.join(CONFIG_DIR, "ddpm_digits.py"))
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, samples). "
                               "Default: runs/<config file name>.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = common.config_value(_CONFIG)
    common.start_jax()  # before anything touches the JAX backend
    from jaxdiff.train.checkpoint import CheckpointError
    from jaxdiff.train.loop import TrainingDivergedError, train
    from jaxdiff.data import DatasetNotPreparedError
    from jaxdiff.train.build import VAENotReadyError

    config_file = config_flags.get_config_filename(flags.FLAGS["config"])
    name = os.path.splitext(os.path.basename(config_file.split(":")[0]))[0]
    workdir = _WORKDIR.value or os.path.join("runs", name)
    try:
        summary = train(config, workdir)
    except (TrainingDivergedError, CheckpointError, DatasetNotPreparedError, VAENotReadyError, PermissionError,
            ValueError) as e:
        return common.fail(str(e))
    except Exception as e:  # a bug or a runtime failure: with many processes, tell the others (no hang)
        common.fail_unexpected(e)
        raise
    common.done()
    if summary["preempted"]:
        print(f"Preempted: saved checkpoint step {summary['checkpoint_step']} in {os.path.abspath(workdir)}/checkpoints; "
              "re-run the same command to resume.", flush=True)
        return 0
    print(f"Done: step {summary['step']}, loss {summary['loss']:.4f}, "
          f"{summary['steps_per_sec']:.2f} steps/s, checkpoint step {summary['checkpoint_step']} in "
          f"{os.path.abspath(workdir)}/checkpoints" + (f", samples {summary['samples']}" if summary["samples"] else ""))
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
