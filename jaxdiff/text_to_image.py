"""Stable Diffusion 1.x text-to-image from a diffusers-layout folder.

    sd = load_stable_diffusion("stable-diffusion-v1-5")          # unet/ vae/ text_encoder/ tokenizer/ scheduler/
    images = text_to_image(sd, ["a photo of a cat"] * 4, key=jax.random.key(0),
                           num_steps=25, method="dpmpp_2m", guidance_scale=7.5)
    images.shape, images.dtype                                   # (4, 512, 512, 3) float32 in [0, 1]
    jaxdiff.images.to_uint8(images, value_range=(0, 1))          # uint8, rounded as diffusers' numpy_to_pil

What it computes is diffusers' ``StableDiffusionPipeline`` (``output_type="np"``): prompts are
tokenized to ``model_max_length`` (77) tokens, encoded by the CLIP text encoder (last hidden state,
no attention mask for SD 1.x), the U-Net is guided by classifier-free guidance against the
negative prompt ("" by default) in ONE batched forward per step, and the final latents are decoded
by the VAE after dividing by its ``scaling_factor``; pixels are ``clip(x / 2 + 0.5, 0, 1)``.

The scheduler settings come from ``scheduler/scheduler_config.json`` as ``from_config`` would carry
them to any diffusers scheduler (beta schedule, prediction type, ``timestep_spacing`` when the file
has it, else the sampler's diffusers default, ``steps_offset``, ``set_alpha_to_one`` for DDIM,
``clip_sample``/``thresholding``, ``use_karras_sigmas``, ``rescale_betas_zero_snr``). Known
differences from diffusers: DDIM with ``"linspace"`` spacing steps to the next grid timestep
(diffusers steps to ``t - T // N``); PNDM is its PLMS form (``skip_prk_steps``, SD 1.x's setting):
a folder whose PNDMScheduler asks for the Runge-Kutta warm-up names no default sampler (pass ``method``).

Many images in batches (one compiled shape, keys ``fold_in(key, i)``): :func:`jaxdiff.generation.generate_sd`.

Compilation: text encoding, the sampling loop (one ``lax.scan``) and VAE decoding are ONE
``jax.jit`` whose arguments are the params (never baked in as constants), token ids, noise, the
guidance scale and the key. New prompts, negative prompts, keys, latents or guidance scales reuse
the compiled program; a new batch size, image size, method or step count compiles anew, as does
crossing ``guidance_scale = 1`` (at or below 1 the unguided model runs alone, as in diffusers).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import sampling, xla
from jaxdiff.interop.clip import load_transformers_clip_text
from jaxdiff.interop.unet2d_cond import load_unet2d_condition
from jaxdiff.interop.vae import load_diffusers_vae
from jaxdiff.nn.text import CLIPTextTransformer
from jaxdiff.nn.unet_cond import UNetCondition
from jaxdiff.nn.vae import AutoencoderKL
from jaxdiff.schedules import Schedule, betas_np, rescale_zero_terminal_snr, schedule_from_betas
from jaxdiff.tokenizers import CLIPTokenizer

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# The sampler that reproduces each diffusers scheduler class a folder may name.
SCHEDULER_METHODS = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "DPMSolverMultistepScheduler": "dpmpp_2m",
                     "EulerDiscreteScheduler": "euler", "HeunDiscreteScheduler": "heun",
                     "EulerAncestralDiscreteScheduler": "euler_ancestral", "PNDMScheduler": "pndm"}


# ----------------------------------------------------------------------------- scheduler config
@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """What the samplers need from a diffusers ``scheduler_config.json`` (hashable, host-side).

    ``timestep_spacing=None`` means "the file does not say": each method takes diffusers' default
    (``sampling.DEFAULT_SPACING``). ``set_alpha_to_one=False`` (SD 1.x) makes DDIM's last step land
    on ``alpha_bar[0]`` instead of clean data, as diffusers' DDIMScheduler does.
    """

    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    trained_betas: Optional[tuple] = None
    rescale_betas_zero_snr: bool = False
    prediction: str = "eps"
    timestep_spacing: Optional[str] = None
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    clip_sample: Optional[float] = None  # clip_sample_range when clip_sample (ddim/ddpm only)
    thresholding: Optional[tuple] = None  # (dynamic_thresholding_ratio, sample_max_value)
    use_karras_sigmas: bool = False
    scheduler_class: Optional[str] = None  # the file's "_class_name"
    method: Optional[str] = None  # the jaxdiff sampler of that class (None: no equivalent)

    @classmethod
    def from_diffusers(cls, config: dict, path: str = "scheduler_config.json") -> "SchedulerConfig":
        def err(msg):
            return ValueError(f"load_stable_diffusion: {path}: {msg}")

        c = {k: v for k, v in config.items() if v is not None}
        pred = c.get("prediction_type", "epsilon")
        if pred not in _PREDICTIONS:
            raise err(f"unsupported prediction_type={pred!r} (supported: {list(_PREDICTIONS)})")
        sched = c.get("beta_schedule", "linear")
        trained = c.get("trained_betas")
        if trained is None and sched not in _BETA_SCHEDULES:
            raise err(f"unsupported beta_schedule={sched!r} (supported: {list(_BETA_SCHEDULES)})")
        spacing = c.get("timestep_spacing")
        if spacing is not None and spacing not in ("leading", "trailing", "linspace"):
            raise err(f"unsupported timestep_spacing={spacing!r}")
        return cls(
            num_train_timesteps=int(c.get("num_train_timesteps", 1000)),
            beta_schedule=sched,
            beta_start=float(c.get("beta_start", 0.0001)),
            beta_end=float(c.get("beta_end", 0.02)),
            trained_betas=None if trained is None else tuple(float(b) for b in trained),
            rescale_betas_zero_snr=bool(c.get("rescale_betas_zero_snr", False)),
            prediction=_PREDICTIONS[pred],
            timestep_spacing=spacing,
            steps_offset=int(c.get("steps_offset", 0)),
            set_alpha_to_one=bool(c.get("set_alpha_to_one", True)),
            clip_sample=float(c.get("clip_sample_range", 1.0)) if c.get("clip_sample", False) else None,
            thresholding=((float(c.get("dynamic_thresholding_ratio", 0.995)), float(c.get("sample_max_value", 1.0)))
                          if c.get("thresholding", False) else None),
            use_karras_sigmas=bool(c.get("use_karras_sigmas", False)),
            scheduler_class=c.get("_class_name"),
            # PNDM's Runge-Kutta warm-up (skip_prk_steps=false) is not implemented: no default then.
            method=(None if c.get("_class_name") == "PNDMScheduler" and not c.get("skip_prk_steps", False)
                    else SCHEDULER_METHODS.get(c.get("_class_name"))),
        )


@functools.lru_cache(maxsize=16)
def build_schedule(cfg: SchedulerConfig) -> Schedule:
    """The training :class:`Schedule` of a scheduler config (cached: one per config)."""
    if cfg.trained_betas is not None:
        betas = np.asarray(cfg.trained_betas, np.float64)
        if cfg.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
    else:
        opts = {} if cfg.beta_schedule == "squaredcos_cap_v2" else dict(beta_start=cfg.beta_start,
                                                                         beta_end=cfg.beta_end)
        betas = betas_np(cfg.beta_schedule, cfg.num_train_timesteps,
                         rescale_zero_terminal_snr=cfg.rescale_betas_zero_snr, **opts)
    with jax.ensure_compile_time_eval():  # concrete arrays even when first built under a trace
        return schedule_from_betas(betas)


# ----------------------------------------------------------------------------- the model holder
@dataclasses.dataclass(frozen=True, eq=False)
class StableDiffusion:
    """A loaded Stable Diffusion 1.x: modules (static, hashable), their params and the tokenizer.

    A pytree whose only leaves are the params (``{"unet", "vae", "text_encoder"}`` -> nested dicts
    of arrays), so ``jax.device_put(sd, sharding)`` or ``jax.tree.map(f, sd)`` act on the weights.
    """

    unet: UNetCondition
    vae: AutoencoderKL
    text_encoder: CLIPTextTransformer
    tokenizer: CLIPTokenizer
    scheduler: SchedulerConfig
    params: dict
    sample_size: int = 64  # the U-Net's default latent size (diffusers' unet.config.sample_size)
    use_attention_mask: bool = False  # text_encoder.config.use_attention_mask (False for SD 1.x)
    folder: str = ""

    @property
    def schedule(self) -> Schedule:
        return build_schedule(self.scheduler)

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.downsample_factor

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.scaling_factor)

    @property
    def default_size(self) -> int:
        """Default image height = width in pixels (512 for SD 1.x)."""
        return self.sample_size * self.vae_scale_factor


jax.tree_util.register_dataclass(
    StableDiffusion, data_fields=["params"],
    meta_fields=["unet", "vae", "text_encoder", "tokenizer", "scheduler", "sample_size", "use_attention_mask",
                 "folder"])


# ----------------------------------------------------------------------------- loading
def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def load_clip_tokenizer(folder: str) -> CLIPTokenizer:
    """A CLIP tokenizer folder: ``vocab.json`` + ``merges.txt`` (SD checkpoints on the Hub), or only
    ``tokenizer.json`` (what transformers >= 5 ``save_pretrained`` writes), plus the special-token
    settings of ``tokenizer_config.json`` / ``special_tokens_map.json``; see
    :meth:`CLIPTokenizer.from_folder`, which reads both layouts."""
    return CLIPTokenizer.from_folder(folder)


def load_stable_diffusion(folder: str, *, dtype: Any = None,
                          attention_implementation: Optional[str] = None) -> StableDiffusion:
    """Load a Stable Diffusion 1.x pipeline folder in diffusers layout.

    ``folder`` holds ``unet/``, ``vae/``, ``text_encoder/`` (safetensors weights + config.json),
    ``tokenizer/`` and ``scheduler/scheduler_config.json`` (``model_index.json`` is optional).
    ``dtype`` is the compute dtype of the three networks (float32 by default, or jnp.bfloat16);
    params stay float32 and the sampler arithmetic float32. ``attention_implementation`` goes to
    ``jax.nn.dot_product_attention`` ("cudnn" on GPU). Missing pieces raise FileNotFoundError
    naming them; unsupported or mismatched components raise ValueError.
    """
    folder = os.path.expanduser(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"load_stable_diffusion: no such folder: {folder!r}")
    index_path = os.path.join(folder, "model_index.json")
    if os.path.isfile(index_path):
        index = _read_json(index_path)
        cls = index.get("_class_name", "")
        if "text_encoder_2" in index or "XL" in cls or "StableDiffusion3" in cls:
            raise ValueError(f"load_stable_diffusion: {folder} is a {cls or 'multi-encoder'} pipeline; only "
                             "Stable Diffusion 1.x/2.x (one CLIP text encoder, UNet2DConditionModel) is supported")
    missing = [s + "/" for s in SUBFOLDERS if not os.path.isdir(os.path.join(folder, s))]
    if missing:
        raise FileNotFoundError(
            f"load_stable_diffusion: {folder} lacks {', '.join(missing)}: a Stable Diffusion folder in diffusers "
            f"layout has the subfolders {', '.join(s + '/' for s in SUBFOLDERS)} "
            "(e.g. StableDiffusionPipeline.save_pretrained, or a snapshot of the Hub repository)")
    sched_path = os.path.join(folder, "scheduler", "scheduler_config.json")
    if not os.path.isfile(sched_path):
        raise FileNotFoundError(f"load_stable_diffusion: {sched_path} not found")
    scheduler = SchedulerConfig.from_diffusers(_read_json(sched_path), sched_path)

    unet, unet_params = load_unet2d_condition(folder, subfolder="unet", dtype=dtype,
                                              attention_implementation=attention_implementation)
    unet_cfg = _read_json(os.path.join(folder, "unet", "config.json"))
    vae, vae_params = load_diffusers_vae(folder, subfolder="vae", dtype=dtype)
    te_folder = os.path.join(folder, "text_encoder")
    text_encoder, te_params = load_transformers_clip_text(te_folder, dtype=dtype,
                                                          implementation=attention_implementation)
    te_cfg = _read_json(os.path.join(te_folder, "config.json"))
    tokenizer = CLIPTokenizer.from_folder(os.path.join(folder, "tokenizer"))

    if unet.cross_attention_dim != text_encoder.hidden_size:
        raise ValueError(f"load_stable_diffusion: unet cross_attention_dim={unet.cross_attention_dim} but the text "
                         f"encoder's hidden_size is {text_encoder.hidden_size}")
    if unet.in_channels != vae.latent_channels or unet.out_channels != vae.latent_channels:
        raise ValueError(f"load_stable_diffusion: the unet maps {unet.in_channels} -> {unet.out_channels} channels "
                         f"but the VAE has {vae.latent_channels} latent channels (inpainting/depth UNets are "
                         "not supported)")
    if tokenizer.model_max_length > text_encoder.max_position_embeddings:
        raise ValueError(f"load_stable_diffusion: tokenizer model_max_length={tokenizer.model_max_length} exceeds "
                         f"the text encoder's max_position_embeddings={text_encoder.max_position_embeddings}")
    if max(tokenizer.encoder.values()) >= text_encoder.vocab_size:
        raise ValueError(f"load_stable_diffusion: the tokenizer has ids up to {max(tokenizer.encoder.values())} "
                         f"but the text encoder's vocab_size is {text_encoder.vocab_size}")
    sample_size = unet_cfg.get("sample_size", 64)
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0]
    params = jax.device_put({"unet": unet_params, "vae": vae_params, "text_encoder": te_params})
    return StableDiffusion(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                           params=params, sample_size=int(sample_size),
                           use_attention_mask=bool(te_cfg.get("use_attention_mask", False)),
                           folder=os.path.abspath(folder))


# ----------------------------------------------------------------------------- text
def _as_prompts(prompts: Union[str, Sequence[str]], name: str = "prompts") -> list:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{name} must be a string or a non-empty sequence of strings, got {prompts!r}")
    return prompts


def tokenize(sd: StableDiffusion, prompts: Union[str, Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` int32 ``[B, model_max_length]``: padded to the max length and
    truncated, as diffusers' ``encode_prompt``."""
    tok = sd.tokenizer(_as_prompts(prompts), max_length=sd.tokenizer.model_max_length, padding="max_length",
                       truncation=True)
    return tok["input_ids"], tok["attention_mask"]


