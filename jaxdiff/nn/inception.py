"""The FID Inception v3 network (NHWC, Flax Linen): pytorch-fid's ``InceptionV3(use_fid_inception=True)``.

    >>> net = InceptionV3()
    >>> out = net.apply({"params": params}, images)   # images: [N, H, W, 3] float32 in [0, 1]
    >>> out["pool3"]    # [N, 2048] float32: the final average pool (pytorch-fid's block 3, FID's features)
    >>> out["logits"]   # [N, 1008] float32: the fc layer of the FID weights
    >>> out["logits_unbiased"]   # [N, 1008]: the fc without its bias (the Inception Score's logits)

The layers are torchvision's ``Inception3`` as pytorch-fid patches it for FID (the graph of TF's
``inception-2015-12-05`` that the FID papers used): ``FIDInceptionA`` / ``FIDInceptionC`` /
``FIDInceptionE_1`` average-pool their pooling branch without counting the zero padding
(``count_include_pad=False``), ``FIDInceptionE_2`` (Mixed_7c) max-pools it; every conv is
``BasicConv2d`` (conv without bias, BatchNorm in eval mode with eps = 0.001, ReLU).

Input handling as pytorch-fid's ``forward``: ``resize_input`` resizes to 299 x 299 with
:func:`resize_bilinear` (``F.interpolate(mode='bilinear', align_corners=False)``, no antialiasing,
also when shrinking), ``normalize_input`` maps [0, 1] to [-1, 1] (``2 x - 1``).

Params (``jaxdiff.interop.inception`` fills them from pytorch-fid's weights) mirror torch's names:
``{"Conv2d_1a_3x3": {"kernel" [3,3,3,32] HWIO, "scale", "bias", "mean", "var"}, ...,
"Mixed_7c": {"branch1x1": {...}, ...}, "fc": {"kernel" [2048, 1008], "bias" [1008]}}``; a conv's
BatchNorm (``scale`` = gamma, ``bias`` = beta, ``mean`` / ``var`` = running statistics) is folded
into its kernel when applied. Convs and the fc use ``Precision.HIGHEST`` (no TF32 / bf16 passes on
GPU): the features of a metric should not depend on the accelerator's default matmul precision.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

BN_EPS = 1e-3  # torchvision's BasicConv2d: nn.BatchNorm2d(out_channels, eps=0.001)
INPUT_SIZE = 299
NUM_CLASSES = 1008  # the FID weights' fc (TF's 1008-way softmax)
FEATURE_DIM = 2048
HIGHEST = lax.Precision.HIGHEST


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``[out_size, in_size]`` float64 weights of PyTorch's 1-D bilinear interpolation with
    ``align_corners=False`` and no antialiasing (``upsample_bilinear2d`` with an output size given):
    source coordinate ``max((i + 0.5) * in / out - 0.5, 0)``, its floor and the next pixel (clamped)
    weighted by the distance."""
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    lo = np.floor(src).astype(np.int64)
    lo = np.minimum(lo, in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    m = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    np.add.at(m, (rows, lo), 1.0 - frac)
    np.add.at(m, (rows, hi), frac)
    return m


def resize_bilinear(x: jax.Array, size: Sequence[int] = (INPUT_SIZE, INPUT_SIZE)) -> jax.Array:
    """``x: [N, H, W, C]`` float -> ``[N, size[0], size[1], C]``, as
    ``torch.nn.functional.interpolate(x, size, mode='bilinear', align_corners=False)`` (no antialias):
    two separable matrix products with :func:`bilinear_matrix` weights (float32 at run time)."""
    out_h, out_w = int(size[0]), int(size[1])
    _, h, w, _ = x.shape
    if (h, w) == (out_h, out_w):
        return x  # the weights are the identity then
    rh = jnp.asarray(bilinear_matrix(h, out_h), x.dtype)
    rw = jnp.asarray(bilinear_matrix(w, out_w), x.dtype)
    x = jnp.einsum("oh,nhwc->nowc", rh, x, precision=HIGHEST)
    return jnp.einsum("pw,nowc->nopc", rw, x, precision=HIGHEST)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def max_pool(x: jax.Array, stride: int, padding: int = 0) -> jax.Array:
    """3x3 max pool (``F.max_pool2d(kernel_size=3, stride, padding)``, floor mode; padding never wins)."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pad)


def avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
    """3x3 average pool, stride 1, padding 1, the padding not counted
    (``F.avg_pool2d(kernel_size=3, stride=1, padding=1, count_include_pad=False)``)."""
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = lax.reduce_window(x, 0.0, lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    count = lax.reduce_window(jnp.ones((1, *x.shape[1:3], 1), x.dtype), 0.0, lax.add, (1, 3, 3, 1),
                              (1, 1, 1, 1), pad)
    return total / count


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eval mode, eps 0.001) -> ReLU; torchvision's ``BasicConv2d``.

    Params: ``kernel [kh, kw, C_in, features]``, ``scale``, ``bias``, ``mean``, ``var`` ``[features]``."""

    features: int
    kernel_size: int | tuple[int, int] = 1
    stride: int = 1
    padding: int | tuple[int, int] = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = _pair(self.kernel_size)
        ph, pw = _pair(self.padding)
        c = self.features
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], c))
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("mean", nn.initializers.zeros, (c,))
        var = self.param("var", nn.initializers.ones, (c,))
        gain = scale * lax.rsqrt(var + BN_EPS)
        y = lax.conv_general_dilated(x, kernel * gain, (self.stride, self.stride), ((ph, ph), (pw, pw)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST)
        return jax.nn.relu(y + (bias - mean * gain))


class FIDInceptionA(nn.Module):
    """Mixed_5b/5c/5d: 1x1, 5x5, double 3x3 and (count_include_pad=False) avg-pool branches."""

    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, 1, name="branch1x1")(x)
        b5 = BasicConv2d(48, 1, name="branch5x5_1")(x)
        b5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, 1, name="branch_pool")(avg_pool_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a: the 35 -> 17 reduction."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, 3, stride=2, name="branch3x3")(x)
        bd = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, 3, stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, max_pool(x, 2)], axis=-1)


