"""ESRGAN residual-in-residual dense blocks and the plain no-BN residual block.

Key names follow BasicSR (``rdb1.conv1.weight`` ..., ``conv1``/``conv2``) so released checkpoints load
unchanged.  Every block is generic in its channel counts.

Inference speed on CPU.  For float32 ``channels_last`` inputs on CPU the blocks run oneDNN convolutions
with fused epilogues (``torch.ops.mkldnn._convolution_pointwise``): the activation and the residual
addition are applied inside the convolution.  On large maps the dense block does not concatenate its
features: a convolution is linear in its input channels, so ``conv_k(cat(x0, ..., x_{k-1}))`` equals the
sum of ``conv_k`` restricted to each input's channel slice, and each partial convolution accumulates in
place into the output (oneDNN "sum" post-op).  The ops are probed once at import; every other case
(CUDA, half precision, NCHW, autograd, a torch build without them) takes the plain PyTorch path, which
computes the same function.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "RRDB",
    "ResidualBlockNoBN",
    "ResidualDenseBlock",
    "conv2d_fused",
    "fused_conv_available",
    "use_fused_conv",
]

Activation = Literal["none", "relu", "leaky_relu"]
_LEAKY_SLOPE = 0.2
# From this many pixels per feature map on, the dense block accumulates split-weight convolutions
# instead of concatenating (measured on a 2-core AVX2 CPU: equal at 128x128, 1.2-1.5x faster at 256x256).
SPLIT_MIN_PIXELS = 128 * 128


def _probe_fused_conv() -> bool:
    """True when this torch build has the oneDNN fused convolution ops and they compute correctly."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        x = torch.arange(2 * 3 * 3, dtype=torch.float32).reshape(1, 2, 3, 3) / 10
        x = x.contiguous(memory_format=torch.channels_last)
        w = torch.linspace(-1.0, 1.0, 2 * 2 * 9).reshape(2, 2, 3, 3)
        b = torch.tensor([0.1, -0.2])
        one = [1, 1]
        y = torch.ops.mkldnn._convolution_pointwise(x, w, b, one, one, one, 1, "leaky_relu", [_LEAKY_SLOPE], "")
        acc = torch.ops.mkldnn._convolution_pointwise(x, w, None, one, one, one, 1, "none", [], "")
        torch.ops.mkldnn._convolution_pointwise_.binary(acc, x, w, b, one, one, one, 1, "add", 1.0, None, [], None)
        ref = F.conv2d(x, w, b, padding=1)
        ok = torch.allclose(y, F.leaky_relu(ref, _LEAKY_SLOPE), atol=1e-5)
        return ok and torch.allclose(acc, ref + F.conv2d(x, w, padding=1), atol=1e-5)
    except Exception:  # missing op or changed signature in another torch build: use plain PyTorch
        return False


fused_conv_available: bool = _probe_fused_conv()


def use_fused_conv(x: Tensor, *weights: Tensor) -> bool:
    """Whether ``x`` can take the oneDNN fused path (CPU float32 channels_last, no autograd).

    Args:
        x: (B, C, H, W) activation.
        weights: every convolution weight the caller will run on this decision (a whole block decides
            once): their dtype must match and none may need grads, or a partly frozen block would
            silently lose the gradients of its trainable convs.
    """
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights))
    return (
        fused_conv_available
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and all(w.dtype == torch.float32 for w in weights)
        and x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and not needs_grad
    )


def _conv_args(conv: nn.Conv2d) -> tuple[list[int], list[int], list[int], int]:
    padding = conv.padding
    if isinstance(padding, str):  # "same"/"valid" are not used by these blocks
        raise ValueError(f"string padding {padding!r} is not supported by the fused path")
    return list(padding), list(conv.stride), list(conv.dilation), conv.groups


def conv2d_fused(
    x: Tensor,
    conv: nn.Conv2d,
    act: Activation = "none",
    residual: Tensor | None = None,
    *,
    fused: bool | None = None,
) -> Tensor:
    """``act(conv(x))`` or ``conv(x) + residual`` in one oneDNN call when possible.

    Args:
        x: (B, C_in, H, W).
        conv: a zero-padded ``nn.Conv2d``.
        act: activation applied after the convolution (LeakyReLU uses slope 0.2). Not combined with
            ``residual``.
        residual: (B, C_out, H', W') tensor added to the convolution output.
        fused: force the path (``None``: decided by :func:`use_fused_conv`).

    Returns:
        (B, C_out, H', W'); channels_last when the fused path ran.
    """
    if act != "none" and residual is not None:
        raise ValueError("conv2d_fused applies either an activation or a residual, not both")
    if fused is None:
        fused = use_fused_conv(x, conv.weight)
    if fused:
        padding, stride, dilation, groups = _conv_args(conv)
        if residual is not None:
            residual = residual.contiguous(memory_format=torch.channels_last)
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual, conv.weight, conv.bias, padding, stride, dilation, groups, "add", 1.0, None, [], None
            )
        scalars = [_LEAKY_SLOPE] if act == "leaky_relu" else []
        return torch.ops.mkldnn._convolution_pointwise(
            x, conv.weight, conv.bias, padding, stride, dilation, groups, act, scalars, ""
        )
    y = conv(x)
    if residual is not None:
        return y.add_(residual)
    if act == "relu":
        return F.relu_(y)
    if act == "leaky_relu":
        return F.leaky_relu_(y, _LEAKY_SLOPE)
    return y


