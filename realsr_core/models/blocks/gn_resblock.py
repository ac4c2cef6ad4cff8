"""Pre-activation GroupNorm + SiLU residual block (the taming-transformers / VQGAN ResBlock).

``out = shortcut(x) + conv5(silu(norm3(conv2(silu(norm0(x))))))``

Sub-module names follow FeMaSR's layout, so released checkpoints load unchanged::

    conv.0.norm.{weight,bias}   GroupNorm over the input channels
    conv.2.{weight,bias}        3x3 conv, in -> out channels
    conv.3.norm.{weight,bias}   GroupNorm over the output channels
    conv.5.{weight,bias}        3x3 conv, out -> out channels
    shortcut.{weight,bias}      1x1 conv, only when in != out channels

Indices 1 and 4 are the (parameter-free) SiLU activations.

Also home of :class:`Conv2d`, the convolution the GroupNorm models use: on CPUs whose oneDNN build has
no float16/bfloat16 kernels, PyTorch falls back to reference loops that are ~50x slower than float32;
there it convolves the (exactly upcast) half-precision operands in float32 and rounds the result back,
which is what a native half-precision kernel computes too (float32 accumulation, rounded output).

GroupNorm statistics on channels_last CPU maps.  PyTorch's CPU GroupNorm kernel for channels_last
input accumulates every channel's sum and sum of squares sequentially over all H*W pixels in float32
(one accumulator per thread) and takes ``E[x^2] - E[x]^2``; its error grows with the map size (about
1e-3 absolute on a 512x512 map, 1e-6 for the NCHW kernel, which uses cascaded Welford moments).  In
FeMaSR this error reaches the latent and flips near-tie codebook indices from about 512x512 inputs on.
:func:`group_norm` computes the statistics with a two-pass algorithm instead (cascaded per-channel
mean, then the centred sum of squares in cache-sized chunks, combined in float64): NCHW-kernel
accuracy, and the normalisation of the second GroupNorm of a block runs in place.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rrdb import conv2d_fused

__all__ = ["Conv2d", "GNResBlock", "GroupNormLayer", "compute_in_float32", "group_norm"]


@cache
def _native_cpu_kernels(dtype: torch.dtype) -> bool:
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):  # op missing in this build: assume no native kernels
        return False


def compute_in_float32(x: Tensor) -> bool:
    """True when a float16/bfloat16 CPU matmul or convolution on ``x`` should run in float32
    (no native oneDNN kernels for that dtype on this CPU)."""
    return x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16) and not _native_cpu_kernels(x.dtype)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that stays fast for float16/bfloat16 on CPUs without native kernels.

    Same parameters and state-dict keys as ``nn.Conv2d``; see :func:`compute_in_float32`.
    """

    def forward(self, x: Tensor) -> Tensor:
        if compute_in_float32(x):
            b = None if self.bias is None else self.bias.float()
            return self._conv_forward(x.float(), self.weight.float(), b).to(x.dtype)
        return self._conv_forward(x, self.weight, self.bias)


# Elements per chunk of the centred second pass (float32: 512 KiB, about a core's L2).
_STATS_CHUNK = 1 << 17


