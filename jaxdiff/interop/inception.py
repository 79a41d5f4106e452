"""pytorch-fid's FID Inception weights -> :class:`jaxdiff.nn.inception.InceptionV3` params.

Once, convert the published PyTorch file (the only step that reads a pickle; torch is imported only
by this command, and ``torch.load(weights_only=True)`` refuses anything but tensors):

    python -m jaxdiff.interop.inception --convert pt_inception-2015-12-05-6726825d.pth \\
        --out inception_fid.safetensors

(``pt_inception-2015-12-05-6726825d.pth`` is pytorch-fid's ``FID_WEIGHTS_URL``:
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth).
The safetensors file keeps torch's tensor names (``Mixed_5b.branch1x1.conv.weight``, ...) and
float32 values; ``num_batches_tracked`` counters are dropped. Then, anywhere:

    >>> params = load_inception("inception_fid.safetensors")      # safetensors only, never pickle
    >>> InceptionV3().apply({"params": params}, images01)

In memory (tests): ``params_from_state_dict(torch_model.state_dict())`` and
``save_state_dict(state_dict, path)`` (torch tensors or NumPy arrays; torch is not imported).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from typing import Any, Optional, Sequence

import numpy as np

from jaxdiff.interop._common import flatten_params, set_param, torch_kernel_to_flax

FORMAT = "jaxdiff/pytorch-fid-inception-v3"
CONVERT_HINT = ("convert pytorch-fid's weights once with: python -m jaxdiff.interop.inception --convert "
                "pt_inception-2015-12-05-6726825d.pth --out inception_fid.safetensors")
# torch tensor name suffix -> our leaf name (BasicConv2d's conv + BatchNorm, and the fc)
_LEAVES = {"conv.weight": "kernel", "bn.weight": "scale", "bn.bias": "bias", "bn.running_mean": "mean",
           "bn.running_var": "var"}


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (torch itself is never imported here)
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _path(key: str) -> Optional[tuple]:
    """``"Mixed_5b.branch1x1.conv.weight"`` -> ``("Mixed_5b", "branch1x1", "kernel")``;
    ``"fc.weight"`` -> ``("fc", "kernel")``; None for a name that is not a parameter of ours."""
    if key in ("fc.weight", "fc.bias"):
        return ("fc", "kernel" if key.endswith("weight") else "bias")
    parts = key.split(".")
    if len(parts) < 3:
        return None
    leaf = _LEAVES.get(".".join(parts[-2:]))
    return None if leaf is None else (*parts[:-2], leaf)


def expected_shapes() -> dict:
    """{param path: shape} of ``InceptionV3()`` (abstract: nothing is allocated)."""
    import jax
    import jax.numpy as jnp

    from jaxdiff.interop._common import abstract_param_shapes
    from jaxdiff.nn.inception import INPUT_SIZE, InceptionV3

    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return abstract_param_shapes(InceptionV3(resize_input=False), x)


def clean_state_dict(state_dict: Mapping[str, Any]) -> dict:
    """torch names -> float32 NumPy arrays, without BatchNorm's ``num_batches_tracked`` counters."""
    return {k: np.ascontiguousarray(_numpy(v), dtype=np.float32) for k, v in state_dict.items()
            if not k.endswith("num_batches_tracked")}


def params_from_state_dict(state_dict: Mapping[str, Any], *, source: str = "the state dict") -> dict:
    """pytorch-fid's ``fid_inception_v3().state_dict()`` (torch tensors or NumPy arrays, torch names)
    -> nested Flax params of :class:`~jaxdiff.nn.inception.InceptionV3` (float32 NumPy; kernels
    OIHW -> HWIO, fc (out, in) -> (in, out)).

    Raises ValueError (one line) naming missing, unexpected or mis-shaped tensors."""
    tensors = clean_state_dict(state_dict)
    shapes = expected_shapes()
    params: dict = {}
    unexpected, wrong, wrong_paths = [], [], set()
    for key, value in tensors.items():
        path = _path(key)
        if path is None or path not in shapes:
            unexpected.append(key)
            continue
        value = torch_kernel_to_flax(value) if path[-1] == "kernel" else value
        if tuple(value.shape) != shapes[path]:
            wrong.append(f"{key} {tuple(value.shape)} (expected {shapes[path]})")
            wrong_paths.add(path)
            continue
        set_param(params, path, value)
    missing = sorted(set(shapes) - set(flatten_params(params)) - wrong_paths)
    if unexpected or wrong or missing:
        what = []
        if missing:
            what.append(f"{len(missing)} missing (e.g. {'.'.join(missing[0])})")
        if unexpected:
            what.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            what.append(f"{len(wrong)} with the wrong shape (e.g. {wrong[0]})")
        raise ValueError(f"{source} is not pytorch-fid's FID Inception (pt_inception-2015-12-05): "
                         f"{'; '.join(what)} tensors; {CONVERT_HINT}.")
    return params


def save_state_dict(state_dict: Mapping[str, Any], out: str, *, source: str = "") -> None:
    """Check ``state_dict`` (it must fill every parameter exactly) and write it to ``out`` as
    safetensors (torch names, float32), atomically: a failure leaves any existing ``out`` untouched."""
    from safetensors.numpy import save_file

    tensors = clean_state_dict(state_dict)
    params_from_state_dict(tensors, source=source or "the state dict")
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata={"format": FORMAT, "source": os.path.basename(source)})
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def convert_pth(pth: str, out: str) -> None:
    """pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` -> ``out`` (safetensors). Imports torch
    and reads the pickle with ``torch.load(weights_only=True)`` (tensors only, no code)."""
    if not os.path.isfile(pth):
        raise FileNotFoundError(f"weights file {pth!r} does not exist: download pytorch-fid's "
                                "pt_inception-2015-12-05-6726825d.pth (its FID_WEIGHTS_URL) and pass its path.")
    import torch

    try:
        state_dict = torch.load(pth, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or one holding more than tensors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"cannot read {pth!r} as a PyTorch state dict with torch.load(weights_only=True) "
                         f"({first[:200]}).") from None
    if isinstance(state_dict, Mapping) and "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{pth!r} holds a {type(state_dict).__name__}, not a state dict of tensors.")
    save_state_dict(state_dict, out, source=pth)


def load_inception(path: str) -> dict:
    """Params of :class:`~jaxdiff.nn.inception.InceptionV3` from a safetensors file written by
    :func:`convert_pth` / :func:`save_state_dict`. Reads safetensors only (never pickle).

    Raises FileNotFoundError / ValueError with one line naming the file and the convert command."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights {path!r} do not exist; {CONVERT_HINT}.")
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        kind = " (a PyTorch .pth pickle?)" if path.endswith((".pth", ".pt", ".bin", ".pkl")) else ""
        raise ValueError(f"Inception weights {path!r} are not a safetensors file{kind} ({first[:120]}); "
                         f"{CONVERT_HINT}.") from None
    return params_from_state_dict(tensors, source=f"Inception weights {path!r}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxdiff.interop.inception",
        description="Convert pytorch-fid's FID Inception weights (.pth) to safetensors for jaxdiff's FID.")
    parser.add_argument("--convert", required=True, metavar="WEIGHTS.pth",
                        help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("--out", required=True, metavar="OUT.safetensors", help="where to write the weights")
    args = parser.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        print(f"error: --out {args.out!r} should end in .safetensors (the file is safetensors).", file=sys.stderr)
        return 2
    try:
        convert_pth(args.convert, args.out)
    except ImportError:
        print("error: --convert needs PyTorch to read the .pth file (pip install torch); loading the converted "
              "file does not.", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB) from {args.convert}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
