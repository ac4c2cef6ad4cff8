"""MM-RealSR networks: the modulated RRDB generator and the unsupervised degradation estimator (UDEM).

Paper: C. Mou et al., "Metric Learning based Interactive Modulation for Real-World Super-Resolution",
ECCV 2022.  The generator is an ESRGAN RRDB trunk whose features are modulated after every RRDB by
an affine transform ``(1 + gamma) * x + beta``; gamma and beta come from the degradation scores
(general blur, general noise) through a shared embedding and a per-block MLP (the paper's condition
network).  The scores are either estimated by the UDEM (one branch per degradation, global average
pooled, sigmoid in (0, 1)) or set by the user in [0, 1]; a higher score asks for stronger restoration.

State-dict key names equal those of the released checkpoints (``conv_first``, ``body.{i}.rdb{1,2,3}``,
``am_list.{i}.fc``, ``dd_embed``, ``de_net.{conv_first,body,fc_degree}``), so they load strictly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..blocks.rrdb import RRDB, ResidualBlockNoBN, conv2d_fused, use_fused_conv

__all__ = ["AffineModulation", "DegradationEstimator", "MMRealSRNet"]


class AffineModulation(nn.Module):
    """Channel-wise affine modulation of features by a degradation embedding.

    ``fc`` is Linear-ReLU-Linear-ReLU-Linear mapping the embedding to ``2 * num_feat`` values, split
    into ``gamma`` (first half) and ``beta`` (second half); the output is ``(1 + gamma) * x + beta``.

    Args:
        num_feat: channels of the modulated features.
        embed_dim: size of the degradation embedding (512 in the released model).
        hidden_dim: width of the two hidden layers (default ``(embed_dim + 2 * num_feat) // 2``, 320
            in the released model).
    """

    def __init__(self, num_feat: int = 64, embed_dim: int = 512, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden = (embed_dim + 2 * num_feat) // 2 if hidden_dim is None else hidden_dim
        self.fc = nn.Sequential(
            nn.Linear(embed_dim, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, 2 * num_feat),
        )

    def scale_shift(self, embedding: Tensor) -> tuple[Tensor, Tensor]:
        """The per-channel factors ``(1 + gamma, beta)``.

        Args:
            embedding: (B, embed_dim).

        Returns:
            two (B, num_feat, 1, 1) tensors.
        """
        gamma, beta = self.fc(embedding)[:, :, None, None].chunk(2, dim=1)
        return 1 + gamma, beta

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        """Modulate ``x`` (B, num_feat, H, W) by ``embedding`` (B, embed_dim); same shape out."""
        scale, shift = self.scale_shift(embedding)
        return torch.addcmul(shift, x, scale)


class DegradationEstimator(nn.Module):
    """The paper's unsupervised degradation estimation module (UDEM, ``DEResNet`` in the code).

    One independent branch per degradation (index 0 = general blur, 1 = general noise): a 3x3
    ``conv_first[i]``, then ``body[i]`` made of stages of no-BN residual blocks, a 3x3 stride-2 conv
    closing every stage whose ``downscales`` entry is 2 (or a stride-1 conv between stages whose
    widths differ), global average pooling and ``fc_degree[i]`` = Linear-ReLU-Linear-Sigmoid.

    Args:
        in_channels: image channels.
        num_degradation: number of branches / scores.
        num_feats: width of each stage.
        num_blocks: residual blocks per stage.
        downscales: 1 or 2 per stage.
        hidden_dim: width of the hidden layer of ``fc_degree`` (512 in the released model).

    Shape:
        (B, in_channels, H, W) in [0, 1] -> (B, num_degradation) scores in (0, 1).
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_degradation: int = 2,
        num_feats: Sequence[int] = (64, 64, 64, 128),
        num_blocks: Sequence[int] = (2, 2, 2, 2),
        downscales: Sequence[int] = (1, 1, 2, 1),
        hidden_dim: int = 512,
    ) -> None:
        super().__init__()
        if not (len(num_feats) == len(num_blocks) == len(downscales)) or not num_feats:
            raise ValueError("num_feats, num_blocks and downscales must be non-empty and of equal length")
        if any(d not in (1, 2) for d in downscales):
            raise ValueError(f"downscales must be 1 or 2, got {list(downscales)}")
        self.num_degradation = num_degradation
        self.conv_first = nn.ModuleList(nn.Conv2d(in_channels, num_feats[0], 3, 1, 1) for _ in range(num_degradation))
        self.body = nn.ModuleList(
            nn.Sequential(*self._make_body(num_feats, num_blocks, downscales)) for _ in range(num_degradation)
        )
        self.fc_degree = nn.ModuleList(
            nn.Sequential(
                nn.Linear(num_feats[-1], hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, 1), nn.Sigmoid()
            )
            for _ in range(num_degradation)
        )

    @staticmethod
    def _make_body(num_feats: Sequence[int], num_blocks: Sequence[int], downscales: Sequence[int]) -> list[nn.Module]:
        layers: list[nn.Module] = []
        last = len(num_feats) - 1
        for stage, (feat, blocks, down) in enumerate(zip(num_feats, num_blocks, downscales, strict=True)):
            layers += [ResidualBlockNoBN(feat) for _ in range(blocks)]
            nxt = num_feats[min(stage + 1, last)]
            if down == 2:
                layers.append(nn.Conv2d(feat, nxt, 3, 2, 1))
            elif stage < last and nxt != feat:
                layers.append(nn.Conv2d(feat, nxt, 3, 1, 1))
        return layers

    def forward(self, x: Tensor) -> Tensor:
        fused = use_fused_conv(x, self.conv_first[0].weight)
        scores = []
        for conv_first, body, fc in zip(self.conv_first, self.body, self.fc_degree, strict=True):
            feat = conv2d_fused(x, conv_first, fused=fused)
            for layer in body:
                feat = conv2d_fused(feat, layer, fused=fused) if isinstance(layer, nn.Conv2d) else layer(feat)
            scores.append(fc(feat.mean(dim=(2, 3))))
        return torch.cat(scores, dim=1)


