"""U-Net benchmark configurations, their diffusers ``UNet2DModel`` twins, and an analytic FLOP count
(of the unconditional U-Net; the text-conditioned configs rely on XLA's count).

Everything here is plain Python (no JAX, no torch), so that the FLOP count is independent of
XLA's ``cost_analysis`` that the benchmark reports.
"""
from __future__ import annotations

from typing import Any, Mapping

# The DDPM CIFAR-10 model (google/ddpm-cifar10-32): 35,746,307 parameters, 32x32x3, batch 128.
DDPM_CIFAR10 = dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                    num_groups=32, dropout=0.1)
# A small model for a 2-core CPU: 1,113,955 parameters, 32x32x3, batch 4.
SMALL = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), num_groups=8,
             dropout=0.1)

# Latent text-to-image U-Nets (``--model cond``), written as diffusers ``UNet2DConditionModel``
# keyword arguments: the torch side is built from them as they are, the jaxdiff side
# (``jaxdiff.nn.unet_cond.UNetCondition``) from the same dict through
# ``jaxdiff.interop.unet2d_condition_config_from_diffusers``. ``sample_size`` x ``sample_size``
# x ``in_channels`` is the latent the benchmark feeds; the text context is [B, 77,
# cross_attention_dim].
# Stable Diffusion 1.5's unet/config.json: 859,520,964 parameters, 64x64x4 latents (512 px).
SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5,
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
    center_input_sample=False, mid_block_scale_factor=1)
# An SD-like model for a 2-core CPU: 2,199,268 parameters, 16x16x4 latents, batch 4. SD's layout
# on three levels (cross-attention at the two finer levels and in the middle, 2 ResBlocks per
# level), 4 heads, a 64-wide context.
COND_SMALL = dict(
    SD15, sample_size=16, block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, attention_head_dim=4)


def diffusers_config(unet: Mapping[str, Any], image_size: int, channels: int = 3) -> dict:
    """The diffusers ``UNet2DModel`` keyword arguments of the same network as
    ``jaxdiff.nn.UNet(**unet)`` on ``image_size`` x ``image_size`` x ``channels`` inputs
    (DDPM conventions: one attention head of width C, sin-first embedding with shift 1,
    downsampling pad (0, 1), GroupNorm eps 1e-6)."""
    ch, mult = unet["ch"], tuple(unet["ch_mult"])
    attn = set(unet.get("attn_resolutions", ()))
    sizes = [image_size // 2 ** lvl for lvl in range(len(mult))]
    if unet.get("num_classes") is not None:
        raise ValueError("diffusers_config: class-conditional configs are not benchmarked")
    down = tuple("AttnDownBlock2D" if s in attn else "DownBlock2D" for s in sizes)
    up = tuple("AttnUpBlock2D" if s in attn else "UpBlock2D" for s in reversed(sizes))
    return dict(
        sample_size=image_size, in_channels=channels,
        out_channels=unet.get("out_channels") or channels,
        block_out_channels=tuple(ch * m for m in mult), down_block_types=down, up_block_types=up,
        layers_per_block=unet["num_res_blocks"], attention_head_dim=unet.get("head_dim"),
        norm_num_groups=unet.get("num_groups", 32), dropout=unet.get("dropout", 0.0),
        downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
        act_fn="silu", mid_block_scale_factor=1, center_input_sample=False,
        time_embedding_type="positional",
    )


def _taps(size: int, k: int, stride: int, pad: tuple[int, int]) -> int:
    """Sum over output positions of the kernel taps that land inside the input (one axis)."""
    out = (size + pad[0] + pad[1] - k) // stride + 1
    return sum(1 for o in range(out) for j in range(k) if 0 <= o * stride - pad[0] + j < size)


def conv_flops(batch: int, h: int, w: int, c_in: int, c_out: int, k: int = 3, stride: int = 1,
               pad: tuple[int, int] | None = None) -> int:
    """2 x multiply-adds of a k x k convolution, counting only taps inside the image (zero
    padding is not multiplied), as XLA's HloCostAnalysis counts."""
    pad = ((k - 1) // 2, k // 2) if pad is None else pad  # 'SAME' for stride 1
    return 2 * batch * c_in * c_out * _taps(h, k, stride, pad) * _taps(w, k, stride, pad)


def unet_forward_flops(unet: Mapping[str, Any], batch: int, image_size: int,
                       channels: int = 3) -> dict[str, int]:
    """Matmul / convolution FLOPs (2 per multiply-add) of one U-Net forward pass, by kind.

    Walks the DDPM layout from the config alone (see :class:`jaxdiff.nn.UNet`): convolutions,
    dense layers (time MLP, time projections, attention projections) and the two attention
    matmuls. Elementwise work (norms, activations, adds) is not counted.
    """
    ch, mult, nrb = unet["ch"], tuple(unet["ch_mult"]), unet["num_res_blocks"]
    attn_res = set(unet.get("attn_resolutions", ()))
    out_ch = unet.get("out_channels") or channels
    temb = 4 * ch
    f = {"conv": 0, "dense": 0, "attention": 0}

    def res(hw, c_in, c_out):
        f["conv"] += conv_flops(batch, hw, hw, c_in, c_out) + conv_flops(batch, hw, hw, c_out, c_out)
        f["dense"] += 2 * batch * temb * c_out
        if c_in != c_out:
            f["conv"] += 2 * batch * hw * hw * c_in * c_out  # 1x1 shortcut

    def attn(hw, c):
        t = hw * hw
        f["dense"] += 4 * 2 * batch * t * c * c  # q, k, v, out projections
        f["attention"] += 2 * 2 * batch * t * t * c  # q k^T and p v (all heads together)

    f["dense"] += 2 * batch * (ch * temb + temb * temb)  # time MLP
    hw = image_size
    f["conv"] += conv_flops(batch, hw, hw, channels, ch)
    c = ch
    skips = [c]
    for lvl, m in enumerate(mult):
        for _ in range(nrb):
            res(hw, c, ch * m)
            c = ch * m
            if hw in attn_res:
                attn(hw, c)
            skips.append(c)
        if lvl != len(mult) - 1:
            f["conv"] += conv_flops(batch, hw, hw, c, c, stride=2, pad=(0, 1))
            hw //= 2
            skips.append(c)
    res(hw, c, c)
    attn(hw, c)
    res(hw, c, c)
    for lvl in reversed(range(len(mult))):
        for _ in range(nrb + 1):
            c_in = c + skips.pop()
            res(hw, c_in, ch * mult[lvl])
            c = ch * mult[lvl]
            if hw in attn_res:
                attn(hw, c)
        if lvl != 0:
            hw *= 2
            f["conv"] += conv_flops(batch, hw, hw, c, c)
    f["conv"] += conv_flops(batch, hw, hw, c, out_ch)
    f["total"] = f["conv"] + f["dense"] + f["attention"]
    return f
