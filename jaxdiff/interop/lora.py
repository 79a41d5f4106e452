"""LoRA files in diffusers' format <-> :mod:`jaxdiff.nn.lora` adapters of a UNetCondition.

    path = save_diffusers_lora("out/", lora, alpha=8.0, rank=4)   # out/pytorch_lora_weights.safetensors
    pipe.load_lora_weights("out/", weight_name="pytorch_lora_weights.safetensors")   # diffusers
    lora, alpha, rank = load_diffusers_lora(path)

The file written is what diffusers' own LoRA trainers write (``save_lora_weights``): peft key
names under the ``unet.`` prefix, torch layout,

    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight   [rank, in]
    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight   [out, rank]

(lora_A = down.T, lora_B = up.T), and the peft ``LoraConfig`` (``r``, ``lora_alpha``,
``target_modules``, ...) as JSON in the safetensors header under ``lora_adapter_metadata``, with
the same ``unet.`` prefix. diffusers builds the adapter's LoraConfig from that metadata (since
its PR #11324, diffusers 0.34 as far as we know; tested with 0.42.1), so alpha != rank loads
exactly. Loaders that ignore the metadata (older diffusers, likely ComfyUI / A1111) assume
alpha = rank; for them pass ``fold_alpha=True``: ``up`` is written
pre-multiplied by alpha / rank and the file says alpha = rank (the same function everywhere,
but alpha itself no longer round-trips).

:func:`load_diffusers_lora` reads that format (alpha from the metadata; without metadata,
alpha = rank as diffusers assumes), the older diffusers names (``...to_q.lora.down.weight``,
attention-processor ``...processor.to_q_lora.down.weight``) and kohya-ss / A1111 files of SD 1.x
U-Nets (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight``
with ``.alpha``). Not supported (ValueError naming the keys): text-encoder adapters (unless
``unet_only=True`` drops them), LoRA on convolutions (SD 1.x's 1x1-conv proj_in/proj_out), DoRA,
LoRA biases, different ranks per module, and kohya's SD-XL (sgm ``input_blocks``) names.
Per-module alphas (kohya files, peft ``alpha_pattern``) are folded into ``up`` relative to the
most common alpha, which is returned.

Only safetensors and NumPy here; no torch.
"""
from __future__ import annotations

import collections
import json
import os
import re
import tempfile
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np

from jaxdiff.interop._common import diffusers_key_to_path, path_to_diffusers_key
from jaxdiff.interop.safetensors_io import _read_safetensors
from jaxdiff.interop.unet2d_cond import _INDEXED, _NORMS
from jaxdiff.nn.lora import lora_paths

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


def module_name(path: tuple) -> str:
    """Our module path -> diffusers module name: ``("down_blocks_0", ..., "attn1", "to_out")``
    -> ``"down_blocks.0.....attn1.to_out.0"``."""
    return path_to_diffusers_key(tuple(path) + ("kernel",), indexed=_INDEXED)[:-len(".weight")]


def module_path(name: str) -> Optional[tuple]:
    """Inverse of :func:`module_name`; None for a name that is not a U-Net module."""
    p = diffusers_key_to_path(name + ".weight", indexed=_INDEXED, norms=_NORMS)
    return None if p is None or p[-1] != "kernel" else p[:-1]


# ------------------------------------------------------------------------------------- write
def save_diffusers_lora(path: str, lora_params: Mapping, *, alpha: float, rank: int,
                        prefix: str = "unet", dtype: Any = np.float32,
                        fold_alpha: bool = False) -> str:
    """Write ``lora_params`` (the adapters of a UNetCondition's params, see
    :mod:`jaxdiff.nn.lora`) as a diffusers LoRA ``.safetensors`` file; returns its path.

    path: a file name, or an existing directory (the file is then ``pytorch_lora_weights.
    safetensors`` in it, diffusers' default name). For a ``TextConditionedUNet`` pass
    ``lora_params["unet"]``. dtype: of the stored tensors (float32, or float16 to halve the
    file). The file is written under a temporary name and renamed, so a failure leaves any
    existing file as it was. Load it with ``StableDiffusionPipeline.load_lora_weights(dir,
    weight_name=name)`` or :func:`load_diffusers_lora`.
    """
    from safetensors.numpy import save_file

    if rank <= 0:
        raise ValueError(f"save_diffusers_lora: rank must be positive, got {rank}")
    if os.path.isdir(path):
        path = os.path.join(path, WEIGHT_NAME)
    elif not path.endswith(".safetensors"):
        raise ValueError(f"save_diffusers_lora: {path!r} is neither a directory nor a "
                         ".safetensors file name")
    if set(lora_params) & {"unet", "text_encoder"}:
        raise ValueError("save_diffusers_lora: lora_params of a TextConditionedUNet: pass "
                         "lora_params['unet'] (text-encoder adapters are not written)")
    paths = lora_paths(lora_params)
    if not paths:
        raise ValueError("save_diffusers_lora: lora_params holds no adapters")
    scale = alpha / rank
    tensors, names = {}, []
    for p in paths:
        node = lora_params
        for k in p:
            node = node[k]
        down = np.asarray(node["down"], np.float32)
        up = np.asarray(node["up"], np.float32)
        if down.shape[1] != rank or up.shape[0] != rank:
            raise ValueError(f"save_diffusers_lora: {'/'.join(p)} has down {down.shape}, up "
                             f"{up.shape}, not rank {rank}")
        if fold_alpha:
            up = up * np.float32(scale)
        name = module_name(p)
        names.append(name)
        tensors[f"{prefix}.{name}.lora_A.weight"] = np.ascontiguousarray(down.T, dtype)
        tensors[f"{prefix}.{name}.lora_B.weight"] = np.ascontiguousarray(up.T, dtype)
    a = float(rank if fold_alpha else alpha)
    config = {"r": int(rank), "lora_alpha": int(a) if a.is_integer() else a,
              "target_modules": sorted(names), "rank_pattern": {}, "alpha_pattern": {},
              "init_lora_weights": True, "use_dora": False, "lora_bias": False}
    meta = {f"{prefix}.{k}": v for k, v in config.items()}
    header = {"format": "pt", METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True)}
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".lora-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


