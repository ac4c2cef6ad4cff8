"""FeMaSR network (Chen et al., "Real-World Blind Super-Resolution via Feature Matching with Implicit
High-Resolution Priors", ACM MM 2022), written for inference.

Data flow (SR, LQ stage)::

    x (B,3,H,W) -> in_conv (k4, p1) -> stride-2 blocks -> SwinLayers (4 RSTB)          latent H/2^d
        latent -> before_quant (1x1) -> VQ (nearest code of the HRP codebook)
               -> after_quant (3x3) -> decoder stage 0 -> (+ up1) -> stage 1 -> (+ up2) -> stage 2 -> out_conv
        latent -> upsampler 1 (up1) -> upsampler 2 (up2)        encoder residuals for decoder stages 1, 2

The decoder always upsamples x8 from the latent; the encoder downsamples by 2 (x4) or 4 (x2), so the
scale is ``2**(decoder stages - encoder stride-2 blocks)``.  The HRP autoencoder (stage I, scale 1) has
three stride-2 blocks, no Swin layers, no upsamplers and no encoder residuals.

Module names reproduce the official state-dict keys (``multiscale_encoder.blocks.{i}``,
``before_quant_group.0``, ``quantize_group.0.embedding``, ``after_quant_group.0.conv``,
``decoder_group.{i}.block.{1,2,3}``, ``out_conv``).

Speed: every "nearest x2 upsample + 3x3 conv" pair is computed as one stride-2 transposed 4x4
convolution (:class:`NearestUpConv`), which needs 16/36 of the multiply-adds and never builds the
upsampled map; the VQ gathers codes instead of multiplying a one-hot matrix; attention uses
``scaled_dot_product_attention``; residual additions are in place or fused into the convolution.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..blocks.gn_resblock import Conv2d, GNResBlock, compute_in_float32
from ..blocks.swin import RSTB
from ..blocks.vq import VectorQuantizer

__all__ = ["FeMaSRConfig", "FeMaSRNet", "NearestUpConv", "SwinConfig", "SwinLayers", "nearest_up_conv_weight"]


@dataclass(frozen=True)
class SwinConfig:
    """The SwinLayers of the SR encoder (SwinIR RSTBs on the latent).

    Attributes:
        num_layers: RSTBs (4 in the released models).
        shifts: cyclic window shift of each Swin block of an RSTB (0 / window_size // 2 alternating).
        num_heads: attention heads (8).
        window_size: window side (8).
        mlp_hidden: MLP hidden channels (4 * dim = 1024).
        mask_resolution: latent size of the stored ``attn_mask`` buffers (32).
    """

    num_layers: int
    shifts: tuple[int, ...]
    num_heads: int
    window_size: int
    mlp_hidden: int
    mask_resolution: int


@dataclass(frozen=True)
class FeMaSRConfig:
    """FeMaSR hyper-parameters, all readable from a state dict's shapes.

    Attributes:
        stem_channels: output channels of ``in_conv``.
        down_channels: output channels of each stride-2 encoder block.
        codebook_size, codebook_dim: the VQ codebook (``n_e``, ``e_dim``).
        decoder_channels: output channels of each x2 decoder stage.
        swin: the Swin layers (None for the HRP autoencoder).
        up_channels: output channels of each encoder upsampler (SR only; residuals of decoder stages 1..).
        in_channels, out_channels: image channels.
        num_groups, eps: GroupNorm of the residual blocks.
    """

    stem_channels: int
    down_channels: tuple[int, ...]
    codebook_size: int
    codebook_dim: int
    decoder_channels: tuple[int, ...]
    swin: SwinConfig | None = None
    up_channels: tuple[int, ...] = ()
    in_channels: int = 3
    out_channels: int = 3
    num_groups: int = 32
    eps: float = 1e-6

    @property
    def lq_stage(self) -> bool:
        """True for the SR models (stage II), False for the HRP autoencoder."""
        return self.swin is not None

    @property
    def scale(self) -> int:
        return 2 ** (len(self.decoder_channels) - len(self.down_channels))

    @property
    def latent_stride(self) -> int:
        """Input pixels per latent pixel along each side."""
        return 2 ** len(self.down_channels)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(scale=self.scale, lq_stage=self.lq_stage)
        return d


# Row k of this matrix says which 3x3 taps land on tap k of the equivalent 4x4 transposed kernel.
_NEAREST_UP_TAPS = ((0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0))


def nearest_up_conv_weight(weight: Tensor) -> Tensor:
    """Transposed-convolution kernel equal to "nearest x2 upsampling, then a 3x3 conv (padding 1)".

    Output pixel ``2i + a`` of the upsampled conv reads input rows ``i-1, i`` (a = 0) or ``i, i+1``
    (a = 1) with the 3x3 rows summed as ``[w0, w1 + w2]`` / ``[w0 + w1, w2]``; a stride-2, padding-1
    4x4 transposed conv with per-axis taps ``[w2, w1 + w2, w0 + w1, w0]`` does exactly that (same
    zero padding at the borders).

    Args:
        weight: (C_out, C_in, 3, 3) conv weight, any floating dtype.

    Returns:
        (C_in, C_out, 4, 4) weight for ``conv_transpose2d(x, w, bias, stride=2, padding=1)``, in
        ``weight``'s dtype (summed in at least float32).
    """
    dtype = torch.promote_types(weight.dtype, torch.float32)
    taps = torch.tensor(_NEAREST_UP_TAPS, dtype=dtype, device=weight.device)
    return torch.einsum("ka,oiab,lb->iokl", taps, weight.to(dtype), taps).to(weight.dtype)


class NearestUpConv(Conv2d):
    """``conv3x3(nearest_upsample_x2(x))`` as one stride-2 transposed convolution.

    Holds the official 3x3 weight (so checkpoints load unchanged) and derives the 4x4 transposed
    kernel per call (cheap next to the convolution; no stale cache after ``.to()`` or reloads).

    Shape:
        (B, C_in, H, W) -> (B, C_out, 2H, 2W).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        w, b, inp = self.weight, self.bias, x
        if compute_in_float32(x):  # no native half kernels: PyTorch's fallback would be very slow
            w, b, inp = w.float(), None if b is None else b.float(), x.float()
        w = nearest_up_conv_weight(w)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            w = w.contiguous(memory_format=torch.channels_last)  # saves oneDNN a reorder per call
        return F.conv_transpose2d(inp, w, b, stride=2, padding=1).to(x.dtype)


def _up_block(in_ch: int, out_ch: int, num_groups: int, eps: float) -> nn.Sequential:
    # Official layout: 0 = nn.Upsample (no parameters, fused into 1 here), 1 = conv, 2-3 = ResBlocks.
    return nn.Sequential(
        OrderedDict(
            [
                ("1", NearestUpConv(in_ch, out_ch)),
                ("2", GNResBlock(out_ch, num_groups=num_groups, eps=eps)),
                ("3", GNResBlock(out_ch, num_groups=num_groups, eps=eps)),
            ]
        )
    )


def _down_block(in_ch: int, out_ch: int, num_groups: int, eps: float) -> nn.Sequential:
    return nn.Sequential(
        Conv2d(in_ch, out_ch, 3, stride=2, padding=1),
        GNResBlock(out_ch, num_groups=num_groups, eps=eps),
        GNResBlock(out_ch, num_groups=num_groups, eps=eps),
    )


class SwinLayers(nn.Module):
    """A stack of RSTBs on an NCHW map (FeMaSR's ``SwinLayers``).

    Shape:
        (B, C, H, W) -> (B, C, H, W) in the input's memory format; H, W multiples of the window size.
    """

    def __init__(self, dim: int, config: SwinConfig) -> None:
        super().__init__()
        self.swin_blks = nn.ModuleList(
            RSTB(
                dim,
                len(config.shifts),
                config.num_heads,
                config.window_size,
                config.mlp_hidden,
                config.mask_resolution,
                shifts=config.shifts,
            )
            for _ in range(config.num_layers)
        )

    def forward(self, x: Tensor) -> Tensor:
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        for rstb in self.swin_blks:
            x = rstb(x)  # channels_last-strided: the token layout of the attention
        return x if channels_last else x.contiguous()


class MultiScaleEncoder(nn.Module):
    """Encoder: ``in_conv``, stride-2 blocks, then (SR) SwinLayers and two upsamplers.

    ``blocks`` keeps the official order, so block indices match the checkpoint keys.
    """

    def __init__(self, config: FeMaSRConfig) -> None:
        super().__init__()
        g, eps = config.num_groups, config.eps
        self.in_conv = Conv2d(config.in_channels, config.stem_channels, 4, padding=1)
        blocks: list[nn.Module] = []
        ch = config.stem_channels
        for out_ch in config.down_channels:
            blocks.append(_down_block(ch, out_ch, g, eps))
            ch = out_ch
        self.num_down = len(config.down_channels)
        if config.swin is not None:
            blocks.append(SwinLayers(ch, config.swin))
            for out_ch in config.up_channels:
                blocks.append(_up_block(ch, out_ch, g, eps))
                ch = out_ch
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor, with_residuals: bool = True) -> tuple[Tensor, list[Tensor]]:
        """Returns ``(latent, residuals)``: the map to quantise and the upsampler outputs (SR; skipped
        when ``with_residuals`` is False)."""
        x = self.in_conv(x)
        for blk in self.blocks[: self.num_down]:
            x = blk(x)
        residuals: list[Tensor] = []
        if len(self.blocks) > self.num_down:
            x = self.blocks[self.num_down](x)  # SwinLayers
            h = x
            for blk in self.blocks[self.num_down + 1 :] if with_residuals else ():
                h = blk(h)
                residuals.append(h)
        return x, residuals


