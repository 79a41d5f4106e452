"""Export: jaxdiff params -> diffusers / transformers folders (the way back of the loaders).

    from jaxdiff.interop import export
    sched = export.ddpm_scheduler_config("cosine", 1000, prediction="eps", clip_x0=1.0)
    export.export_ddpm_pipeline("out/ddpm", unet, params, image_shape=(32, 32, 3), scheduler=sched)
    # then, with torch:  diffusers.DDPMPipeline.from_pretrained("out/ddpm")

Every folder is written to a temporary sibling and renamed into place at the end, so a failed
export leaves nothing behind; an existing non-empty folder is refused unless ``overwrite=True``
(then it is replaced as a whole). Weights are float32 safetensors (``{"format": "pt"}``), configs
JSON; no torch, diffusers or transformers is imported here. Each writer checks the params
against the config it writes (names and shapes, through the loaders' own expectations), so what
is written loads back with :mod:`jaxdiff.interop`'s loaders into the same params.

What each of our models becomes:

* Pixel U-Net (:class:`jaxdiff.nn.UNet`, ``ddpm_*`` runs) -> a ``DDPMPipeline`` folder:
  ``model_index.json``, ``unet/`` (``UNet2DModel``), ``scheduler/`` (``DDPMScheduler``).
  Class-conditional U-Nets use ``UNet2DModel``'s ``num_class_embeds = num_classes + 1``: our
  label table's last row is the null label of classifier-free guidance, so ``class_labels =
  num_classes`` is the unconditional branch. diffusers' ``DDPMPipeline`` / ``DDIMPipeline``
  pass no labels, so their ``__call__`` works for unconditional U-Nets only; a conditional one
  loads, and is sampled by calling ``unet(x, t, class_labels=y)`` in a scheduler loop (CFG:
  ``eps_null + w (eps_y - eps_null)`` with ``y_null = num_classes``).
* Latent U-Net (``ldm_*`` runs) -> ``unet/`` + ``scheduler/`` + ``vae/`` (``AutoencoderKL``,
  with our latent ``scale_factor`` as its ``scaling_factor``: diffusion latents are
  ``scaling_factor * z`` in both libraries) and no ``model_index.json``: diffusers has no
  pipeline for an unconditional or class-conditional U-Net on an ``AutoencoderKL``'s latents
  (``LDMPipeline`` takes a ``VQModel`` and decodes without the scaling factor; ``DiTPipeline``
  takes a transformer). Each part loads with ``<Class>.from_pretrained(out, subfolder=...)``;
  decode with ``vae.decode(latents / vae.config.scaling_factor)``.
* KL autoencoder (``vae_*`` runs) -> an ``AutoencoderKL`` folder (config.json + weights).
* Text-to-image (``t2i_*`` runs: our CLIP-style text encoder trained from scratch with a
  word-level tokenizer, and a ``UNetCondition``) -> ``unet/`` (``UNet2DConditionModel``),
  ``text_encoder/`` (transformers ``CLIPTextModel``: :class:`jaxdiff.nn.text.CLIPTextTransformer`
  is that architecture, parameter for parameter, pooling and padding mask included),
  ``tokenizer/`` (``vocab.json`` word -> id, and ``jaxdiff_tokenizer.json`` with the rules:
  there is no transformers tokenizer class for :class:`jaxdiff.tokenizers.WordTokenizer`;
  :func:`word_tokenizer_from_folder` rebuilds it), ``scheduler/``, and ``vae/`` for a latent
  run. No ``model_index.json``: ``StableDiffusionPipeline`` would need a ``CLIPTokenizer``, and
  it calls the U-Net without ``encoder_attention_mask`` while our U-Net never attends to
  padding tokens, so its images would not be ours. Call ``unet(x, t, encoder_hidden_states=
  text_encoder(ids, attention_mask=mask).last_hidden_state, encoder_attention_mask=mask)``.
* Fine-tuned Stable Diffusion U-Net -> :func:`export_sd_pipeline`: the base pipeline folder's
  other components copied, ``unet/`` written with the base U-Net's config.
* LoRA adapters of a fine-tuned Stable Diffusion U-Net -> :func:`export_sd_lora`: a folder with
  ``pytorch_lora_weights.safetensors`` (diffusers' name; peft keys, alpha in the header) that
  ``StableDiffusionPipeline.from_pretrained(BASE).load_lora_weights(out)`` applies to the base.

Every folder also gets ``jaxdiff_export.json`` (what was exported, from where, the notes above
that apply), which diffusers ignores.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

from jaxdiff.interop.clip import (clip_text_config_to_transformers,
                                  clip_text_params_to_transformers)
from jaxdiff.interop.unet2d import unet_config_to_diffusers, unet_params_to_diffusers
from jaxdiff.interop.unet2d_cond import (unet2d_condition_config_to_diffusers,
                                         unet2d_condition_params_to_diffusers)
from jaxdiff.interop.vae import vae_config_to_diffusers, vae_params_to_diffusers
from jaxdiff.schedules import betas_np

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS_NAME = "model.safetensors"
INFO_NAME = "jaxdiff_export.json"
PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
# The diffusers version the configs are written for (the one the tests load them with).
DIFFUSERS_VERSION = "0.42.0"

__all__ = ["check_output_folder", "ddpm_scheduler_config", "export_ddpm_pipeline", "export_sd_lora",
           "export_sd_pipeline",
           "export_text_to_image", "export_vae", "save_clip_text", "save_scheduler",
           "save_unet2d", "save_unet2d_condition", "save_vae", "save_word_tokenizer",
           "word_tokenizer_from_folder", "staged_folder"]


# ---------------------------------------------------------------------------------------------
# Files.

def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")


def _save_safetensors(path: str, state_dict: Mapping[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, path,
              metadata={"format": "pt"})  # transformers refuses files without it


def _diffusers_config(config: Mapping[str, Any]) -> dict:
    out = {"_class_name": config["_class_name"], "_diffusers_version": DIFFUSERS_VERSION}
    out.update({k: v for k, v in config.items() if k != "_class_name"})
    return out


def _save_model(folder: str, config: Mapping[str, Any], state_dict: Mapping[str, np.ndarray]):
    os.makedirs(folder, exist_ok=True)
    _write_json(os.path.join(folder, "config.json"), _diffusers_config(config))
    _save_safetensors(os.path.join(folder, WEIGHTS_NAME), state_dict)


def check_output_folder(out: str, overwrite: bool = False) -> str:
    """The absolute ``out``, or FileExistsError when it is a file, or a non-empty folder and
    not ``overwrite`` (what :func:`staged_folder` checks first; a CLI checks before loading)."""
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.lexists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{out} exists and is not a folder: choose another output folder.")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f"{out} is not empty: choose a new output folder, or pass "
                              "--overwrite (overwrite=True) to replace it.")
    return out


@contextlib.contextmanager
def staged_folder(out: str, overwrite: bool = False):
    """Yield a temporary folder beside ``out``; on success it becomes ``out`` (an existing
    ``out`` is replaced only with ``overwrite``), on any error it is removed and ``out`` is
    untouched. Raises FileExistsError at once for a non-empty ``out`` without ``overwrite`` or
    an ``out`` that is a file."""
    out = check_output_folder(out, overwrite)
    parent, name = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.isdir(out):
        old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
        os.rmdir(old)
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Components (each writes one subfolder; no staging: the export_* functions stage the whole).

def save_unet2d(folder: str, module: Any, params: Mapping, *, image_shape: Sequence[int]) -> dict:
    """``folder/config.json`` + weights of a diffusers ``UNet2DModel`` from a
    :class:`jaxdiff.nn.UNet` and its params; ``image_shape`` = (H, W, C) of the U-Net's inputs
    (places attention, sets ``sample_size`` and ``in_channels``). Returns the config."""
    h, w, c = (int(s) for s in image_shape)
    config = unet_config_to_diffusers(module, (h, w), c)
    _save_model(folder, config, unet_params_to_diffusers(params, config))
    return config


def save_unet2d_condition(folder: str, module: Any, params: Mapping, *,
                          sample_size: Optional[int] = None) -> dict:
    """A diffusers ``UNet2DConditionModel`` folder from a
    :class:`jaxdiff.nn.unet_cond.UNetCondition` and its params. Returns the config."""
    config = unet2d_condition_config_to_diffusers(module, sample_size)
    _save_model(folder, config, unet2d_condition_params_to_diffusers(params, config))
    return config


def save_vae(folder: str, module: Any, params: Mapping, *, sample_size: Optional[int] = None,
             scaling_factor: Optional[float] = None) -> dict:
    """A diffusers ``AutoencoderKL`` folder from a :class:`jaxdiff.nn.vae.AutoencoderKL`;
    ``scaling_factor``: the latent scale (a VAE run's ``scale_factor``). Returns the config."""
    config = vae_config_to_diffusers(module, sample_size, scaling_factor)
    _save_model(folder, config, vae_params_to_diffusers(params, config))
    return config


def save_clip_text(folder: str, module: Any, params: Mapping, *, bos_token_id: int,
                   pad_token_id: int) -> dict:
    """A transformers ``CLIPTextModel`` folder (config.json + model.safetensors) from a
    :class:`jaxdiff.nn.text.CLIPTextTransformer` and its params. Returns the config."""
    config = clip_text_config_to_transformers(module, bos_token_id=bos_token_id,
                                              pad_token_id=pad_token_id)
    state = clip_text_params_to_transformers(params, config)
    os.makedirs(folder, exist_ok=True)
    _write_json(os.path.join(folder, "config.json"), config)
    _save_safetensors(os.path.join(folder, TRANSFORMERS_WEIGHTS_NAME), state)
    return config


_WORD_RULES = ("lower-case (when 'lowercase'), split into words (\\w+) and single punctuation "
               "marks ([^\\w\\s]); words outside vocab.json -> unk_token; each row is [bos] + ids "
               "+ [eos], padded with pad_token (attention_mask 0) to model_max_length")


def save_word_tokenizer(folder: str, tokenizer: Any) -> None:
    """``vocab.json`` (token -> id, ids 0..V-1) and ``jaxdiff_tokenizer.json`` (special tokens,
    lower-casing, model_max_length and the rules in words) of a
    :class:`jaxdiff.tokenizers.WordTokenizer`. transformers has no class for it; the
    vocabulary is plain JSON so any code can tokenize the same way."""
    os.makedirs(folder, exist_ok=True)
    _write_json(os.path.join(folder, "vocab.json"), {w: i for i, w in enumerate(tokenizer.vocab)})
    _write_json(os.path.join(folder, "jaxdiff_tokenizer.json"), dict(
        tokenizer_class="jaxdiff.tokenizers.WordTokenizer",
        note="No transformers tokenizer class implements this word-level tokenizer; "
             "jaxdiff.interop.export.word_tokenizer_from_folder rebuilds it.",
        rules=_WORD_RULES, pattern=r"\w+|[^\w\s]", lowercase=bool(tokenizer.lowercase),
        bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token, unk_token=tokenizer.unk_token,
        model_max_length=int(tokenizer.model_max_length), padding="max_length"))


def word_tokenizer_from_folder(folder: str):
    """The :class:`jaxdiff.tokenizers.WordTokenizer` of a folder :func:`save_word_tokenizer`
    wrote (same ids)."""
    from jaxdiff.tokenizers import WordTokenizer

    with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as fh:
        vocab = json.load(fh)
    with open(os.path.join(folder, "jaxdiff_tokenizer.json"), encoding="utf-8") as fh:
        rules = json.load(fh)
    words = [w for w, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {rules[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    tok = WordTokenizer([w for w in words if w not in specials], bos_token=rules["bos_token"],
                        eos_token=rules["eos_token"], pad_token=rules["pad_token"],
                        unk_token=rules["unk_token"], lowercase=rules["lowercase"],
                        model_max_length=rules["model_max_length"])
    if tok.vocab != words:
        raise ValueError(f"word_tokenizer_from_folder: {folder}/vocab.json does not have the "
                         "WordTokenizer layout (pad, unk, words..., bos, eos)")
    return tok


# ---------------------------------------------------------------------------------------------
# Scheduler.

def _diffusers_betas(name: str, T: int, start: float, end: float, zero_snr: bool) -> np.ndarray:
    """diffusers' DDPMScheduler betas for ``beta_schedule=name``, transcribed in float64."""
    if name == "linear":
        b = np.linspace(start, end, T, dtype=np.float64)
    elif name == "scaled_linear":
        b = np.linspace(start ** 0.5, end ** 0.5, T, dtype=np.float64) ** 2
    elif name == "sigmoid":
        b = 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, T, dtype=np.float64))) * (end - start) \
            + start
    else:  # squaredcos_cap_v2
        f = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
        i = np.arange(T, dtype=np.float64)
        b = np.minimum(1.0 - f((i + 1) / T) / f(i / T), 0.999)
    if zero_snr:  # diffusers' rescale_zero_terminal_snr (Lin et al. 2024, Algorithm 1)
        s = np.sqrt(np.cumprod(1.0 - b))
        s = (s - s[-1]) * s[0] / (s[0] - s[-1])
        ab = s ** 2
        b = 1.0 - np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return b


_ENDPOINTS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "sigmoid": (1e-4, 0.02)}