# ------------------------------------------------------------------------------------- read
def _header_metadata(path: str) -> dict:
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    return header.get("__metadata__") or {}


_KOHYA = re.compile(
    r"lora_unet_(down_blocks_\d+|up_blocks_\d+|mid_block)_attentions_(\d+)_(?:"
    r"transformer_blocks_(\d+)_(attn[12]_to_q|attn[12]_to_k|attn[12]_to_v|attn[12]_to_out_0|"
    r"ff_net_0_proj|ff_net_2)|(proj_in|proj_out))")


def _kohya_module(name: str) -> Optional[str]:
    """``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`` -> diffusers
    module name (SD 1.x / 2.x kohya names, diffusers' block naming), or None."""
    m = _KOHYA.fullmatch(name)
    if m is None:
        return None
    block, att, tb, inner, proj = m.groups()
    block = re.sub(r"_(\d+)$", r".\1", block)
    if proj:
        return f"{block}.attentions.{att}.{proj}"
    inner = {"ff_net_0_proj": "ff.net.0.proj", "ff_net_2": "ff.net.2"}.get(inner, inner)
    inner = re.sub(r"^(attn[12])_", r"\1.", inner).replace("to_out_0", "to_out.0")
    return f"{block}.attentions.{att}.transformer_blocks.{tb}.{inner}"


def _split_peft_key(key: str) -> Optional[tuple]:
    """A peft / older-diffusers key -> (module name, "A" | "B"), or None."""
    k = key
    for old, new in ((".processor.", "."), ("_lora.down.", ".lora_A."), ("_lora.up.", ".lora_B."),
                     (".lora.down.", ".lora_A."), (".lora.up.", ".lora_B."),
                     (".lora_linear_layer.down.", ".lora_A."),
                     (".lora_linear_layer.up.", ".lora_B.")):
        k = k.replace(old, new)
    k = re.sub(r"\.to_out\.lora_", ".to_out.0.lora_", k)  # old to_out_lora -> to_out.0
    m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.default)?\.weight", k)
    return None if m is None else (m.group(1), m.group(2))