class DecoderBlock(nn.Module):
    """x2 decoder stage: nearest x2 + 3x3 conv (fused), two ResBlocks; keys ``block.{1,2,3}``."""

    def __init__(self, in_ch: int, out_ch: int, num_groups: int, eps: float) -> None:
        super().__init__()
        self.block = _up_block(in_ch, out_ch, num_groups, eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class FeMaSRNet(nn.Module):
    """FeMaSR SR network (x2 / x4) or its HRP autoencoder (x1), inference only.

    Args:
        config: hyper-parameters (see :func:`realsr_core.models.femasr.infer_config`).

    Shape:
        (B, in_channels, H, W) -> (B, out_channels, H*scale, W*scale), not clamped.  The raw network
        needs H and W to be multiples of ``latent_stride * window_size`` (SR) or ``latent_stride``
        (HRP); the descriptor pads like the official ``test()``.
    """

    def __init__(self, config: FeMaSRConfig) -> None:
        super().__init__()
        if config.lq_stage and len(config.up_channels) != len(config.decoder_channels) - 1:
            raise ValueError("an SR FeMaSR needs one encoder upsampler per decoder stage after the first")
        self.config = config
        g, eps = config.num_groups, config.eps
        latent_ch = config.down_channels[-1]
        self.multiscale_encoder = MultiScaleEncoder(config)
        self.before_quant_group = nn.ModuleList([Conv2d(latent_ch, config.codebook_dim, 1)])
        self.quantize_group = nn.ModuleList([VectorQuantizer(config.codebook_size, config.codebook_dim)])
        self.after_quant_group = nn.ModuleList(
            [nn.Sequential(OrderedDict(conv=Conv2d(config.codebook_dim, latent_ch, 3, 1, 1)))]
        )
        dec: list[nn.Module] = []
        ch = latent_ch
        for out_ch in config.decoder_channels:
            dec.append(DecoderBlock(ch, out_ch, g, eps))
            ch = out_ch
        self.decoder_group = nn.ModuleList(dec)
        self.out_conv = Conv2d(ch, config.out_channels, 3, 1, 1)

    @property
    def scale(self) -> int:
        return self.config.scale

    def encode_indices(self, x: Tensor) -> Tensor:
        """Code indices of an image.

        Args:
            x: (B, in_channels, H, W) in [0, 1].

        Returns:
            (B, 1, H / latent_stride, W / latent_stride) int64 indices into the codebook.
        """
        latent, _ = self.multiscale_encoder(x, with_residuals=False)
        return self.quantize_group[0](self.before_quant_group[0](latent))[1]

    def forward_with_indices(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Run the network; returns ``(image, indices)``.

        Args:
            x: (B, in_channels, H, W) in [0, 1]; NCHW or channels_last (the whole network then runs in
                that memory format).

        Returns:
            image: (B, out_channels, H*scale, W*scale), not clamped.
            indices: (B, 1, h, w) int64 code index of every latent position.
        """
        latent, residuals = self.multiscale_encoder(x)
        z_q, indices = self.quantize_group[0](self.before_quant_group[0](latent))
        del latent
        h = self.after_quant_group[0](z_q)
        del z_q
        residuals.reverse()  # pop() hands them out in decoder order and frees each after use
        for i, stage in enumerate(self.decoder_group):
            if i > 0 and self.config.lq_stage:
                h += residuals.pop()  # h is a fresh stage output: safe in place
            h = stage(h)
        return self.out_conv(h), indices

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, H, W) in [0, 1] -> (B, out_channels, H*scale, W*scale), not clamped."""
        return self.forward_with_indices(x)[0]
