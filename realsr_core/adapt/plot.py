"""A loss curve drawn as an image (Pillow only), for hosts that show images rather than plots."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

__all__ = ["loss_curve_image", "moving_average"]

_BACKGROUND = (255, 255, 255)
_AXES = (60, 60, 60)
_GRID = (225, 225, 225)
_RAW = (160, 190, 230)
_SMOOTH = (20, 70, 170)


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values (shorter at the start), same length as ``values``."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    csum = np.cumsum(np.asarray(values, dtype=np.float64))
    out = []
    for i in range(len(csum)):
        lo = i - window
        out.append(float((csum[i] - (csum[lo] if lo >= 0 else 0.0)) / (i - max(lo, -1))))
    return out


def loss_curve_image(losses: Sequence[float], width: int = 640, height: int = 360, title: str = "loss") -> Tensor:
    """Plot a loss curve: every iteration (light) and a moving average (dark), iterations on x.

    The y axis spans the data (with a 5 % margin); the first / last smoothed values and the iteration
    count are written on the plot, so the figure reads without a legend.

    Args:
        losses: one value per iteration (may be empty: the plot says so).
        width, height: image size in pixels (at least 160 x 120).
        title: text in the top-left corner.

    Returns:
        (height, width, 3) float32 in [0, 1] (ComfyUI's IMAGE layout without the batch dimension).
    """
    if width < 160 or height < 120:
        raise ValueError(f"the plot needs at least 160x120 pixels, got {width}x{height}")
    img = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 64, width - 16, 28, height - 28
    vals = [float(v) for v in losses if math.isfinite(float(v))]
    if not vals:
        draw.text((left, top), f"{title}: no iterations", fill=_AXES, font=font)
        return _to_tensor(img)
    smooth = moving_average(vals, max(1, len(vals) // 20))
    lo, hi = min(vals), max(vals)
    pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0
    lo, hi = lo - pad, hi + pad
    n = len(vals)

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (right - left) * (i / max(n - 1, 1))
        return x, bottom - (bottom - top) * (v - lo) / (hi - lo)

    for k in range(5):  # horizontal grid lines with their values
        v = lo + (hi - lo) * k / 4
        y = xy(0, v)[1]
        draw.line([(left, y), (right, y)], fill=_GRID)
        draw.text((4, y - 6), f"{v:.4g}", fill=_AXES, font=font)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=_AXES)
    if n == 1:
        x, y = xy(0, vals[0])
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=_SMOOTH)
    else:
        draw.line([xy(i, v) for i, v in enumerate(vals)], fill=_RAW, width=1)
        draw.line([xy(i, v) for i, v in enumerate(smooth)], fill=_SMOOTH, width=2)
    draw.text((left, 8), f"{title}: {smooth[0]:.4g} -> {smooth[-1]:.4g}", fill=_AXES, font=font)
    draw.text((left, bottom + 8), "1", fill=_AXES, font=font)
    draw.text((right - 60, bottom + 8), f"iteration {n}", fill=_AXES, font=font)
    return _to_tensor(img)


def _to_tensor(img: Image.Image) -> Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