def load_diffusers_lora(path: str, *, prefix: str = "unet", unet_only: bool = False,
                        weight_name: Optional[str] = None) -> tuple[dict, float, int]:
    """Read a diffusers / peft / kohya LoRA ``.safetensors`` file of a (SD 1.x / 2.x) U-Net ->
    ``(lora_params, alpha, rank)`` for :func:`jaxdiff.nn.lora.merge`.

    path: the file, or a directory holding ``weight_name`` (default
    ``pytorch_lora_weights.safetensors``, or the directory's only ``.safetensors`` file).
    lora_params: float32 NumPy arrays, ``down`` [in, rank], ``up`` [rank, out] per module, in
    our params layout (``to_out.0`` -> ``to_out``). alpha: from the file's peft metadata or kohya
    ``.alpha`` tensors; absent, alpha = rank (diffusers' convention). Keys of other components
    (``text_encoder.``, ``lora_te_``) raise ValueError unless ``unet_only=True`` drops them;
    anything else not understood raises ValueError listing the keys.
    """
    if os.path.isdir(path):
        if weight_name is None:
            cands = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            weight_name = WEIGHT_NAME if WEIGHT_NAME in cands or len(cands) != 1 else cands[0]
        path = os.path.join(path, weight_name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_diffusers_lora: no LoRA file {path!r}")
    if not path.endswith(".safetensors"):
        raise ValueError(f"load_diffusers_lora: {path!r}: only .safetensors LoRA files are read "
                         "(never pickle)")
    sd = _read_safetensors(path)
    meta_raw = _header_metadata(path).get(METADATA_KEY)
    config = {}
    if meta_raw:
        meta = json.loads(meta_raw)
        config = {k[len(prefix) + 1:]: v for k, v in meta.items() if k.startswith(prefix + ".")}
        if not config and "r" in meta:  # a model's own save_lora_adapter: no prefix anywhere
            config = meta

    down: dict = {}
    up: dict = {}
    alphas: dict = {}
    dropped, unknown = [], []
    is_kohya = any(k.startswith(("lora_unet_", "lora_te")) for k in sd)
    for key, w in sd.items():
        if is_kohya:
            stem, _, tail = key.partition(".")
            if stem.startswith("lora_te"):
                dropped.append(key)
                continue
            name = _kohya_module(stem)
            if name is None or tail not in ("lora_down.weight", "lora_up.weight", "alpha"):
                unknown.append(key)
                continue
            if tail == "alpha":
                alphas[name] = float(np.asarray(w, np.float64).reshape(()))
            else:
                (down if tail == "lora_down.weight" else up)[name] = w
            continue
        if key.startswith(prefix + "."):
            body = key[len(prefix) + 1:]
        elif "." in key and key.split(".", 1)[0] in ("text_encoder", "text_encoder_2"):
            dropped.append(key)
            continue
        elif not any(k.startswith(prefix + ".") for k in sd):  # saved without the prefix
            body = key
        else:
            unknown.append(key)
            continue
        split = _split_peft_key(body)
        if split is None:
            unknown.append(key)
            continue
        name, ab = split
        (down if ab == "A" else up)[name] = w
    if dropped and not unet_only:
        raise ValueError(f"load_diffusers_lora: {path}: {len(dropped)} tensors adapt another "
                         f"component than the U-Net (e.g. {dropped[0]!r}); pass unet_only=True "
                         "to load the U-Net's adapters alone")
    names = sorted(set(down) | set(up))
    unpaired = [n for n in names if n not in down or n not in up]
    bad_rank = [f"{n}: {np.shape(down[n])}" for n in names if n in down and np.ndim(down[n]) != 2]
    unmapped = [n for n in names if module_path(n) is None]
    problems = []
    if unknown:
        problems.append(f"keys not understood: {sorted(unknown)[:10]}"
                        f"{' ...' if len(unknown) > 10 else ''}")
    if unpaired:
        problems.append(f"modules without both down (lora_A) and up (lora_B): {unpaired}")
    if bad_rank:
        problems.append(f"adapters that are not of Dense layers (convolutions?): {bad_rank}")
    if unmapped:
        problems.append(f"modules that are not U-Net modules: {unmapped}")
    if not names and not problems:
        problems.append("no U-Net LoRA tensors")
    if problems:
        raise ValueError(f"load_diffusers_lora: {path}: " + "; ".join(problems))

    ranks = {n: int(np.shape(down[n])[0]) for n in names}
    if len(set(ranks.values())) != 1:
        raise ValueError(f"load_diffusers_lora: {path}: different ranks per module "
                         f"{sorted(set(ranks.values()))} are not supported")
    rank = next(iter(ranks.values()))
    if config.get("use_dora") or config.get("lora_bias"):
        raise ValueError(f"load_diffusers_lora: {path}: DoRA / LoRA-bias adapters are not "
                         "supported")
    if config.get("r") not in (None, rank) or config.get("rank_pattern"):
        raise ValueError(f"load_diffusers_lora: {path}: metadata rank {config.get('r')} / "
                         f"rank_pattern {config.get('rank_pattern')} disagree with the tensors' "
                         f"rank {rank}")
    # alpha per module: kohya .alpha tensors, else peft lora_alpha (+ alpha_pattern), else rank.
    if not is_kohya:
        base = float(config.get("lora_alpha", rank))
        pattern = config.get("alpha_pattern") or {}
        for n in names:
            alphas[n] = base
            for pat, a in pattern.items():  # peft.utils.other.get_pattern_key
                if re.match(rf"(.*\.)?({pat})$", n):
                    alphas[n] = float(a)
                    break
    for n in names:
        alphas.setdefault(n, float(rank))
    alpha = collections.Counter(alphas[n] for n in names).most_common(1)[0][0]

    lora: dict = {}
    for n in names:
        d = np.asarray(down[n], np.float32).T  # [in, rank]
        u = np.asarray(up[n], np.float32).T  # [rank, out]
        if np.ndim(u) != 2 or u.shape[0] != rank:
            raise ValueError(f"load_diffusers_lora: {path}: {n}: lora_B / lora_up of shape "
                             f"{np.shape(up[n])} does not match rank {rank}")
        if alphas[n] != alpha:
            u = u * np.float32(alphas[n] / alpha)
        node = lora
        for k in module_path(n)[:-1]:
            node = node.setdefault(k, {})
        node[module_path(n)[-1]] = {"down": np.ascontiguousarray(d), "up": np.ascontiguousarray(u)}
    return lora, alpha, rank
