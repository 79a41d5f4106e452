"""Typed configs (jaxdiff.config): every shipped config parses to the task it names, sentinels become
None, every wrong key or value is one line naming it, and stored configs read back equal."""
import dataclasses
import json

import ml_collections
import pytest

from experiments.configs import (ddpm_cifar10, ddpm_digits, ddpm_digits32, ldm_digits, sd_finetune, t2i_shapes,
                                 vae_digits, vae_shapes)
from jaxdiff import config as C

SHIPPED = {ddpm_digits: "diffusion", ddpm_digits32: "diffusion", ddpm_cifar10: "diffusion", ldm_digits: "latent",
           t2i_shapes: "text", sd_finetune: "finetune", vae_digits: "vae", vae_shapes: "vae"}


@pytest.mark.parametrize("module", list(SHIPPED), ids=lambda m: m.__name__.split(".")[-1])
def test_shipped_configs_parse_and_round_trip(module):
    raw = module.get_config()
    cfg = C.parse(raw)
    assert cfg.task == SHIPPED[module] == raw.task
    # through JSON (a checkpoint's metadata) and back: the same typed config
    assert C.parse(json.loads(json.dumps(C.to_dict(cfg)))) == cfg
    assert C.parse(cfg) is cfg
    # every key of the file lands in the typed section with the file's value (sentinels aside)
    for section, values in raw.to_dict().items():
        if not isinstance(values, dict):
            continue
        typed = getattr(cfg, section)
        for key, value in values.items():
            got = getattr(typed, key)
            if got is None:
                assert value in (0, "", 0.0), (section, key, value)
            elif isinstance(value, (list, tuple)):
                assert tuple(got) == tuple(value)
            else:
                assert got == value, (section, key)


def test_values_of_the_main_job():
    cfg = C.parse(ddpm_digits.get_config())
    assert (cfg.seed, cfg.num_devices, cfg.mesh.data, cfg.mesh.fsdp) == (0, None, 0, 1)
    assert (cfg.data.name, cfg.data.image_size, cfg.data.data_dir, cfg.data.conditional) == ("digits", 8, None, True)
    assert (cfg.model.ch, cfg.model.ch_mult, cfg.model.num_groups) == (32, (1, 2, 2), 8)
    assert (cfg.diffusion.schedule, cfg.diffusion.prediction, cfg.diffusion.min_snr_gamma) == ("cosine", "eps", None)
    assert (cfg.train.num_steps, cfg.train.lr, cfg.train.grad_clip, cfg.train.eval_every) == (1000, 2e-3, 1.0, 250)
    assert (cfg.sample.method, cfg.sample.num_steps, cfg.sample.guidance, cfg.sample.clip_x0) == ("dpmpp_2m", 25, 1.5, 1.0)
    assert cfg.sample_steps == 25 and not cfg.latent
    assert cfg.vae is None and cfg.text is None and cfg.loss is None


def test_sentinels_become_none_and_absent_keys_take_the_defaults():
    raw = ddpm_digits.get_config()
    raw.num_devices, raw.train.grad_clip, raw.sample.clip_x0, raw.sample.num_steps = 0, 0.0, 0.0, 0
    raw.diffusion.min_snr_gamma = 5.0
    del raw.train["eval_every"], raw.train["keep_checkpoints"], raw.sample["guidance"]
    cfg = C.parse(raw)
    assert (cfg.num_devices, cfg.train.grad_clip, cfg.sample.clip_x0, cfg.sample.num_steps) == (None, None, None, None)
    assert cfg.sample_steps == 1000  # unset sample steps: every training timestep
    assert cfg.diffusion.min_snr_gamma == 5.0
    assert (cfg.train.eval_every, cfg.train.keep_checkpoints, cfg.sample.guidance) == (0, 3, 1.0)
    ldm = C.parse(ldm_digits.get_config())
    assert ldm.vae.step is None and ldm.vae.workdir == "runs/vae_digits" and ldm.latent
    assert C.parse(sd_finetune.get_config()).model.lora_alpha == 4.0
    assert not C.parse(sd_finetune.get_config()).latent  # its latents come from the folder's own VAE


def _error(raw) -> str:
    with pytest.raises(C.ConfigError) as e:
        C.parse(raw)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
    return str(e.value)