class FIDInceptionC(nn.Module):
    """Mixed_6b..6e: factorised 7x7 branches and a (count_include_pad=False) avg-pool branch."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, 1, name="branch1x1")(x)
        b7 = BasicConv2d(c7, 1, name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, 1, name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, 1, name="branch_pool")(avg_pool_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a: the 17 -> 8 reduction."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, 1, name="branch3x3_1")(x)
        b3 = BasicConv2d(320, 3, stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, 1, name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, 3, stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, max_pool(x, 2)], axis=-1)


class FIDInceptionE(nn.Module):
    """Mixed_7b (``pool="avg"``: FIDInceptionE_1, count_include_pad=False) and Mixed_7c
    (``pool="max"``: FIDInceptionE_2, a 3x3 stride-1 max pool as in the TF graph)."""

    pool: str = "avg"

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, 1, name="branch1x1")(x)
        b3 = BasicConv2d(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv2d(448, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        pooled = avg_pool_exclude_pad(x) if self.pool == "avg" else max_pool(x, 1, padding=1)
        bp = BasicConv2d(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Linear(nn.Module):
    """The fc layer: ``x [N, D] -> (x @ kernel, x @ kernel + bias)`` (``kernel [D, features]``)."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        y = jnp.dot(x, kernel, precision=HIGHEST)
        return y, y + bias


class InceptionV3(nn.Module):
    """pytorch-fid's FID Inception: ``x: [N, H, W, 3]`` float32 in [0, 1] ->
    ``{"pool3": [N, 2048], "logits": [N, num_classes], "logits_unbiased": [N, num_classes]}`` float32.

    ``logits`` is torchvision's ``fc(pool3)``; ``logits_unbiased`` is ``pool3 @ fc.kernel`` without
    the bias, the logits of the original Inception Score code (openai/improved-gan reads the
    ``softmax/logits/MatMul`` weights of the TF graph and omits the bias; torch-fidelity's
    ``logits_unbiased`` is the same).

    With ``resize_input=False`` the input should already be 299 x 299 (the conv stack accepts any
    size >= 75, as torch's does, but FID statistics are only comparable at 299)."""

    num_classes: int = NUM_CLASSES
    resize_input: bool = True
    normalize_input: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> dict:
        x = jnp.asarray(x, jnp.float32)
        if self.resize_input:
            x = resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
        if self.normalize_input:
            x = 2 * x - 1
        x = BasicConv2d(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = max_pool(x, 2)
        x = BasicConv2d(80, 1, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x)
        x = max_pool(x, 2)
        x = FIDInceptionA(32, name="Mixed_5b")(x)
        x = FIDInceptionA(64, name="Mixed_5c")(x)
        x = FIDInceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = FIDInceptionC(128, name="Mixed_6b")(x)
        x = FIDInceptionC(160, name="Mixed_6c")(x)
        x = FIDInceptionC(160, name="Mixed_6d")(x)
        x = FIDInceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = FIDInceptionE("avg", name="Mixed_7b")(x)
        x = FIDInceptionE("max", name="Mixed_7c")(x)
        pool3 = jnp.mean(x, axis=(1, 2))
        unbiased, logits = Linear(self.num_classes, name="fc")(pool3)
        return {"pool3": pool3, "logits": logits, "logits_unbiased": unbiased}