def _encode(text_encoder: CLIPTextTransformer, params, ids, mask, clip_skip: int) -> jax.Array:
    """Traceable: ids [B, L] -> hidden states [B, L, D] float32 (diffusers' ``prompt_embeds``)."""
    last, _ = text_encoder.apply({"params": params}, ids, mask, clip_skip=clip_skip)
    return last


@functools.partial(xla.jit, static_argnames=("text_encoder", "clip_skip"))
def _encode_jit(params, ids, mask, *, text_encoder, clip_skip):
    return _encode(text_encoder, params, ids, mask, clip_skip)


def encode_prompts(sd: StableDiffusion, prompts: Union[str, Sequence[str]], *,
                   clip_skip: int = 0) -> tuple[jax.Array, Optional[jax.Array]]:
    """Prompts -> ``(context [B, 77, D] float32, mask)`` as the U-Net's cross-attention input.

    SD 1.x: the text encoder's last hidden state over all 77 positions (padding included) and no
    mask (``mask`` is None; the U-Net attends to every position). Only a text encoder whose config
    sets ``use_attention_mask`` sees the tokenizer mask, which is then returned too (diffusers
    never passes it on to the U-Net). ``clip_skip=k`` takes the k-th hidden state from the end
    through the final LayerNorm (diffusers' ``clip_skip``).
    """
    ids, mask = tokenize(sd, prompts)
    mask = jnp.asarray(mask) if sd.use_attention_mask else None
    context = _encode_jit(sd.params["text_encoder"], jnp.asarray(ids), mask, text_encoder=sd.text_encoder,
                          clip_skip=int(clip_skip))
    return context, mask