def test_each_wrong_key_or_value_is_one_line_naming_it():
    def cfg(**changes):
        raw = ddpm_digits.get_config().to_dict()
        for path, value in changes.items():
            *parents, key = path.split("__")
            node = raw
            for p in parents:
                node = node[p]
            node[key] = value
        return raw

    assert _error(cfg(train__no_such_key=1)).startswith("config.train.no_such_key: no such key; config.train takes ")
    assert _error(cfg(bogus=1)).startswith("config.bogus: no such key")
    assert _error(cfg(model__chh=3)).startswith("config.model.chh: no such key")
    assert _error(cfg(train__lr="fast")) == "config.train.lr must be a number, got 'fast'."
    assert _error(cfg(train__batch_size=2.5)) == "config.train.batch_size must be an int, got 2.5."
    assert _error(cfg(train__num_steps=0)) == "config.train.num_steps must be >= 1, got 0."
    assert _error(cfg(train__cosine_decay=1)) == "config.train.cosine_decay must be True or False, got 1."
    assert _error(cfg(diffusion__p_uncond=1.5)) == "config.diffusion.p_uncond must be in [0, 1], got 1.5."
    assert _error(cfg(model__ch_mult=2)) == "config.model.ch_mult must be a list, got 2."
    assert _error(cfg(task="gan")) == f"config.task must be one of {C.TASKS}, got 'gan'."
    raw = cfg()
    del raw["train"]["lr"]
    assert _error(raw) == "config.train.lr is required and missing."
    raw = cfg()
    del raw["diffusion"]
    assert _error(raw) == "config.diffusion is required for task 'diffusion'."


def test_task_and_sections_must_fit():
    raw = ldm_digits.get_config()
    raw.vae.workdir = ""
    assert "config.vae.workdir is required for task 'latent'" in _error(raw)
    raw = ddpm_digits.get_config()
    raw.model.type = "text_unet"  # a text model needs task 'text'
    assert _error(raw) == ("config.model.type must be 'unet' for task 'diffusion' ('text_unet' is task 'text'), "
                           "got 'text_unet'.")
    raw = t2i_shapes.get_config()
    del raw["text"]
    assert _error(raw).startswith("config.text is required for task 'text'")
    raw = vae_digits.get_config()
    del raw["loss"]
    assert _error(raw).startswith("config.loss is required for task 'vae'")
    raw = t2i_shapes.get_config()
    raw.vae.workdir = ""  # a text model on pixels: still task 'text', no longer latent
    assert not C.parse(raw).latent


def test_configs_stored_before_task_existed_get_the_task_their_keys_imply():
    for module, task in SHIPPED.items():
        raw = module.get_config().to_dict()
        if task == "vae":
            continue  # vae configs always named their task
        del raw["task"]
        assert C.parse(raw).task == task, module.__name__


def test_model_arch_fills_defaults_so_old_checkpoints_compare_equal():
    full = C.to_dict(C.parse(ddpm_digits.get_config()))["model"]
    written = {k: v for k, v in ddpm_digits.get_config().model.to_dict().items() if k not in ("num_heads", "type")}
    written["num_groups"] = 8
    assert C.model_arch(written) == C.model_arch(full)
    assert "dtype" not in C.model_arch(full) and "dropout" not in C.model_arch(full)
    changed = dict(written, ch=64)
    assert C.model_arch(changed) != C.model_arch(full)
    vae = C.to_dict(C.parse(vae_digits.get_config()))["model"]
    assert C.model_arch(vae)["latent_channels"] == 4 and "remat" not in C.model_arch(vae)


def test_configs_stored_by_earlier_versions_still_parse():
    """Runs trained before the mesh section stored train.fsdp (a bool): reading them drops it; a config
    written now that sets it is told what replaced it."""
    raw = ddpm_digits.get_config().to_dict()
    del raw["task"], raw["mesh"]
    raw["train"]["fsdp"] = False
    stored = C.parse(raw, stored=True)
    assert stored.task == "diffusion" and stored.mesh == C.Mesh() and stored.train.num_steps == 1000
    assert _error(raw) == ("config.train.fsdp is retired; use mesh.fsdp (the number of devices that split params "
                           "and optimizer state).")


def test_replace_and_frozen():
    cfg = C.parse(ddpm_digits.get_config())
    other = C.replace(cfg, sample={"guidance": 3.0}, seed=7)
    assert (other.sample.guidance, other.seed, other.sample.method) == (3.0, 7, "dpmpp_2m")
    assert cfg.sample.guidance == 1.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sample.guidance = 2.0


def test_a_frozen_configdict_parses_too():
    assert C.parse(ml_collections.FrozenConfigDict(ddpm_digits.get_config())) == C.parse(ddpm_digits.get_config())
