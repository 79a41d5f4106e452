"""The model adapters the train steps and the samplers call: a network plus what it needs to be called.

- :class:`DiffusionModel`: a U-Net (class-conditional or not) on pixels or latents; ``apply``,
  ``init_params``, ``train_apply_fn`` for :func:`jaxdiff.diffusion.diffusion_loss`, and the sampling
  ``model_fn``s (params and labels as traced keyword arguments).
- :class:`TextDiffusionModel`: text encoder + cross-attention U-Net trained together, and its tokenizer.
- :class:`PretrainedTextDiffusionModel`: a Stable Diffusion 1.x folder being fine-tuned: its U-Net
  (full or LoRA), frozen (or trained) CLIP text encoder, frozen VAE, tokenizer and base weights.
- :class:`VAEModel`: a KL autoencoder; :class:`LatentAutoencoder`: a trained, frozen one with its
  latent scale factor, as latent diffusion uses it; :func:`latent_statistics` makes that factor.

Built from a config by :mod:`jaxdiff.train.build`; every method is a pure function of explicit params.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import xla
from jaxdiff.diffusion import PREDICTIONS, Denoiser
from jaxdiff.images import to_uint8
from jaxdiff.nn.unet import UNet
from jaxdiff.nn.unet_cond import TextConditionedUNet
from jaxdiff.nn.vae import AutoencoderKL, DiagonalGaussian


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(eq=False)
class DiffusionModel:
    """A denoiser network plus what it needs to be called: image shape, label count and what it predicts.

    ``prediction`` (``"eps"``, ``"x0"`` or ``"v"``) is the parameterisation, bound here once: the
    train step's loss target, the samplers' conversion to (x0, eps), bits/dim and export all read it
    from the model, never from the config."""

    module: UNet
    image_shape: tuple[int, int, int]  # what the U-Net sees: pixels, or latents for latent diffusion
    num_classes: int | None = None
    autoencoder: "LatentAutoencoder | None" = None  # latent diffusion: decodes samples to pixels
    prediction: str = "eps"

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"diffusion.prediction must be one of {PREDICTIONS}, got {self.prediction!r}.")

    text_conditional = False  # True for :class:`TextDiffusionModel`

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """Shape of the images :func:`generate` returns (decoded pixels for a latent model)."""
        return self.autoencoder.vae.image_shape if self.autoencoder is not None else self.image_shape

    def init_params(self, key: jax.Array) -> Any:
        x = jnp.zeros((1, *self.image_shape), jnp.float32)
        t = jnp.zeros((1,), jnp.float32)
        y = jnp.zeros((1,), jnp.int32) if self.conditional else None
        return self.module.init({"params": key}, x, t, y, train=False)["params"]

    def apply(self, params, x_t, t, labels=None, *, train=False, key=None) -> jax.Array:
        rngs = {"dropout": key} if train else None
        return self.module.apply({"params": params}, x_t, t, labels, train=train, rngs=rngs)

    # Sampling model functions: built once per model, so the samplers' jit cache (keyed on the
    # function) is hit on every call; params and labels come in as traced keyword arguments.
    # Each is a :class:`jaxdiff.diffusion.Denoiser`: the function with this model's prediction type.
    @functools.cached_property
    def label_model_fn(self) -> Denoiser:
        def model_fn(x_t, t, labels=None, *, params):
            return self.apply(params, x_t, t, labels)

        return Denoiser(model_fn, self.prediction)

    @functools.cached_property
    def uncond_model_fn(self) -> Denoiser:
        def model_fn(x_t, t, *, params):
            return self.apply(params, x_t, t)

        return Denoiser(model_fn, self.prediction)

    def train_apply_fn(self, p_uncond: float = 0.0):
        """``apply_fn(params, x_t, t, batch, key)`` for :func:`jaxdiff.diffusion.diffusion_loss`.

        For a conditional model, labels are replaced by the null label with probability
        ``p_uncond`` (classifier-free guidance training, Ho & Salimans 2022)."""

        def apply_fn(params, x_t, t, batch, key):
            drop_key, dropout_key = jax.random.split(key)
            labels = None
            if self.conditional:
                labels = batch["label"]
                if p_uncond > 0:
                    drop = jax.random.bernoulli(drop_key, p_uncond, labels.shape)
                    labels = jnp.where(drop, self.num_classes, labels)
            return self.apply(params, x_t, t, labels, train=True, key=dropout_key)

        return Denoiser(apply_fn, self.prediction)


@dataclasses.dataclass(eq=False)
class TextDiffusionModel(DiffusionModel):
    """A :class:`jaxdiff.nn.TextConditionedUNet` (text encoder + cross-attention U-Net, trained
    together) and its tokenizer: a ``model.type = "text_unet"`` config (``experiments/configs/t2i_*.py``).

    Params are ``{"text_encoder": ..., "unet": ...}``. Captions are tokenized to ``max_length``
    ids (bos, words, eos, padding); padding is masked out of every attention. Classifier-free
    guidance uses the empty caption ``""`` as the unconditional branch (training drops captions
    to ``""`` with probability ``diffusion.p_uncond``).
    """

    tokenizer: Any = None
    max_length: int = 16
    text_conditional = True

    def tokenize(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Prompts -> ``(input_ids, attention_mask)``, int32 [N, max_length] each.

        Raises ValueError for a prompt longer than the model's ``max_length`` (with bos/eos) or
        with words outside its vocabulary (the model never saw them)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for p in prompts:
            if not isinstance(p, str):
                raise ValueError(f"Prompts must be strings, got {type(p).__name__} {p!r}.")
            words = self.tokenizer.tokenize(p)
            unknown = [w for w in words if w not in self.tokenizer.encoder]
            if unknown:
                raise ValueError(f"The prompt {p!r} has words outside the model's vocabulary: {unknown}. "
                                 f"Known words: {' '.join(self.tokenizer.vocab[2:-2])}.")
            if len(words) + 2 > self.max_length:
                raise ValueError(f"The prompt {p!r} has {len(words)} words; the model takes at most "
                                 f"{self.max_length - 2} (text.max_length={self.max_length} with bos/eos).")
        enc = self.tokenizer(prompts, max_length=self.max_length, padding="max_length", truncation=False)
        return np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)

    def init_params(self, key: jax.Array) -> Any:
        x = jnp.zeros((1, *self.image_shape), jnp.float32)
        ids, mask = self.tokenize([""])
        return self.module.init({"params": key}, x, jnp.zeros((1,), jnp.float32), ids, mask, train=False)["params"]

    def apply(self, params, x_t, t, input_ids, attention_mask, *, train=False, key=None) -> jax.Array:
        rngs = {"dropout": key} if train else None
        return self.module.apply({"params": params}, x_t, t, input_ids, attention_mask, train=train, rngs=rngs)

    @functools.cached_property
    def encode_text(self):
        """``encode_text(params, input_ids, attention_mask) -> context float32 [N, L, D]`` (jitted)."""
        return xla.jit(lambda params, ids, mask: self.module.apply(
            {"params": params}, ids, mask, method=TextConditionedUNet.encode_text))

    @functools.cached_property
    def context_model_fn(self):
        """``model_fn(x_t, t, cond, *, params)`` with ``cond = (context, mask)`` (for the samplers and
        :func:`jaxdiff.sampling.cfg_model_fn`); one function per model, so the sampler cache hits."""
        def model_fn(x_t, t, cond, *, params):
            context, mask = cond
            return self.module.apply({"params": params}, x_t, t, context, mask, method=TextConditionedUNet.denoise)

        return Denoiser(model_fn, self.prediction)

    def train_apply_fn(self, p_uncond: float = 0.0):
        """``apply_fn(params, x_t, t, batch, key)`` on ``batch['input_ids']``, ``batch['attention_mask']``;
        captions become ``""`` with probability ``p_uncond`` (classifier-free guidance training)."""
        null_ids, null_mask = (jnp.asarray(a) for a in self.tokenize([""]))

        def apply_fn(params, x_t, t, batch, key):
            drop_key, dropout_key = jax.random.split(key)
            ids, mask = batch["input_ids"], batch["attention_mask"]
            if p_uncond > 0:
                drop = jax.random.bernoulli(drop_key, p_uncond, (ids.shape[0], 1))
                ids, mask = jnp.where(drop, null_ids, ids), jnp.where(drop, null_mask, mask)
            return self.apply(params, x_t, t, ids, mask, train=True, key=dropout_key)

        return Denoiser(apply_fn, self.prediction)


@dataclasses.dataclass(eq=False)
class PretrainedTextDiffusionModel(DiffusionModel):
    """A Stable Diffusion 1.x folder fine-tuned on latents (``model.pretrained=PATH``, built by
    :func:`jaxdiff.train.build.load_pretrained`): ``module`` is its :class:`jaxdiff.nn.UNetCondition`,
    ``text_encoder`` its CLIP text transformer, ``autoencoder`` its frozen VAE (a
    :class:`LatentAutoencoder` with the folder's ``scaling_factor``), ``tokenizer`` its CLIP tokenizer
    and ``base`` the folder's weights ``{"unet", "text_encoder"}`` (float32, host arrays).

    Three kinds of params, all plain pytrees:

    - *trainable* (what the optimizer, EMA and checkpoints hold): ``{"unet"}`` for full
      fine-tuning, ``{"lora"}`` (the adapters of :mod:`jaxdiff.nn.lora`) when ``lora_rank > 0``,
      plus ``"text_encoder"`` when ``train_text_encoder``;
    - *frozen* (:meth:`frozen_params`, passed to the jitted step as an argument, never a constant):
      the base weights that are not trained;
    - *full* (:meth:`full_params`, what sampling and :meth:`apply` take): ``{"unet", "text_encoder"}``,
      the LoRA adapters merged into the base U-Net (once, for sampling).

    Captions are tokenized to the tokenizer's ``model_max_length`` (77) and truncated; the U-Net
    attends to all 77 context positions (SD 1.x: no mask) and the text encoder sees the mask only
    when the folder's config sets ``use_attention_mask``. Classifier-free guidance's unconditional
    branch is the empty caption (training drops captions to ``""`` with probability ``p_uncond``).
    """

    text_encoder: Any = None  # jaxdiff.nn.text.CLIPTextTransformer
    tokenizer: Any = None  # jaxdiff.tokenizers.CLIPTokenizer
    base: Any = None  # {"unet": ..., "text_encoder": ...}: the folder's float32 weights
    folder: str = ""
    use_attention_mask: bool = False
    train_text_encoder: bool = False
    lora_rank: int = 0  # 0: full fine-tuning of the U-Net
    lora_alpha: float = 1.0
    lora_targets: tuple = ()

    text_conditional = True

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    @property
    def lora(self) -> bool:
        return self.lora_rank > 0

    def tokenize(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Prompts -> ``(input_ids, attention_mask)`` int32 [N, 77]: padded and truncated (diffusers)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for p in prompts:
            if not isinstance(p, str):
                raise ValueError(f"Prompts must be strings, got {type(p).__name__} {p!r}.")
        enc = self.tokenizer(prompts, max_length=self.max_length, padding="max_length", truncation=True)
        return np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)

    # ------------------------------------------------------------------ params
    def init_trainable(self, key: jax.Array, base: Any) -> dict:
        """The trainable params at step 0 from the base weights (pure; jit with ``base`` as an argument)."""
        if self.lora:
            from jaxdiff.nn import lora  # only LoRA runs need it

            out = {"lora": lora.init_lora(key, base["unet"], rank=self.lora_rank, targets=self.lora_targets)}
        else:
            out = {"unet": base["unet"]}
        if self.train_text_encoder:
            out["text_encoder"] = base["text_encoder"]
        return out

    def init_params(self, key: jax.Array) -> dict:
        return self.init_trainable(key, self.base)

    def frozen_params(self, base: Any) -> dict:
        """The part of ``base`` that is not trained (the step's ``frozen`` argument)."""
        out = {}
        if self.lora:
            out["unet"] = base["unet"]
        if not self.train_text_encoder:
            out["text_encoder"] = base["text_encoder"]
        return out

    def full_params(self, params: dict, frozen: dict) -> dict:
        """Trainable + frozen -> ``{"unet", "text_encoder"}`` (LoRA adapters merged; pure, differentiable
        w.r.t. ``params``; no gradient reaches ``frozen``)."""
        frozen = jax.lax.stop_gradient(frozen)
        if self.lora:
            from jaxdiff.nn import lora

            unet = lora.merge(frozen["unet"], params["lora"], alpha=self.lora_alpha, rank=self.lora_rank)
        else:
            unet = params["unet"]
        te = params["text_encoder"] if self.train_text_encoder else frozen["text_encoder"]
        return {"unet": unet, "text_encoder": te}

    # ------------------------------------------------------------------ the networks (full params)
    def _encode(self, te_params, ids, mask):
        last, _ = self.text_encoder.apply({"params": te_params}, ids, mask if self.use_attention_mask else None)
        return last

    def apply(self, params, x_t, t, input_ids, attention_mask, *, train=False, key=None) -> jax.Array:
        """Full params; x_t: [B, h, w, 4] scaled latents, t: [B] float32 on 0..T-1, ids/mask [B, 77]."""
        context = self._encode(params["text_encoder"], input_ids, attention_mask)
        rngs = {"dropout": key} if train and key is not None else None
        return self.module.apply({"params": params["unet"]}, x_t, t, context, train=train, rngs=rngs)

    @functools.cached_property
    def encode_text(self):
        """``encode_text(full_params, input_ids, attention_mask) -> context float32 [N, 77, D]`` (jitted)."""
        return xla.jit(lambda params, ids, mask: self._encode(params["text_encoder"], ids, mask))

    @functools.cached_property
    def context_model_fn(self):
        """``model_fn(x_t, t, cond, *, params)`` with ``cond = (context, mask)`` and full params; the U-Net
        attends to every context position (SD 1.x)."""
        def model_fn(x_t, t, cond, *, params):
            context, _ = cond
            return self.module.apply({"params": params["unet"]}, x_t, t, context)

        return Denoiser(model_fn, self.prediction)

    def train_apply_fn(self, p_uncond: float = 0.0):
        """``apply_fn(params, x_t, t, batch, key, *, frozen)`` (trainable params; ``frozen`` from
        :meth:`frozen_params`) on ``batch['input_ids']``, ``batch['attention_mask']``; captions become
        ``""`` with probability ``p_uncond`` (classifier-free guidance training)."""
        null_ids, null_mask = (jnp.asarray(a) for a in self.tokenize([""]))

        def apply_fn(params, x_t, t, batch, key, *, frozen):
            drop_key, dropout_key = jax.random.split(key)
            ids, mask = batch["input_ids"], batch["attention_mask"]
            if p_uncond > 0:
                drop = jax.random.bernoulli(drop_key, p_uncond, (ids.shape[0], 1))
                ids, mask = jnp.where(drop, null_ids, ids), jnp.where(drop, null_mask, mask)
            return self.apply(self.full_params(params, frozen), x_t, t, ids, mask, train=True, key=dropout_key)

        return Denoiser(apply_fn, self.prediction)


@dataclasses.dataclass(eq=False)
class VAEModel:
    """A KL autoencoder (:class:`jaxdiff.nn.vae.AutoencoderKL`) and the image shape it works on;
    every method is a pure function of explicit params.

    image_shape: (H, W, C) of the images; ``latent_shape`` = (H/f, W/f, latent_channels).
    """

    module: AutoencoderKL
    image_shape: tuple[int, int, int]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        f = self.module.downsample_factor
        return (self.image_shape[0] // f, self.image_shape[1] // f, int(self.module.latent_channels))

    def init_params(self, key: jax.Array) -> Any:
        return self.module.init({"params": key}, jnp.zeros((1, *self.image_shape), jnp.float32))["params"]

    def train_apply(self, params, x: jax.Array, key: jax.Array) -> tuple[jax.Array, DiagonalGaussian]:
        """x: [B, H, W, C] in [-1, 1] -> (decoded posterior sample [B, H, W, C] float32, posterior)."""
        return self.module.apply({"params": params}, x, key=key, sample_posterior=True)

    @functools.cached_property
    def encode(self):
        """``encode(params, x [B, H, W, C] in [-1, 1]) -> DiagonalGaussian`` over [B, h, w, c] (jitted)."""
        return xla.jit(lambda params, x: self.module.apply({"params": params}, x, method=AutoencoderKL.encode))

    @functools.cached_property
    def decode(self):
        """``decode(params, z [B, h, w, c]) -> [B, H, W, C] float32`` (jitted)."""
        return xla.jit(lambda params, z: self.module.apply({"params": params}, z, method=AutoencoderKL.decode))

    def encode_images(self, params, images: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images [N, H, W, C] -> posterior (mean, std), float32 NumPy [N, h, w, c] each.

        Runs in fixed-size chunks (one compilation for any N)."""
        means, stds = [], []
        for lo in range(0, len(images), chunk):
            x = _to_float(images[lo : lo + chunk])
            n = len(x)
            post = self.encode(params, np.pad(x, ((0, chunk - n), (0, 0), (0, 0), (0, 0))))
            means.append(np.asarray(post.mean)[:n])
            stds.append(np.asarray(post.std)[:n])
        return np.concatenate(means), np.concatenate(stds)

    def reconstruct(self, params, images: np.ndarray, chunk: int = 256) -> np.ndarray:
        """uint8 [N, H, W, C] -> uint8 reconstructions (decoded posterior means), fixed-size chunks."""
        out = []
        for lo in range(0, len(images), chunk):
            x = _to_float(images[lo : lo + chunk])
            n = len(x)
            x = np.pad(x, ((0, chunk - n), (0, 0), (0, 0), (0, 0)))
            out.append(np.asarray(to_uint8(self.decode(params, self.encode(params, x).mean)))[:n])
        return np.concatenate(out)


def _to_float(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"Expected uint8 images [N, H, W, C], got {images.dtype} {images.shape}.")
    return images.astype(np.float32) / 127.5 - 1.0


@dataclasses.dataclass(eq=False)
class LatentAutoencoder:
    """A trained, frozen VAE with its EMA params and latent scale factor, as latent diffusion uses it:
    diffusion latents are ``scale_factor * z``."""

    vae: VAEModel
    params: Any
    scale_factor: float
    workdir: str  # the VAE run, or the Stable Diffusion folder whose vae/ this is
    step: int
    config: Any = None  # the VAE run's jaxdiff.config.Config
    shift_factor: float | None = None  # diffusers' shift_factor: latents are (z - shift) * scale
    encode_chunk: int = 256  # images per compiled encoder call

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N, H, W, C] -> scaled posterior (mean, std), float32 NumPy [N, h, w, c] each
        (computed on this process's own device, in fixed-size chunks: one compilation for any N)."""
        mean, std = self.vae.encode_images(self.params, images, chunk=self.encode_chunk)
        s = np.float32(self.scale_factor)
        if self.shift_factor is not None:
            mean = mean - np.float32(self.shift_factor)
        return mean * s, std * s

    def decode(self, z: jax.Array) -> jax.Array:
        """Scaled latents [B, h, w, c] -> images [B, H, W, C] float32 (about [-1, 1])."""
        z = jnp.asarray(z, jnp.float32) / jnp.float32(self.scale_factor)
        if self.shift_factor is not None:
            z = z + jnp.float32(self.shift_factor)
        return self.vae.decode(self.params, z)


def latent_statistics(mean: np.ndarray, std: np.ndarray, seed: int = 0) -> dict:
    """Statistics of posterior samples ``z = mean + std * eps`` over a dataset (float64).

    ``scale_factor = 1 / std(z)`` over all elements: Stable Diffusion's recipe (Rombach et al.
    2022, sec. G), which makes the diffusion model's data unit-variance. eps from
    ``np.random.default_rng(seed)``, so the figure is reproducible."""
    eps = np.random.default_rng(seed).standard_normal(mean.shape)
    z = mean.astype(np.float64) + std.astype(np.float64) * eps
    s = float(z.std())
    if not np.isfinite(s) or s <= 0:
        raise ValueError(f"The latents have std {s}: cannot compute a scale factor.")
    return {"scale_factor": 1.0 / s, "mean": float(z.mean()), "std": s,
            "std_of_means": float(mean.astype(np.float64).std()),
            "mean_posterior_std": float(std.astype(np.float64).mean()),
            "num_examples": int(len(mean)), "seed": int(seed)}
