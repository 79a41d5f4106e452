"""Typed experiment configs: the sections of an ``experiments/configs/*.py`` file, parsed once.

An experiment config is written as an ``ml_collections.ConfigDict`` (so that ``--config.KEY=VALUE``
flags can override it) and turned into a frozen :class:`Config` by :func:`parse` at the entry
(``train.loop.train``, ``runs.load_run``). Every library function below the entry reads typed
attributes; the defaults live here only, once, as the dataclass defaults:

    >>> from experiments.configs import ddpm_digits
    >>> cfg = parse(ddpm_digits.get_config())
    >>> cfg.task, cfg.train.eval_every, cfg.sample.clip_x0
    ('diffusion', 250, 1.0)

Sentinels of the config files become ``None`` here: ``0`` for "off" / "latest" / "all"
(``num_devices``, ``diffusion.min_snr_gamma``, ``train.grad_clip``, ``sample.clip_x0``,
``vae.step``, ``data.image_size``) and ``""`` for "the default" (``data.data_dir``, ``data.holdout``).

``task`` says what is trained: ``"diffusion"`` (a U-Net on pixels, class-conditional or not),
``"latent"`` (the same on the latents of a trained VAE run, ``vae.workdir``), ``"text"`` (a text
encoder + cross-attention U-Net, on pixels or, with ``vae.workdir``, on latents), ``"finetune"``
(a Stable Diffusion folder, ``model.pretrained``) or ``"vae"`` (a KL autoencoder). A config
without ``task`` (one stored by an older run) gets the task its keys imply.

Errors: :class:`ConfigError` (a ``ValueError``), one line naming the key, what is wrong and what
is allowed. This module imports nothing from jaxdiff.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping, Optional

TASKS = ("diffusion", "latent", "text", "finetune", "vae")


class ConfigError(ValueError):
    """A config key that does not exist, or a value of the wrong type or out of range."""


def _field(default=dataclasses.MISSING, *, off=dataclasses.MISSING, check=None, doc=""):
    """A dataclass field whose metadata says how :func:`parse` reads it: ``off`` is the config files'
    sentinel (``0`` or ``""``) for None, ``check(value) -> problem or None`` a range check."""
    meta = {"doc": doc}
    if off is not dataclasses.MISSING:
        meta["off"] = off
    if check is not None:
        meta["check"] = check
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _positive(v):
    return None if v >= 1 else "must be >= 1"


def _non_negative(v):
    return None if v >= 0 else "must be >= 0"


def _unit(v):
    return None if 0.0 <= v <= 1.0 else "must be in [0, 1]"


# ----------------------------------------------------------------------------- sections
@dataclasses.dataclass(frozen=True)
class Mesh:
    data: int = _field(0, check=_non_negative, doc="devices on the batch-only axis; 0 = all not on fsdp")
    fsdp: int = _field(1, check=_positive, doc="devices that also split params and optimizer state")


@dataclasses.dataclass(frozen=True)
class Data:
    name: str = ""  # a TFDS name ("digits", "shapes", "cifar10", ...) or "folder:PATH"
    image_size: Optional[int] = _field(None, off=0, check=_positive)  # None: the data's own size
    data_dir: Optional[str] = _field(None, off="")  # None: $JAXDIFF_DATA_DIR or ~/tensorflow_datasets
    random_flip: bool = False
    conditional: bool = False  # batches carry labels / captions
    holdout: Optional[str] = _field(None, off="")  # shapes: a held-out combination set
    cache_latents: bool = True  # latent runs on a folder: encode once and keep the latents in memory
    encode_batch_size: int = _field(8, check=_positive)  # images per compiled VAE-encoder call


@dataclasses.dataclass(frozen=True)
class UNet:
    """:class:`jaxdiff.nn.UNet` (``model.type = "unet"``)."""

    ch: int
    ch_mult: tuple
    num_res_blocks: int
    attn_resolutions: tuple = ()
    dropout: float = _field(0.0, check=_unit)
    num_groups: int = _field(32, check=_positive)
    num_heads: int = _field(1, check=_positive)
    dtype: str = "float32"
    remat: bool = False
    type: str = "unet"


@dataclasses.dataclass(frozen=True)
class TextUNet:
    """:class:`jaxdiff.nn.UNetCondition` with a CLIP text transformer (``model.type = "text_unet"``)."""

    block_out_channels: tuple
    layers_per_block: int
    down_block_types: tuple
    up_block_types: tuple
    attention_head_dim: int
    mid_block_type: Optional[str] = _field("UNetMidBlock2DCrossAttn", off="")
    transformer_layers_per_block: int = _field(1, check=_positive)
    use_linear_projection: bool = True
    norm_num_groups: int = _field(32, check=_positive)
    dropout: float = _field(0.0, check=_unit)
    dtype: str = "float32"
    remat: bool = False
    type: str = "text_unet"


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A Stable Diffusion 1.x folder to fine-tune (``task = "finetune"``)."""

    pretrained: str = ""  # the folder (diffusers layout); required
    dtype: str = "float32"  # compute dtype of the U-Net and text encoder; params stay float32
    remat: bool = False
    lora_rank: int = _field(0, check=_non_negative)  # 0 = full fine-tuning
    lora_alpha: Optional[float] = _field(None, off=0)  # None = lora_rank (scale 1)
    lora_targets: tuple = ()