def _accurate_channels_last(x: Tensor, norm: nn.GroupNorm) -> bool:
    """Whether ``x`` takes :func:`group_norm`'s own path: a CPU float32 channels_last map, no autograd."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and (norm.weight is None or norm.weight.dtype == torch.float32)
        and not (torch.is_grad_enabled() and (x.requires_grad or (norm.weight is not None and norm.weight.requires_grad)))
    )


def _channels_last_scale_shift(xv: Tensor, norm: nn.GroupNorm) -> tuple[Tensor, Tensor]:
    """Per-sample, per-channel ``scale, shift`` (each (B, 1, C) float32) with ``norm(x) = x * scale + shift``.

    Args:
        xv: (B, N, C) view of a channels_last map (N = H*W pixels).
    """
    b, n, c = xv.shape
    g = norm.num_groups
    mean = xv.mean(1, keepdim=True)  # (B, 1, C); cascaded summation
    rows = max(1, _STATS_CHUNK // c)
    buf = xv.new_empty(b, min(rows, n), c)
    parts = []
    for start in range(0, n, rows):
        chunk = xv[:, start : start + rows]
        d = buf[:, : chunk.shape[1]]
        torch.sub(chunk, mean, out=d)
        parts.append(d.square_().sum(1, keepdim=True))
    del buf
    m2 = torch.cat(parts, 1).double().sum(1).view(b, g, c // g)  # centred sums of squares per channel
    cmean = mean.double().view(b, g, c // g)
    gmean = cmean.mean(2, keepdim=True)
    gvar = (m2.sum(2, keepdim=True) + n * (cmean - gmean).square().sum(2, keepdim=True)) / (n * (c // g))
    scale = (gvar + norm.eps).rsqrt().expand(b, g, c // g).reshape(b, 1, c)
    if norm.weight is not None:
        scale = scale * norm.weight.double().view(1, 1, c)
    shift = -gmean.expand(b, g, c // g).reshape(b, 1, c) * scale
    if norm.bias is not None:
        shift = shift + norm.bias.double().view(1, 1, c)
    return scale.float(), shift.float()


def group_norm(x: Tensor, norm: nn.GroupNorm, *, silu: bool = False, inplace: bool = False) -> Tensor:
    """``norm(x)``, optionally followed by SiLU, with accurate statistics on channels_last CPU maps.

    Args:
        x: (B, C, H, W).
        norm: the GroupNorm (its groups, eps and affine parameters are used).
        silu: apply SiLU to the result.
        inplace: the result may overwrite ``x`` (done on the channels_last CPU float32 path only;
            use the returned tensor either way).

    Returns:
        (B, C, H, W) in ``x``'s memory format.
    """
    if not _accurate_channels_last(x, norm):
        y = norm(x)
        return F.silu(y, inplace=True) if silu else y
    b, c, h, w = x.shape
    xv = x.permute(0, 2, 3, 1).view(b, h * w, c)
    scale, shift = _channels_last_scale_shift(xv, norm)
    if inplace:
        yv = torch.addcmul(shift, xv, scale, out=xv)
        y = x
    else:
        yv = torch.addcmul(shift, xv, scale)
        y = yv.view(b, h, w, c).permute(0, 3, 1, 2)
    if silu:
        F.silu(yv, inplace=True)
    return y


class GroupNormLayer(nn.Module):
    """A GroupNorm stored under ``.norm`` (FeMaSR's ``NormLayer`` wrapper, kept for the key names).

    Args:
        channels: number of channels normalised.
        num_groups: GroupNorm groups (32 in taming/VQGAN models).
        eps: variance epsilon (1e-6 in taming/VQGAN models).

    Shape:
        (B, channels, H, W) -> (B, channels, H, W).
    """

    def __init__(self, channels: int, num_groups: int = 32, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(num_groups, channels, eps=eps, affine=True)

    def forward(self, x: Tensor) -> Tensor:
        return group_norm(x, self.norm)


class GNResBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, 3x3 conv) twice plus a shortcut.

    The SiLUs run in place on the GroupNorm outputs, the second GroupNorm normalises the first
    convolution's output in place (CPU float32 channels_last, see :func:`group_norm`), and the residual
    is added in place into the last convolution's output (fused into the convolution on CPU float32
    channels_last), so the block keeps at most three feature maps alive.

    Args:
        in_channels: input channels.
        out_channels: output channels (default ``in_channels``); when different, a 1x1 conv
            ``shortcut`` projects the input for the residual addition.
        num_groups: GroupNorm groups.
        eps: GroupNorm epsilon.

    Shape:
        (B, in_channels, H, W) -> (B, out_channels, H, W), any value range.
    """

    def __init__(
        self, in_channels: int, out_channels: int | None = None, num_groups: int = 32, eps: float = 1e-6
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.conv = nn.Sequential(
            GroupNormLayer(in_channels, num_groups, eps),
            nn.SiLU(inplace=True),
            Conv2d(in_channels, out_channels, 3, 1, 1),
            GroupNormLayer(out_channels, num_groups, eps),
            nn.SiLU(inplace=True),
            Conv2d(out_channels, out_channels, 3, 1, 1),
        )
        self.shortcut: nn.Conv2d | None = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        conv = self.conv
        h = group_norm(x, conv[0].norm, silu=True)  # fresh tensor: x is the residual
        h = conv[2](h)
        h = group_norm(h, conv[3].norm, silu=True, inplace=True)  # h is this block's own
        skip = x if self.shortcut is None else self.shortcut(x)
        return conv2d_fused(h, conv[5], residual=skip)