# ----------------------------------------------------------------------------- generation
@functools.lru_cache(maxsize=16)
def _unet_fn(unet: UNetCondition):
    """``model_fn(x_t, t, context, *, params)`` for the samplers; one per U-Net config (hashable)."""

    def model_fn(x_t, t, context, *, params):
        return unet.apply({"params": params}, x_t, t, context)

    return model_fn


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about one compiled generation (hashable)."""

    unet: UNetCondition
    vae: AutoencoderKL
    text_encoder: CLIPTextTransformer
    scheduler: SchedulerConfig
    use_attention_mask: bool
    method: str
    num_steps: int
    timestep_spacing: str
    use_karras_sigmas: bool
    guided: bool
    clip_skip: int
    final_alpha: Optional[float]  # DDIM/PNDM with set_alpha_to_one=False: alpha_bar[0]


@functools.partial(xla.jit, static_argnames=("spec",))
def _generate(params, ids, mask, latents, guidance_scale, key, *, spec: _Spec):
    """ids/mask: [B or 2B, L] (conditional rows first, then the negative prompts when guided);
    latents: [B, h, w, c] initial noise; key: for stochastic samplers. Returns images [B, H, W, 3]."""
    context = _encode(spec.text_encoder, params["text_encoder"], ids, mask if spec.use_attention_mask else None,
                      spec.clip_skip)
    b = latents.shape[0]
    cfg = spec.scheduler
    fn = _unet_fn(spec.unet)
    if spec.guided:
        model_fn = sampling.cfg_model_fn(fn)
        extra = dict(params=params["unet"], cond=context[:b], null_cond=context[b:], guidance_scale=guidance_scale)
    else:
        model_fn, extra = fn, dict(params=params["unet"], context=context)
    kwargs = dict(method=spec.method, num_steps=spec.num_steps, key=key, prediction=cfg.prediction,
                  timestep_spacing=spec.timestep_spacing, steps_offset=cfg.steps_offset, extra_args=extra)
    if spec.method in ("ddim", "ddpm"):
        kwargs["clip_x0"] = cfg.clip_sample
    if spec.method in ("ddim", "ddpm", "dpmpp_2m"):
        kwargs["dynamic_threshold"] = cfg.thresholding
    if spec.use_karras_sigmas:
        kwargs["use_karras_sigmas"] = True
    if spec.final_alpha is not None:  # DDIM/PNDM with set_alpha_to_one=False (SD 1.x)
        kwargs["final_alpha_cumprod"] = spec.final_alpha
    z = sampling.sample(model_fn, build_schedule(cfg), latents, **kwargs)
    z = z / jnp.float32(spec.vae.scaling_factor)
    if spec.vae.shift_factor is not None:
        z = z + jnp.float32(spec.vae.shift_factor)
    x = spec.vae.apply({"params": params["vae"]}, z, method=AutoencoderKL.decode)
    return jnp.clip(x / 2.0 + 0.5, 0.0, 1.0)


def text_to_image(sd: StableDiffusion, prompts: Union[str, Sequence[str]], *, key: jax.Array,
                  num_steps: int = 50, guidance_scale: float = 7.5, method: Optional[str] = None,
                  height: Optional[int] = None, width: Optional[int] = None,
                  negative_prompt: Union[str, Sequence[str]] = "", latents: Optional[jax.Array] = None,
                  timestep_spacing: Optional[str] = None, use_karras_sigmas: Optional[bool] = None,
                  clip_skip: int = 0) -> jax.Array:
    """Generate one image per prompt: float32 ``[B, H, W, 3]`` in ``[0, 1]`` (B = number of prompts).

    Args:
      sd: from :func:`load_stable_diffusion`.
      prompts: a string or a list of B strings.
      key: PRNG key for the initial noise (unless ``latents`` is given) and stochastic samplers.
      num_steps: sampler steps. method: one of ``sampling.METHODS`` ("ddim", "dpmpp_2m", "euler",
        "heun", "ddpm", "euler_ancestral", "pndm"); None: the sampler of the folder's own scheduler
        (``scheduler_config.json``'s class: PNDM for Stable Diffusion 1.x).
      guidance_scale: classifier-free guidance ``w``: ``eps_u + w (eps_c - eps_u)``, conditional and
        negative-prompt branches in one batched U-Net call; ``w <= 1`` runs the conditional model
        alone (diffusers' rule).
      height, width: pixels (default ``sd.default_size``, 512 for SD 1.x); multiples of the VAE factor
        times the U-Net's downsampling.
      negative_prompt: the unconditional branch's text: one string for all, or B strings.
      latents: initial noise ``[B, H/f, W/f, 4]`` (NHWC; diffusers' ``latents`` transposed), standard
        normal: samplers scale it as they need (diffusers' ``init_noise_sigma``).
      timestep_spacing, use_karras_sigmas: override the scheduler config (None keeps it).
      clip_skip: use the k-th last hidden state of the text encoder (0: the last, SD 1.x).
    """
    prompts = _as_prompts(prompts)
    b = len(prompts)
    if method is None:
        method = sd.scheduler.method
        if method is None:
            raise ValueError(f"The folder's scheduler ({sd.scheduler.scheduler_class or 'no _class_name'}) has no "
                             f"jaxdiff sampler: choose one of {sampling.METHODS}.")
    if method not in sampling.METHODS:
        raise ValueError(f"Unknown sampling method {method!r}; choose one of {sampling.METHODS}.")
    f = sd.vae_scale_factor
    height = sd.default_size if height is None else int(height)
    width = sd.default_size if width is None else int(width)
    unet_f = 2 ** (len(sd.unet.block_out_channels) - 1)
    if height <= 0 or width <= 0 or height % (f * unet_f) or width % (f * unet_f):
        raise ValueError(f"height and width must be positive multiples of {f * unet_f} (VAE factor {f} x U-Net "
                         f"downsampling {unet_f}), got {height}x{width}")
    latent_shape = (height // f, width // f, sd.vae.latent_channels)
    k_noise, k_sample = jax.random.split(key)
    if latents is None:
        latents = jax.random.normal(k_noise, (b, *latent_shape), jnp.float32)
    latents = jnp.asarray(latents, jnp.float32)
    if latents.shape != (b, *latent_shape):
        raise ValueError(f"latents must be [B, H/f, W/f, C] = {(b, *latent_shape)} (NHWC), got {latents.shape}")
    cfg = sd.scheduler
    spacing = timestep_spacing or cfg.timestep_spacing or sampling.DEFAULT_SPACING[method]
    karras = cfg.use_karras_sigmas if use_karras_sigmas is None else bool(use_karras_sigmas)
    karras = karras and method in sampling.KARRAS_METHODS
    if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= cfg.num_train_timesteps:
        raise ValueError(f"num_steps must be an integer in [1, {cfg.num_train_timesteps}], got {num_steps!r}")
    final_alpha = None
    if method in ("ddim", "pndm") and not cfg.set_alpha_to_one:
        final_alpha = float(np.asarray(sd.schedule.alphas_cumprod, np.float64)[0])
    guided = float(guidance_scale) > 1.0
    texts = prompts
    if guided:
        neg = [negative_prompt] * b if isinstance(negative_prompt, str) else _as_prompts(negative_prompt,
                                                                                          "negative_prompt")
        if len(neg) != b:
            raise ValueError(f"negative_prompt has {len(neg)} entries for {b} prompts")
        texts = prompts + neg
    ids, mask = tokenize(sd, texts)
    spec = _Spec(unet=sd.unet, vae=sd.vae, text_encoder=sd.text_encoder, scheduler=cfg,
                 use_attention_mask=sd.use_attention_mask, method=method,
                 num_steps=int(num_steps), timestep_spacing=spacing, use_karras_sigmas=karras, guided=guided,
                 clip_skip=int(clip_skip), final_alpha=final_alpha)
    return _generate(sd.params, jnp.asarray(ids), jnp.asarray(mask), latents, jnp.float32(guidance_scale),
                     k_sample, spec=spec)