class MMRealSRNet(nn.Module):
    """MM-RealSR generator (x4): RRDB trunk with affine modulation after every RRDB, plus its UDEM.

    Args:
        in_channels: image channels of the input (3).
        out_channels: image channels of the output (3).
        num_feat: trunk width.
        num_block: number of RRDBs (each followed by its ``am_list`` modulation).
        num_grow_ch: growth channels of the dense blocks.
        num_degradation: number of degradation scores (2: blur, noise).
        embed_dim: width of ``dd_embed`` (the shared score embedding).
        am_hidden_dim: hidden width of the modulation MLPs (default from ``AffineModulation``).
        de_num_feats, de_num_blocks, de_downscales: stages of the degradation estimator.
        de_hidden_dim: hidden width of the estimator's ``fc_degree`` heads.

    Only the x4 layout exists: the input is used directly (no pixel-unshuffle).
    """

    scale = 4

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        num_feat: int = 64,
        num_block: int = 23,
        num_grow_ch: int = 32,
        num_degradation: int = 2,
        embed_dim: int = 512,
        am_hidden_dim: int | None = None,
        de_num_feats: Sequence[int] = (64, 64, 64, 128),
        de_num_blocks: Sequence[int] = (2, 2, 2, 2),
        de_downscales: Sequence[int] = (1, 1, 2, 1),
        de_hidden_dim: int = 512,
    ) -> None:
        super().__init__()
        self.num_degradation = num_degradation
        self.de_net = DegradationEstimator(
            in_channels, num_degradation, de_num_feats, de_num_blocks, de_downscales, de_hidden_dim
        )
        self.conv_first = nn.Conv2d(in_channels, num_feat, 3, 1, 1)
        self.body = nn.ModuleList(RRDB(num_feat, num_grow_ch) for _ in range(num_block))
        self.am_list = nn.ModuleList(AffineModulation(num_feat, embed_dim, am_hidden_dim) for _ in range(num_block))
        self.dd_embed = nn.Sequential(nn.Linear(num_degradation, embed_dim), nn.ReLU(inplace=True))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, out_channels, 3, 1, 1)

    def estimate(self, x: Tensor) -> Tensor:
        """Degradation scores of whole images.

        Args:
            x: (B, in_channels, H, W) in [0, 1].

        Returns:
            (B, num_degradation) in (0, 1): column 0 = blur, 1 = noise.
        """
        return self.de_net(_to_compute_layout(x))

    def forward(self, x: Tensor, degrees: Tensor | None = None) -> Tensor:
        """Super-resolve ``x`` with fixed degradation scores.

        Args:
            x: (B, in_channels, H, W) in [0, 1].
            degrees: (B, num_degradation) or (num_degradation,) scores in [0, 1] ([blur, noise]);
                ``None`` estimates them on ``x`` itself.

        Returns:
            (B, out_channels, 4H, 4W), not clamped, contiguous NCHW.
        """
        x = _to_compute_layout(x)
        if degrees is None:
            degrees = self.de_net(x)
        degrees = degrees.to(device=x.device, dtype=x.dtype).expand(x.shape[0], self.num_degradation)
        embedding = self.dd_embed(degrees)

        feat = self.conv_first(x)
        body = feat
        for rrdb, am in zip(self.body, self.am_list, strict=True):
            scale, shift = am.scale_shift(embedding)
            body = rrdb(body)
            if torch.is_grad_enabled():
                body = torch.addcmul(shift, body, scale)
            else:  # in place: no second trunk-sized map
                torch.addcmul(shift, body, scale, out=body)
        feat = conv2d_fused(body, self.conv_body, residual=feat)
        del body
        return self._reconstruct(feat)

    def _reconstruct(self, feat: Tensor) -> Tensor:
        """The upsampling tail, computed in bands of output rows.

        conv_up1 and conv_up2 (each after nearest x2), conv_hr and conv_last are evaluated band by band,
        each band from the low-resolution rows it depends on (one halo row per 3x3 conv), so the two
        64-channel maps at 4x resolution never exist in full: peak memory of the tail is about one
        band instead of ``2 * 16 * num_feat * 4`` bytes per input pixel.  Results equal the unbanded
        computation up to float rounding (no output row depends on a zero-padded band edge; the convs of
        other band shapes may use other kernels, a few ulp apart).

        Args:
            feat: (B, num_feat, H, W) trunk features.

        Returns:
            (B, out_channels, 4H, 4W), contiguous NCHW.
        """
        b, _, h, w = feat.shape
        h_out, w_out = 4 * h, 4 * w
        out = torch.empty((b, self.conv_last.out_channels, h_out, w_out), dtype=feat.dtype, device=feat.device)
        stages: list[tuple[nn.Conv2d, bool]] = [
            (self.conv_up1, True),
            (self.conv_up2, True),
            (self.conv_hr, False),
            (self.conv_last, False),
        ]
        band = max(8, (TAIL_BAND_PIXELS // max(1, b * w_out)) // 4 * 4)
        for r0 in range(0, h_out, band):
            r1 = min(h_out, r0 + band)
            # Rows each stage must produce, from the last stage back to the trunk features.
            # Output row 2i+dy of an upsampling stage reads input rows i-1+dy..i+dy; a 3x3 conv row r
            # reads rows r-1..r+1 (zero padding only at the true image border).
            rows = [(r0, r1)]
            src_h = h_out
            for _, up in reversed(stages):
                a, z = rows[0]
                if up:
                    src_h //= 2
                    rows.insert(0, (max(0, a // 2 - 1), min(src_h, (z - 1) // 2 + 2)))
                else:
                    rows.insert(0, (max(0, a - 1), min(src_h, z + 1)))
            s, e = rows[0]
            t = _to_compute_layout(feat[:, :, s:e])
            for (conv, up), (a, z) in zip(stages, rows[1:], strict=True):
                last = conv is self.conv_last
                if up:
                    t = upsample2x_conv_lrelu(t, conv)
                    s, e = 2 * s, 2 * e
                else:
                    t = conv2d_fused(t, conv, "none" if last else "leaky_relu")
                # Drop the rows that depended on the band's zero-padded edges.
                t = _to_compute_layout(t[:, :, a - s : z - s])
                s, e = a, z
            out[:, :, r0:r1] = t
        return out


# Rows of output handled per band of the upsampling tail: about this many output pixels (a band of the
# 64-channel 4x map is then 16 MiB in float32; halo recomputation costs well under 1% of the run).
TAIL_BAND_PIXELS = 1 << 16

# Nearest x2 upsampling followed by a 3x3 conv equals, for each output phase (dy, dx), a 2x2 conv on
# the low-resolution map whose taps are sums of the 3x3 taps: output row 2i+dy reads input rows
# {i-1, i} (dy=0: taps {0}, {1, 2}) or {i, i+1} (dy=1: taps {0, 1}, {2}).  _PHASE_TAPS[d][p][a] = 1
# when 3x3 tap a falls on 2x2 tap p for phase d.
_PHASE_TAPS = ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def upsample2x_conv_lrelu(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``leaky_relu(conv(interpolate(x, scale_factor=2, mode="nearest")), 0.2)`` for a 3x3, pad-1 conv.

    On the fused CPU path it runs as one 2x2 convolution with ``4 * C_out`` outputs on the
    low-resolution map (16 instead of 36 multiply-adds per output and input channel, and no
    upsampled copy of the input), then interleaves the four phases.

    Args:
        x: (B, C_in, H, W).
        conv: ``nn.Conv2d(C_in, C_out, 3, 1, 1)``.

    Returns:
        (B, C_out, 2H, 2W).
    """
    if not use_fused_conv(x, conv.weight):
        return conv2d_fused(F.interpolate(x, scale_factor=2, mode="nearest"), conv, "leaky_relu")
    b, _, h, w = x.shape
    c_out = conv.out_channels
    taps = torch.tensor(_PHASE_TAPS, dtype=x.dtype)
    # kernel[dy, dx, o, i, p, q] = sum_{a, b} taps[dy, p, a] * taps[dx, q, b] * weight[o, i, a, b]
    kernel = torch.einsum("ypa,xqb,oiab->yxoipq", taps, taps, conv.weight).reshape(4 * c_out, -1, 2, 2)
    bias = conv.bias.repeat(4) if conv.bias is not None else None
    one = [1, 1]
    # Output (B, 4*C_out, H+1, W+1): position (u, v) covers input rows u-1..u and columns v-1..v.
    y = torch.ops.mkldnn._convolution_pointwise(x, kernel, bias, one, one, one, 1, "leaky_relu", [0.2], "")
    y = y.contiguous(memory_format=torch.channels_last)
    sb, _, sh, sw = y.stride()
    # Phase (dy, dx) of input pixel (i, j) is y[:, (2*dy + dx)*C_out + c, i + dy, j + dx].
    phases = y.as_strided((b, h, 2, w, 2, c_out), (sb, sh, sh + 2 * c_out, sw, sw + c_out, 1), y.storage_offset())
    out = torch.empty((b, c_out, 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    out.permute(0, 2, 3, 1).view(b, h, 2, w, 2, c_out).copy_(phases)
    return out


def _to_compute_layout(x: Tensor) -> Tensor:
    # oneDNN convolutions on CPU run natively on NHWC; NCHW would be reordered at every call.
    if x.device.type == "cpu":
        return x.contiguous(memory_format=torch.channels_last)
    return x