class ResidualDenseBlock(nn.Module):
    """ESRGAN residual dense block: 5 densely connected 3x3 convs, output ``x + 0.2 * conv5(...)``.

    ``conv_k`` sees the concatenation of the input and every earlier growth feature
    (``num_feat + (k - 1) * num_grow_ch`` channels); conv1-4 are followed by LeakyReLU(0.2).

    Args:
        num_feat: channels of the input and the output.
        num_grow_ch: channels produced by conv1-conv4 (growth channels).

    Shape:
        (B, num_feat, H, W) -> (B, num_feat, H, W), any value range.
    """

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32) -> None:
        super().__init__()
        self.num_feat = num_feat
        self.num_grow_ch = num_grow_ch
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)

    def _convs(self) -> tuple[nn.Conv2d, ...]:
        return (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5)

    def forward(self, x: Tensor) -> Tensor:
        if use_fused_conv(x, *(c.weight for c in self._convs())):
            return self._forward_fused(x)
        feats = [x]
        for conv in self._convs()[:4]:
            inp = x if len(feats) == 1 else torch.cat(feats, 1)
            feats.append(F.leaky_relu_(conv(inp), _LEAKY_SLOPE))
        return torch.add(x, self.conv5(torch.cat(feats, 1)), alpha=0.2)

    def _forward_fused(self, x: Tensor) -> Tensor:
        one = [1, 1]
        convs = self._convs()
        if x.shape[-2] * x.shape[-1] < SPLIT_MIN_PIXELS:
            # Small maps stay in cache, so concatenating is cheap and one large conv per step is the
            # most efficient; the LeakyReLU is fused into the convolution.
            feats = [x]
            for conv in convs[:4]:
                inp = x if len(feats) == 1 else torch.cat(feats, 1)
                feats.append(
                    torch.ops.mkldnn._convolution_pointwise(
                        inp, conv.weight, conv.bias, one, one, one, 1, "leaky_relu", [_LEAKY_SLOPE], ""
                    )
                )
            out = torch.ops.mkldnn._convolution_pointwise(
                torch.cat(feats, 1), self.conv5.weight, self.conv5.bias, one, one, one, 1, "none", [], ""
            )
            return torch.add(x, out, alpha=0.2)
        # Large maps: split-weight accumulation, conv_k(cat(f_0..f_{k-1})) = sum_j conv_k[:, slice_j](f_j),
        # summed in place by oneDNN, so the growing concatenation is never copied.  Weight slices are
        # views; oneDNN reorders the weights at every call anyway.
        bounds = [0, self.num_feat] + [self.num_feat + (i + 1) * self.num_grow_ch for i in range(4)]
        feats = [x]
        acc = x
        for k, conv in enumerate(convs):
            w = conv.weight
            first_act = "leaky_relu" if k == 0 else "none"
            scalars = [_LEAKY_SLOPE] if k == 0 else []
            acc = torch.ops.mkldnn._convolution_pointwise(
                x, w[:, : self.num_feat], conv.bias, one, one, one, 1, first_act, scalars, ""
            )
            for j in range(1, k + 1):
                torch.ops.mkldnn._convolution_pointwise_.binary(
                    acc, feats[j], w[:, bounds[j] : bounds[j + 1]], None, one, one, one, 1, "add", 1.0, None, [], None
                )
            if 0 < k < 4:  # oneDNN's in-place sum cannot be followed by a fused activation
                F.leaky_relu_(acc, _LEAKY_SLOPE)
            feats.append(acc)
        return torch.add(x, acc, alpha=0.2)


class RRDB(nn.Module):
    """Residual-in-residual dense block: three :class:`ResidualDenseBlock`, output ``x + 0.2 * rdb3(...)``.

    Args:
        num_feat: channels of the input and the output.
        num_grow_ch: growth channels of each dense block.

    Shape:
        (B, num_feat, H, W) -> (B, num_feat, H, W), any value range.
    """

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: Tensor) -> Tensor:
        return torch.add(x, self.rdb3(self.rdb2(self.rdb1(x))), alpha=0.2)


class ResidualBlockNoBN(nn.Module):
    """Plain residual block without normalisation: ``x + conv2(relu(conv1(x)))``.

    Args:
        num_feat: channels of the input and the output.

    Shape:
        (B, num_feat, H, W) -> (B, num_feat, H, W), any value range.
    """

    def __init__(self, num_feat: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        fused = use_fused_conv(x, self.conv1.weight, self.conv2.weight)
        return conv2d_fused(conv2d_fused(x, self.conv1, "relu", fused=fused), self.conv2, residual=x, fused=fused)
