"""Reading a diffusers model folder (``config.json`` + safetensors weights) into NumPy.

    config, state_dict = read_diffusers_folder("sd-vae/")   # or (pipeline_root, subfolder="vae")

Only safetensors is read (never pickle): a folder holding only ``*.bin`` weights is refused with
a message on how to convert it. Sharded checkpoints (``*.safetensors.index.json``) and variants
(``diffusion_pytorch_model.fp16.safetensors``) are supported. Tensors come back as NumPy arrays in
their stored dtype; bfloat16 tensors (which ``safetensors.numpy`` cannot represent) are read
as ``ml_dtypes.bfloat16``.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

WEIGHTS_NAME = "diffusion_pytorch_model"


def _read_safetensors(path: str) -> dict:
    from safetensors.numpy import load_file
    try:
        return load_file(path)
    except TypeError as e:  # NumPy has no bfloat16: read those files by hand
        if "bfloat16" not in str(e):
            raise
        return _read_safetensors_raw(path)


_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _read_safetensors_raw(path: str) -> dict:
    """Minimal reader of the safetensors format (u64 header size, JSON header, raw bytes)."""
    import ml_dtypes

    dtypes = dict(_DTYPES, BF16=ml_dtypes.bfloat16)
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
        data = fh.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        dt = np.dtype(dtypes[info["dtype"]]).newbyteorder("<")
        arr = np.frombuffer(data[start:end], dtype=dt)
        out[name] = arr.reshape(info["shape"]).copy()
    return out


def read_diffusers_folder(folder: str, *, subfolder: Optional[str] = None,
                          variant: Optional[str] = None,
                          weights_name: str = WEIGHTS_NAME) -> tuple[dict, dict]:
    """Read ``config.json`` and ``<weights_name>[.<variant>].safetensors`` from a local folder.

    Returns ``(config, state_dict)``: the parsed config dict and a dict name -> np.ndarray.
    Raises FileNotFoundError for a missing folder / config / weights, and ValueError when only
    PyTorch pickle weights (``.bin``) are present (they are never unpickled here).
    """
    root = os.path.join(folder, subfolder) if subfolder else folder
    if not os.path.isdir(root):
        raise FileNotFoundError(f"read_diffusers_folder: no such folder: {root!r}")
    cfg_path = os.path.join(root, "config.json")
    if not os.path.isfile(cfg_path):
        hint = ""
        if not subfolder and os.path.isfile(os.path.join(root, "model_index.json")):
            hint = " (this is a pipeline folder: pass subfolder='vae', 'unet', ...)"
        raise FileNotFoundError(f"read_diffusers_folder: {cfg_path!r} not found{hint}")
    with open(cfg_path) as fh:
        config = json.load(fh)

    stem = weights_name + (f".{variant}" if variant else "")
    single = os.path.join(root, stem + ".safetensors")
    index = single + ".index.json"
    if os.path.isfile(single):
        return config, _read_safetensors(single)
    if os.path.isfile(index):
        with open(index) as fh:
            shards = sorted(set(json.load(fh)["weight_map"].values()))
        state: dict = {}
        for shard in shards:
            part = _read_safetensors(os.path.join(root, shard))
            dup = set(part) & set(state)
            if dup:
                raise ValueError(f"read_diffusers_folder: tensors {sorted(dup)} appear in more "
                                 "than one shard")
            state.update(part)
        return config, state

    present = sorted(os.listdir(root))
    bins = [p for p in present if p.endswith(".bin")]
    if bins:
        raise ValueError(
            f"read_diffusers_folder: {root!r} holds only PyTorch pickle weights {bins}; jaxdiff "
            "reads safetensors only (pickle can run arbitrary code). Convert them first, e.g. "
            "in Python with diffusers: `Model.from_pretrained(folder).save_pretrained(folder, "
            "safe_serialization=True)`, or download the repository's .safetensors files.")
    others = [p for p in present if p.endswith(".safetensors")]
    hint = f"; safetensors files present: {others} (pass variant=...?)" if others else ""
    raise FileNotFoundError(f"read_diffusers_folder: {single!r} not found{hint}")
