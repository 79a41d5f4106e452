"""Export a trained run to a diffusers / transformers folder.

    python -m experiments.export --workdir=runs/ddpm_digits --out=exported/ddpm_digits
    python -m experiments.export --workdir=runs/t2i_shapes --out=exported/t2i_shapes --step=2000 --no-ema

What each run becomes (details: :mod:`jaxdiff.interop.export`):
  pixel DDPM (ddpm_*)     a DDPMPipeline folder: model_index.json, unet/ (UNet2DModel, class labels as
                          num_class_embeds with the null label last), scheduler/ (DDPMScheduler)
  latent DDPM (ldm_*)     unet/ + scheduler/ + vae/ (AutoencoderKL of its VAE run, scaling_factor = the
                          run's latent scale); no model_index.json: no diffusers pipeline fits
  VAE (vae_*)             an AutoencoderKL folder
  text-to-image (t2i_*)   unet/ (UNet2DConditionModel), text_encoder/ (transformers CLIPTextModel),
                          tokenizer/ (vocabulary JSON: no transformers class), scheduler/, vae/ if latent
  SD fine-tune            the base pipeline folder (model.pretrained) copied, with the trained unet/
  (sd_finetune)           and, with train.text_encoder, the trained text_encoder/
  SD LoRA (sd_finetune,   pytorch_lora_weights.safetensors (diffusers/peft names, alpha in the header):
  model.lora_rank > 0)    StableDiffusionPipeline.from_pretrained(BASE).load_lora_weights(OUT) applies it;
                          --merge: the whole pipeline, adapters merged into unet/

EMA params by default (``--no-ema``: the raw params). The folder is written beside ``--out`` and
renamed into place, so a failed export leaves nothing; a non-empty ``--out`` is refused unless
``--overwrite`` (which replaces it as a whole).
"""
import os
import sys

from absl import app, flags

from experiments import common

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory with checkpoints/.")
_OUT = flags.DEFINE_string("out", None, "Output folder (must not exist, or be empty, unless --overwrite).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_EMA = flags.DEFINE_boolean("ema", True, "Export the EMA params (--no-ema: the raw params).")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False, "Replace a non-empty --out folder.")
_MERGE = flags.DEFINE_boolean("merge", False, "LoRA runs: write the whole pipeline with the adapters merged "
                              "into the U-Net instead of the LoRA file.")


def _raw_params(workdir: str, step: int, like):
    """The non-EMA params of checkpoint ``step``, in the structure, dtypes and shardings of ``like``."""
    import jax

    from jaxdiff.train.checkpoint import Checkpointer

    ckpt = Checkpointer(workdir, read_only=True)
    try:
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), like)
        return ckpt.restore_subtree(step, "params", target)
    finally:
        ckpt.close()


def _task(workdir: str, step):
    """``(task, step, metadata)`` of the run's checkpoint (task "vae" or "diffusion")."""
    from jaxdiff.train.checkpoint import Checkpointer

    ckpt = Checkpointer(workdir, read_only=True)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {ckpt.directory}: train first, or check --workdir.")
        if step not in ckpt.all_steps():
            raise FileNotFoundError(f"{workdir} has no checkpoint at step {step} (it has {ckpt.all_steps()}).")
        meta = ckpt.restore_meta(step)
        return meta.get("task", "diffusion"), step, meta
    finally:
        ckpt.close()


