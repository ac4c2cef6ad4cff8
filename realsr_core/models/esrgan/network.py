"""GAN-trained feed-forward upscalers users already have: ESRGAN / Real-ESRGAN's RRDBNet and Real-ESRGAN's compact
VGG-style net (SRVGGNetCompact), with the parameter names of their released files (and of spandrel).

* RRDBNet (Wang et al. 2018, Real-ESRGAN 2021): ``conv_first`` -> ``body`` (RRDB x num_block) -> ``conv_body`` +
  skip -> x2 nearest upsample + conv + LeakyReLU(0.2), twice -> ``conv_hr`` + LeakyReLU -> ``conv_last``.  The x2 and
  x1 models pixel-unshuffle the input first (by 2 / 4), so the body always upsamples x4.
* SRVGGNetCompact (Real-ESRGAN's realesr-animevideov3 / general-x4v3): ``body`` = conv, PReLU, (conv, PReLU) x
  num_conv, conv to 3 r^2 channels -> pixel shuffle r -> plus the nearest-upsampled input.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..blocks.rrdb import RRDB, conv2d_fused, use_fused_conv

__all__ = ["RRDBNet", "SRVGGNetCompact"]


class RRDBNet(nn.Module):
    """ESRGAN's generator.

    Args:
        scale: 4, 2 or 1 (x2 / x1 unshuffle the input by 2 / 4).
        num_in_ch, num_out_ch: image channels (3).
        num_feat: trunk channels (64).
        num_block: RRDBs (23 for x4plus, 6 for x4plus-anime).
        num_grow_ch: dense-block growth channels (32).

    Shape:
        (B, 3, H, W) in [0, 1] -> (B, 3, s*H, s*W); H, W multiples of 4 / s for s < 4.
    """

    def __init__(self, scale: int = 4, num_in_ch: int = 3, num_out_ch: int = 3, num_feat: int = 64,
                 num_block: int = 23, num_grow_ch: int = 32) -> None:
        super().__init__()
        self.scale = scale
        unshuffle = {4: 1, 2: 2, 1: 4}[scale]
        self.unshuffle = unshuffle
        self.conv_first = nn.Conv2d(num_in_ch * unshuffle * unshuffle, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        fused = use_fused_conv(x, self.conv_first.weight)
        feat = conv2d_fused(x, self.conv_first, fused=fused)
        feat = conv2d_fused(self.body(feat), self.conv_body, residual=feat, fused=fused)
        for conv in (self.conv_up1, self.conv_up2):
            feat = conv2d_fused(F.interpolate(feat, scale_factor=2, mode="nearest"), conv, "leaky_relu", fused=fused)
        return conv2d_fused(conv2d_fused(feat, self.conv_hr, "leaky_relu", fused=fused), self.conv_last, fused=fused)


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact net.

    Args:
        scale: pixel-shuffle factor r of the last conv.
        num_feat: channels (64).
        num_conv: body convs after the first (16 for animevideov3, 32 for general-x4v3).
        num_in_ch, num_out_ch: image channels (3).

    Shape:
        (B, 3, H, W) in [0, 1] -> (B, 3, r*H, r*W).
    """

    def __init__(self, scale: int = 4, num_feat: int = 64, num_conv: int = 16, num_in_ch: int = 3,
                 num_out_ch: int = 3) -> None:
        super().__init__()
        self.scale = scale
        layers: list[nn.Module] = [nn.Conv2d(num_in_ch, num_feat, 3, 1, 1), nn.PReLU(num_feat)]
        for _ in range(num_conv):
            layers += [nn.Conv2d(num_feat, num_feat, 3, 1, 1), nn.PReLU(num_feat)]
        layers.append(nn.Conv2d(num_feat, num_out_ch * scale * scale, 3, 1, 1))
        self.body = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        return F.pixel_shuffle(out, self.scale) + F.interpolate(x, scale_factor=self.scale, mode="nearest")
