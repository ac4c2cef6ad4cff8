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
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rrdb import conv2d_fused

__all__ = ["Conv2d", "GNResBlock", "GroupNormLayer", "compute_in_float32"]


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
        return self.norm(x)


class GNResBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, 3x3 conv) twice plus a shortcut.

    The SiLUs run in place on the fresh GroupNorm outputs and the residual is added in place into the
    last convolution's output (fused into the convolution on CPU float32 channels_last), so the block
    keeps at most three feature maps alive.

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
        h = conv[0](x)  # fresh tensor: the in-place SiLU cannot touch x
        h = conv[2](F.silu(h, inplace=True))
        h = F.silu(conv[3](h), inplace=True)
        skip = x if self.shortcut is None else self.shortcut(x)
        return conv2d_fused(h, conv[5], residual=skip)