@dataclasses.dataclass(frozen=True)
class VAEArch:
    """:class:`jaxdiff.nn.vae.AutoencoderKL` (``task = "vae"``)."""

    block_out_channels: tuple
    layers_per_block: int
    latent_channels: int
    norm_num_groups: int = _field(32, check=_positive)
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    dtype: str = "float32"
    remat: bool = False


@dataclasses.dataclass(frozen=True)
class Text:
    """The word tokenizer and CLIP-style text transformer of a ``text`` task."""

    words: tuple
    max_length: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int


@dataclasses.dataclass(frozen=True)
class Diffusion:
    schedule: str = "linear"  # schedules.SCHEDULE_KINDS; "pretrained": a fine-tuned folder's own
    num_timesteps: int = _field(1000, check=_positive)
    prediction: str = "eps"  # "eps", "x0" or "v" ("" in a finetune config: the folder's)
    min_snr_gamma: Optional[float] = _field(None, off=0)
    p_uncond: float = _field(0.0, check=_unit)  # label / caption dropout for classifier-free guidance
    schedule_options: dict = _field({})  # make_schedule's **options (beta_start, s, ...)


@dataclasses.dataclass(frozen=True)
class Train:
    num_steps: int = _field(check=_positive)
    batch_size: int = _field(check=_positive)
    lr: float = _field(check=_non_negative)
    ema_decay: float = _field(check=_unit)
    checkpoint_every: int = _field(check=_positive)
    log_every: int = _field(50, check=_positive)
    warmup_steps: int = _field(0, check=_non_negative)
    cosine_decay: bool = False
    weight_decay: float = _field(0.0, check=_non_negative)
    grad_clip: Optional[float] = _field(1.0, off=0)
    b1: float = _field(0.9, check=_unit)
    b2: float = _field(0.999, check=_unit)
    keep_checkpoints: int = _field(3, check=_positive)
    sample_every: int = _field(0, check=_non_negative)  # 0 = only at the end
    num_samples: int = _field(0, check=_non_negative)  # the final sample grid; 0 = none
    eval_every: int = _field(0, check=_non_negative)  # 0 = off
    eval_num: int = _field(100, check=lambda v: None if v >= 2 else "must be >= 2")
    eval_inception: str = ""  # FID Inception .safetensors
    eval_fid_ref: str = ""  # FID reference ("" = the training split)
    text_encoder: bool = False  # finetune: train the text encoder too


@dataclasses.dataclass(frozen=True)
class Sample:
    method: str = "ddpm"  # sampling.METHODS
    num_steps: Optional[int] = _field(None, off=0, check=_positive)  # None: diffusion.num_timesteps
    eta: float = _field(0.0, check=_non_negative)
    guidance: float = 1.0
    clip_x0: Optional[float] = _field(1.0, off=0)
    seed: int = 0
    prompts: tuple = ()


@dataclasses.dataclass(frozen=True)
class VAERef:
    """The trained VAE run a ``latent`` (or latent ``text``) task works on."""

    workdir: str = ""
    step: Optional[int] = _field(None, off=0)  # None: the VAE run's latest checkpoint
    sample_posterior: bool = True  # z ~ q(z|x) per batch; False: posterior means


@dataclasses.dataclass(frozen=True)
class Loss:
    kl_weight: float = _field(check=_non_negative)
    recon: str = "l1"