def ddpm_scheduler_config(kind: str, num_timesteps: int,
                          schedule_options: Optional[Mapping[str, Any]] = None, *,
                          prediction: str = "eps", clip_x0: Optional[float] = None) -> dict:
    """A diffusers ``DDPMScheduler`` config for our schedule (the arguments of
    :func:`jaxdiff.schedules.make_schedule`), prediction type and x0 clipping.

    ``beta_schedule`` is named (linear, scaled_linear, sigmoid, squaredcos_cap_v2, with
    ``rescale_betas_zero_snr``) only when diffusers' formula for it, transcribed in float64,
    gives our betas to 1e-12 relative; otherwise (e.g. a cosine schedule with another ``s`` or
    ``max_beta``) ``trained_betas`` lists our float64 betas. ``prediction``: eps / x0 / v ->
    epsilon / sample / v_prediction. ``clip_x0``: our ``sample.clip_x0`` (None or 0 = off) ->
    ``clip_sample`` and ``clip_sample_range``. Spacing "leading", offset 0 and the posterior
    ("fixed_small") variance are our samplers' defaults too.
    """
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"ddpm_scheduler_config: unknown prediction {prediction!r} "
                         f"(one of {sorted(PREDICTION_TYPES)})")
    options = dict(schedule_options or {})
    T = int(num_timesteps)
    ours = betas_np(kind, T, **dict(options))  # validates kind and options
    zero_snr = bool(options.pop("rescale_zero_terminal_snr", False))
    base = "cosine" if kind in ("cosine", "squaredcos_cap_v2") else kind
    start, end = _ENDPOINTS.get(base, (1e-4, 0.02))
    start, end = float(options.get("beta_start", start)), float(options.get("beta_end", end))
    name = "squaredcos_cap_v2" if base == "cosine" else base
    named = np.allclose(_diffusers_betas(name, T, start, end, zero_snr), ours, rtol=1e-12,
                        atol=0.0)
    clip = float(clip_x0 or 0.0)
    return dict(
        _class_name="DDPMScheduler",
        num_train_timesteps=T,
        beta_schedule=name if named else "linear",
        beta_start=start,
        beta_end=end,
        trained_betas=None if named else [float(b) for b in ours],
        rescale_betas_zero_snr=zero_snr and named,
        variance_type="fixed_small",
        clip_sample=clip > 0,
        clip_sample_range=clip if clip > 0 else 1.0,
        prediction_type=PREDICTION_TYPES[prediction],
        thresholding=False,
        timestep_spacing="leading",
        steps_offset=0,
    )