def _export(workdir: str, out: str, step, ema: bool, overwrite: bool, merge: bool = False) -> dict:
    import jax

    from jaxdiff import runs
    from jaxdiff.interop import export
    from jaxdiff.train import build

    task, step, meta = _task(workdir, step)
    if merge and not (meta.get("pretrained") or {}).get("lora"):
        raise ValueError("--merge applies to LoRA runs of a Stable Diffusion folder (model.pretrained, "
                         "model.lora_rank > 0) only; drop it")
    source = {"workdir": workdir, "step": int(step), "params": "ema" if ema else "raw"}
    if task == "vae":
        ae = build.load_vae(workdir, step)
        params = ae.params if ema else _raw_params(workdir, step, ae.params)
        info = export.export_vae(out, ae.vae.module, jax.device_get(params), image_shape=ae.vae.image_shape,
                                 scaling_factor=ae.scale_factor, source=source, overwrite=overwrite)
        return info
    if meta.get("pretrained"):  # a fine-tuned Stable Diffusion run (experiments/configs/sd_finetune.py)
        run = runs.load_run(workdir, step)
        base = meta["pretrained"]["folder"]
        trained_text = run.config.train.text_encoder
        trainable = run.trainable if ema else _raw_params(workdir, step, run.trainable)
        if run.model.lora and not merge:
            if trained_text:
                raise ValueError("this LoRA run also trained the text encoder, which a LoRA file does not hold: "
                                 "pass --merge to export the whole pipeline")
            return export.export_sd_lora(out, jax.device_get(trainable["lora"]), rank=run.model.lora_rank,
                                         alpha=run.model.lora_alpha, base_folder=base, overwrite=overwrite,
                                         source=source)
        params = run.params if ema else run.model.full_params(trainable, run.model.frozen_params(run.model.base))
        params = jax.device_get(params)  # LoRA adapters merged into the base U-Net
        return export.export_sd_pipeline(base, params["unet"], out,
                                         text_encoder_params=params["text_encoder"] if trained_text else None,
                                         overwrite=overwrite, source=source)
    run = runs.load_run(workdir, step)
    params = jax.device_get(run.params if ema else _raw_params(workdir, step, run.params))
    c = run.config
    scheduler = export.ddpm_scheduler_config(
        c.diffusion.schedule, c.diffusion.num_timesteps, dict(c.diffusion.schedule_options),
        prediction=run.model.prediction, clip_x0=c.sample.clip_x0)
    ae = run.model.autoencoder
    vae = {} if ae is None else dict(vae=ae.vae.module, vae_params=jax.device_get(ae.params),
                                     vae_scaling_factor=ae.scale_factor, vae_image_shape=ae.vae.image_shape)
    if run.model.text_conditional:
        net = run.model.module
        return export.export_text_to_image(out, net.text_encoder, net.unet, params, run.model.tokenizer,
                                           image_shape=run.model.image_shape, scheduler=scheduler, source=source,
                                           overwrite=overwrite, **vae)
    return export.export_ddpm_pipeline(out, run.model.module, params, image_shape=run.model.image_shape,
                                       scheduler=scheduler, source=source, overwrite=overwrite,
                                       class_names=meta.get("dataset", {}).get("class_names"), **vae)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not _WORKDIR.value or not _OUT.value:
        return common.fail("give --workdir=RUN (a trained run) and --out=FOLDER (where to write)", 2)
    common.start_jax()  # before anything touches the JAX backend
    import jax

    if jax.process_count() > 1:
        return common.fail("export runs on one process: start it without a cluster environment", 2)
    from jaxdiff.interop import export
    from jaxdiff.train.build import VAENotReadyError
    from jaxdiff.train.checkpoint import CheckpointError

    workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
    try:
        out = export.check_output_folder(_OUT.value, _OVERWRITE.value)  # before loading anything
        if not os.path.isdir(workdir):
            raise FileNotFoundError(f"No run at {workdir}: give --workdir a run directory (python -m "
                                    "experiments.train --workdir=... makes one).")
        info = _export(workdir, out, _STEP.value, _EMA.value, _OVERWRITE.value, _MERGE.value)
    except (FileExistsError, FileNotFoundError, CheckpointError, VAENotReadyError, ValueError) as e:
        return common.fail(" ".join(str(e).split()), 2)
    except Exception as e:
        common.fail_unexpected(e)
        raise
    common.done()
    parts = ", ".join(f"{k}/" if k != "." else v for k, v in info["components"].items())
    print(f"Wrote {out}: {info['kind']} ({parts}) from step {info['source']['step']} of {workdir} "
          f"({'EMA' if _EMA.value else 'raw, non-EMA'} params)")
    for note in info["notes"]:
        print(f"  note: {note}")
    return 0


def _argv(argv):
    """``--no-ema`` (and ``--no-overwrite``) spelled as absl's ``--noema``."""
    return [{"--no-ema": "--noema", "--no-overwrite": "--nooverwrite"}.get(a, a) for a in argv]


if __name__ == "__main__":
    sys.argv = _argv(sys.argv)
    app.run(main, flags_parser=common.parse_flags)