@dataclasses.dataclass(frozen=True)
class Disc:
    weight: float = _field(0.0, check=_non_negative)  # 0 = no discriminator
    start: int = _field(0, check=_non_negative)
    adaptive: bool = True
    ndf: int = _field(64, check=_positive)
    n_layers: int = _field(3, check=_positive)
    num_groups: int = _field(8, check=_positive)
    lr: Optional[float] = None  # None: train.lr
    b1: float = _field(0.5, check=_unit)
    b2: float = _field(0.9, check=_unit)


@dataclasses.dataclass(frozen=True)
class Config:
    task: str
    seed: int
    train: Train
    data: Data
    model: Any  # UNet | TextUNet | Pretrained | VAEArch
    mesh: Mesh = Mesh()
    num_devices: Optional[int] = None  # None: all visible devices
    diffusion: Optional[Diffusion] = None  # every task but "vae"
    sample: Sample = Sample()
    text: Optional[Text] = None  # "text" tasks trained from scratch
    vae: Optional[VAERef] = None  # latent tasks
    loss: Optional[Loss] = None  # "vae"
    disc: Optional[Disc] = None  # "vae"

    @property
    def latent(self) -> bool:
        """True when the model works on the latents of a trained VAE run (``vae.workdir``): task
        ``latent``, or ``text`` with a VAE run. (A ``finetune`` works on its folder's own VAE latents.)"""
        return self.task == "latent" or (self.task == "text" and self.vae is not None and bool(self.vae.workdir))

    @property
    def sample_steps(self) -> int:
        """``sample.num_steps``, or the diffusion's training timesteps when unset."""
        return self.sample.num_steps or self.diffusion.num_timesteps


# ----------------------------------------------------------------------------- parsing
def _plain(raw) -> Any:
    """A ConfigDict / FrozenConfigDict / mapping -> plain nested dicts (duck-typed: no ml_collections import)."""
    if hasattr(raw, "to_dict"):
        raw = raw.to_dict()
    if isinstance(raw, Mapping):
        return {str(k): _plain(v) for k, v in raw.items()}
    return raw


def _base_type(tp):
    """(type, optional) of an annotation such as ``Optional[int]`` or ``tuple``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


_HINTS: dict = {}


def _hints(cls):
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _coerce(where: str, value, tp):
    name = {int: "an int", float: "a number", str: "a string", bool: "True or False", tuple: "a list",
            dict: "a dict"}.get(tp, tp)
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok and isinstance(value, float) and value.is_integer():
            value, ok = int(value), True
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    elif tp is tuple:
        ok = isinstance(value, (list, tuple))
        value = tuple(value) if ok else value
    elif tp is dict:
        ok = isinstance(value, Mapping)
        value = dict(value) if ok else value
    else:
        ok = True
    if not ok:
        raise ConfigError(f"config.{where} must be {name}, got {value!r}.")
    return value


def _section(cls, raw, where: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config.{where} must be a section (keys and values), got {raw!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"config.{where}.{unknown[0]}: no such key; config.{where} takes "
                          f"{', '.join(sorted(fields))}.")
    hints, values = _hints(cls), {}
    for name, f in fields.items():
        key = f"{where}.{name}"
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"config.{key} is required and missing.")
            continue
        value = raw[name]
        tp, optional = _base_type(hints[name])
        if "off" in f.metadata and value == f.metadata["off"] and type(value) is not bool:
            value = None
        if value is None:
            if not optional:
                raise ConfigError(f"config.{key} must be set, got None.")
        else:
            value = _coerce(key, value, tp)
            problem = f.metadata.get("check", lambda v: None)(value)
            if problem:
                raise ConfigError(f"config.{key} {problem}, got {value!r}.")
        values[name] = value
    return cls(**values)


def infer_task(raw: Mapping) -> str:
    """The task a config's keys imply (for configs written before ``task`` existed)."""
    model = raw.get("model") or {}
    if "pretrained" in model:
        return "finetune"
    if model.get("type") == "text_unet":
        return "text"
    if (raw.get("vae") or {}).get("workdir"):
        return "latent"
    return "diffusion"


_SECTIONS = {"mesh": Mesh, "data": Data, "train": Train, "sample": Sample, "diffusion": Diffusion,
             "text": Text, "vae": VAERef, "loss": Loss, "disc": Disc}
_MODELS = {"diffusion": UNet, "latent": UNet, "finetune": Pretrained, "vae": VAEArch}
# Keys that earlier versions wrote into the configs they stored with their checkpoints, and what
# replaced them. A stored config (parse(..., stored=True)) drops them; a config being written now
# gets a one-line error naming the replacement.
RETIRED = {("train", "fsdp"): "mesh.fsdp (the number of devices that split params and optimizer state)"}