def save_scheduler(folder: str, config: Mapping[str, Any]) -> None:
    """``folder/scheduler_config.json`` (what diffusers' schedulers read)."""
    os.makedirs(folder, exist_ok=True)
    _write_json(os.path.join(folder, "scheduler_config.json"), _diffusers_config(config))


# ---------------------------------------------------------------------------------------------
# Whole folders.

_VAE_NOTE = ("vae/: AutoencoderKL; the U-Net works on latents = vae.config.scaling_factor * z "
             "(decode with vae.decode(latents / vae.config.scaling_factor))")
_LATENT_NOTE = ("no model_index.json: diffusers has no pipeline for an unconditional or "
                "class-conditional UNet2DModel on AutoencoderKL latents (LDMPipeline takes a "
                "VQModel and decodes without the scaling factor; DiTPipeline takes a "
                "transformer); load unet/, scheduler/ and vae/ with <Class>.from_pretrained("
                "FOLDER, subfolder=...)")


def _info(kind: str, components: dict, notes: list, source: Optional[Mapping]) -> dict:
    return {"exported_by": "jaxdiff", "kind": kind, "components": components, "notes": notes,
            **({"source": dict(source)} if source else {})}


def export_ddpm_pipeline(out: str, unet: Any, params: Mapping, *, image_shape: Sequence[int],
                         scheduler: Mapping[str, Any], vae: Any = None, vae_params: Any = None,
                         vae_scaling_factor: Optional[float] = None,
                         vae_image_shape: Optional[Sequence[int]] = None,
                         class_names: Optional[Sequence[str]] = None,
                         source: Optional[Mapping] = None, overwrite: bool = False) -> dict:
    """A DDPM run's U-Net -> a diffusers folder; returns its ``jaxdiff_export.json`` dict.

    Pixel space (``vae=None``): a ``DDPMPipeline`` folder (``model_index.json``, ``unet/``,
    ``scheduler/``). Latent (``vae``, ``vae_params``, ``vae_scaling_factor`` and the VAE's
    ``vae_image_shape``): ``unet/``, ``scheduler/`` and ``vae/``, no ``model_index.json`` (see
    the module docstring). ``image_shape``: (H, W, C) the U-Net sees (latents for a latent
    run). ``scheduler``: :func:`ddpm_scheduler_config`. ``class_names`` are recorded with the
    label ids (and the null label) in ``jaxdiff_export.json``.
    """
    with staged_folder(out, overwrite) as tmp:
        ucfg = save_unet2d(os.path.join(tmp, "unet"), unet, params, image_shape=image_shape)
        save_scheduler(os.path.join(tmp, "scheduler"), scheduler)
        notes = []
        components = {"unet": "diffusers.UNet2DModel", "scheduler": "diffusers.DDPMScheduler"}
        if ucfg["num_class_embeds"] is not None:
            n = ucfg["num_class_embeds"] - 1
            notes.append(f"class-conditional: class_labels 0..{n - 1}; class_labels={n} is the "
                         "null label (unconditional branch of classifier-free guidance); "
                         "DDPMPipeline/DDIMPipeline.__call__ pass no labels, so sample with "
                         "your own loop: unet(x, t, class_labels=y)")
        if vae is None:
            _write_json(os.path.join(tmp, "model_index.json"), {
                "_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
                "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]})
            kind = "DDPMPipeline"
        else:
            vh = None if vae_image_shape is None else int(vae_image_shape[0])
            save_vae(os.path.join(tmp, "vae"), vae, vae_params, sample_size=vh,
                     scaling_factor=vae_scaling_factor)
            components["vae"] = "diffusers.AutoencoderKL"
            notes += [_VAE_NOTE, _LATENT_NOTE]
            kind = "latent UNet2DModel + AutoencoderKL"
        info = _info(kind, components, notes, source)
        if ucfg["num_class_embeds"] is not None:
            info["labels"] = {"num_classes": ucfg["num_class_embeds"] - 1,
                              "null_label": ucfg["num_class_embeds"] - 1,
                              **({"class_names": list(class_names)} if class_names else {})}
        _write_json(os.path.join(tmp, INFO_NAME), info)
    return info


def export_vae(out: str, vae: Any, params: Mapping, *, image_shape: Sequence[int],
               scaling_factor: Optional[float] = None, source: Optional[Mapping] = None,
               overwrite: bool = False) -> dict:
    """A KL autoencoder -> an ``AutoencoderKL`` folder (config.json + weights): load it with
    ``AutoencoderKL.from_pretrained(out)``. ``image_shape``: (H, W, C) it was trained on."""
    with staged_folder(out, overwrite) as tmp:
        save_vae(tmp, vae, params, sample_size=int(image_shape[0]), scaling_factor=scaling_factor)
        info = _info("AutoencoderKL", {".": "diffusers.AutoencoderKL"}, [], source)
        _write_json(os.path.join(tmp, INFO_NAME), info)
    return info


def export_text_to_image(out: str, text_encoder: Any, unet: Any, params: Mapping, tokenizer: Any,
                         *, image_shape: Sequence[int], scheduler: Mapping[str, Any],
                         vae: Any = None, vae_params: Any = None,
                         vae_scaling_factor: Optional[float] = None,
                         vae_image_shape: Optional[Sequence[int]] = None,
                         source: Optional[Mapping] = None, overwrite: bool = False) -> dict:
    """A text-to-image run (:class:`jaxdiff.nn.unet_cond.TextConditionedUNet` params
    ``{"text_encoder", "unet"}``) -> ``unet/`` (UNet2DConditionModel), ``text_encoder/``
    (transformers CLIPTextModel), ``tokenizer/`` (vocabulary JSON + rules), ``scheduler/``,
    and ``vae/`` for a latent run (see the module docstring for why no model_index.json)."""
    with staged_folder(out, overwrite) as tmp:
        save_unet2d_condition(os.path.join(tmp, "unet"), unet, params["unet"],
                              sample_size=int(image_shape[0]))
        save_clip_text(os.path.join(tmp, "text_encoder"), text_encoder, params["text_encoder"],
                       bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
        save_word_tokenizer(os.path.join(tmp, "tokenizer"), tokenizer)
        save_scheduler(os.path.join(tmp, "scheduler"), scheduler)
        components = {"unet": "diffusers.UNet2DConditionModel",
                      "text_encoder": "transformers.CLIPTextModel",
                      "tokenizer": "vocab.json + jaxdiff_tokenizer.json (no transformers class)",
                      "scheduler": "diffusers.DDPMScheduler"}
        notes = [
            "text_encoder/ is a transformers CLIPTextModel (same architecture, parameter for "
            "parameter); call it with attention_mask: padding never takes part",
            "tokenizer/: jaxdiff's word-level tokenizer; no transformers class implements it "
            "(vocab.json maps words to ids; jaxdiff_tokenizer.json has the rules)",
            "no model_index.json: StableDiffusionPipeline needs a CLIPTokenizer and calls the "
            "U-Net without encoder_attention_mask; ours never attends to padding tokens: call "
            "unet(x, t, encoder_hidden_states=text_encoder(ids, attention_mask=mask)"
            ".last_hidden_state, encoder_attention_mask=mask)",
            "classifier-free guidance: the unconditional branch is the empty caption \"\""]
        if vae is not None:
            vh = None if vae_image_shape is None else int(vae_image_shape[0])
            save_vae(os.path.join(tmp, "vae"), vae, vae_params, sample_size=vh,
                     scaling_factor=vae_scaling_factor)
            components["vae"] = "diffusers.AutoencoderKL"
            notes.append(_VAE_NOTE)
        info = _info("text-to-image (UNet2DConditionModel + CLIPTextModel)", components, notes,
                     source)
        _write_json(os.path.join(tmp, INFO_NAME), info)
    return info


def export_sd_pipeline(base_folder: str, unet_params: Mapping, out: str, *,
                       text_encoder_params: Optional[Mapping] = None, overwrite: bool = False,
                       source: Optional[Mapping] = None) -> dict:
    """A fine-tuned Stable Diffusion U-Net -> a whole pipeline folder: every entry of the base
    pipeline folder (``model_index.json``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
    ``scheduler/``, ...; symlinks, as in a Hub cache snapshot, are copied as files) except
    ``unet/``, which is written from ``unet_params`` (float32) with the base U-Net's
    ``config.json``. ``text_encoder_params`` (a run that also trained the CLIP text encoder)
    likewise replace ``text_encoder/``'s weights, with the base's ``config.json``. The params
    are checked against those configs before anything is written."""
    base = os.path.abspath(os.path.expanduser(base_folder))
    index = os.path.join(base, "model_index.json")
    ucfg_path = os.path.join(base, "unet", "config.json")
    if not os.path.isfile(index) or not os.path.isfile(ucfg_path):
        raise FileNotFoundError(f"export_sd_pipeline: {base} is not a diffusers pipeline folder "
                                "with a U-Net (model_index.json and unet/config.json)")
    target = os.path.abspath(os.path.expanduser(out))
    if target == base or target.startswith(base + os.sep) or base.startswith(target + os.sep):
        raise ValueError(f"export_sd_pipeline: the output {target} must lie outside the base "
                         f"folder {base} (and not contain it)")
    with open(ucfg_path, encoding="utf-8") as fh:
        ucfg = json.load(fh)
    state = unet2d_condition_params_to_diffusers(unet_params, ucfg)  # checks before any copy
    replaced = {"unet"}
    if text_encoder_params is not None:
        tcfg_path = os.path.join(base, "text_encoder", "config.json")
        if not os.path.isfile(tcfg_path):
            raise FileNotFoundError(f"export_sd_pipeline: {tcfg_path} not found (text encoder "
                                    "params were given)")
        with open(tcfg_path, encoding="utf-8") as fh:
            tcfg = json.load(fh)
        text_state = clip_text_params_to_transformers(text_encoder_params, tcfg)
        replaced.add("text_encoder")
    with staged_folder(out, overwrite) as tmp:
        for entry in sorted(os.listdir(base)):
            if entry in replaced or entry.startswith("."):
                continue
            src = os.path.join(base, entry)
            if os.path.isdir(src):
                shutil.copytree(src, os.path.join(tmp, entry), symlinks=False)
            else:
                shutil.copy2(src, os.path.join(tmp, entry))
        os.makedirs(os.path.join(tmp, "unet"))
        shutil.copy2(ucfg_path, os.path.join(tmp, "unet", "config.json"))  # the base's, as is
        _save_safetensors(os.path.join(tmp, "unet", WEIGHTS_NAME), state)
        components = {"unet": "diffusers.UNet2DConditionModel (trained)"}
        if text_encoder_params is not None:
            os.makedirs(os.path.join(tmp, "text_encoder"))
            shutil.copy2(tcfg_path, os.path.join(tmp, "text_encoder", "config.json"))
            _save_safetensors(os.path.join(tmp, "text_encoder", TRANSFORMERS_WEIGHTS_NAME),
                              text_state)
            components["text_encoder"] = "transformers.CLIPTextModel (trained)"
        components["others"] = f"copied from {base}"
        info = _info("StableDiffusion pipeline (fine-tuned " + ", ".join(
            f"{r}/" for r in sorted(replaced)) + ")", components, [], source)
        _write_json(os.path.join(tmp, INFO_NAME), info)
    return info


def export_sd_lora(out: str, lora_params: Mapping, *, rank: int, alpha: float, base_folder: str,
                   dtype: Any = np.float32, overwrite: bool = False,
                   source: Optional[Mapping] = None) -> dict:
    """LoRA adapters of a fine-tuned Stable Diffusion U-Net -> a folder holding
    ``pytorch_lora_weights.safetensors`` (:func:`jaxdiff.interop.lora.save_diffusers_lora`: peft
    key names, ``alpha`` in the ``lora_adapter_metadata`` header) and ``jaxdiff_export.json``
    naming the base folder. Load it on the base pipeline with
    ``StableDiffusionPipeline.from_pretrained(base_folder).load_lora_weights(out)``.
    ``lora_params``: the adapters tree of :mod:`jaxdiff.nn.lora` (a run's ``trainable["lora"]``);
    ``dtype``: of the stored tensors (float16 halves the file)."""
    from jaxdiff.interop.lora import WEIGHT_NAME, save_diffusers_lora

    base = os.path.abspath(os.path.expanduser(base_folder))
    with staged_folder(out, overwrite) as tmp:
        save_diffusers_lora(os.path.join(tmp, WEIGHT_NAME), lora_params, alpha=alpha, rank=rank,
                            dtype=dtype)
        components = {".": f"{WEIGHT_NAME} (LoRA rank {rank}, alpha {alpha:g}: load_lora_weights "
                           f"on {base})"}
        notes = [f"LoRA adapters only: load {base} (the base pipeline) and call "
                 "pipe.load_lora_weights(this folder); --merge writes a whole pipeline instead"]
        info = _info("StableDiffusion LoRA (U-Net attention adapters)", components, notes, source)
        info["base"] = base
        _write_json(os.path.join(tmp, INFO_NAME), info)
    return info