def parse(raw, *, stored: bool = False) -> Config:
    """A config (``ConfigDict``, nested dict or :class:`Config`) -> a validated :class:`Config`.

    ``stored``: ``raw`` was read from a checkpoint written by an earlier version (``runs.load_run``,
    ``build.load_vae``): keys those versions wrote and that are now ``RETIRED`` are dropped.
    Raises :class:`ConfigError` (one line) for an unknown key, a missing required key, a value of
    the wrong type or range, or a task its sections do not fit."""
    if isinstance(raw, Config):
        return raw
    raw = _plain(raw)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"A config must be a ConfigDict or a dict of sections, got {type(raw).__name__}.")
    for (section, key), instead in RETIRED.items():
        if isinstance(raw.get(section), Mapping) and key in raw[section]:
            if not stored:
                raise ConfigError(f"config.{section}.{key} is retired; use {instead}.")
            raw = {**raw, section: {k: v for k, v in raw[section].items() if k != key}}
    top = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise ConfigError(f"config.{unknown[0]}: no such key; a config takes {', '.join(sorted(top))}.")
    task = raw.get("task") or infer_task(raw)
    if task not in TASKS:
        raise ConfigError(f"config.task must be one of {TASKS}, got {task!r}.")
    for key in ("seed", "train", "data", "model"):
        if key not in raw:
            raise ConfigError(f"config.{key} is required and missing.")
    model_raw = dict(raw["model"] or {})
    if task == "text":
        if model_raw.get("type", "text_unet") != "text_unet":
            raise ConfigError(f"config.model.type must be 'text_unet' for task 'text', got {model_raw['type']!r}.")
        model_cls = TextUNet
    else:
        model_cls = _MODELS[task]
        if task in ("diffusion", "latent") and model_raw.get("type", "unet") != "unet":
            raise ConfigError(f"config.model.type must be 'unet' for task {task!r} ('text_unet' is task 'text'), "
                              f"got {model_raw['type']!r}.")
    values = {"task": task, "seed": _coerce("seed", raw["seed"], int), "model": _section(model_cls, model_raw, "model")}
    if raw.get("num_devices"):
        values["num_devices"] = _coerce("num_devices", raw["num_devices"], int)
    for key, cls in _SECTIONS.items():
        if raw.get(key) is not None:
            values[key] = _section(cls, raw[key], key)
    if task != "vae" and "diffusion" not in values:
        raise ConfigError(f"config.diffusion is required for task {task!r}.")
    if task == "vae" and "loss" not in values:
        raise ConfigError("config.loss is required for task 'vae' (loss.kl_weight, loss.recon).")
    if task == "text" and "text" not in values:
        raise ConfigError("config.text is required for task 'text' (words, max_length, hidden_size, ...).")
    if task == "latent" and not (values.get("vae") and values["vae"].workdir):
        raise ConfigError("config.vae.workdir is required for task 'latent': name the trained VAE run "
                          "(or use task 'diffusion' to train on pixels).")
    return Config(**values)


_LAYOUT_FREE = ("dtype", "remat", "dropout")  # may change on resume: they do not change the params' layout


def model_arch(model: Mapping) -> dict:
    """What of a ``model`` section fixes the parameter layout, with defaults filled in: the same dict for a
    section written with or without its default keys (a checkpoint's stored one, today's config). JSON-able."""
    model = _plain(model)
    if "pretrained" in model:
        cls = Pretrained
    elif "latent_channels" in model:
        cls = VAEArch
    elif model.get("type") == "text_unet":
        cls = TextUNet
    else:
        cls = UNet
    section = dataclasses.asdict(_section(cls, model, "model"))
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in section.items() if k not in _LAYOUT_FREE}


def to_dict(cfg: Config) -> dict:
    """A :class:`Config` as plain nested dicts (JSON-able; :func:`parse` reads it back to an equal Config)."""
    return dataclasses.asdict(cfg)


def replace(cfg: Config, **sections) -> Config:
    """``cfg`` with fields of its sections replaced: ``replace(cfg, sample={"guidance": 3.0})``."""
    out = {}
    for name, value in sections.items():
        current = getattr(cfg, name)
        out[name] = dataclasses.replace(current, **value) if isinstance(value, Mapping) else value
    return dataclasses.replace(cfg, **out)
