"""Tile plans and blend weights: where tiles go along an axis, and how overlapping tiles are blended.

* :func:`plan_tiles`: the one axis planner (start offsets advancing by ``tile - overlap``, the last tile
  anchored at the far border).  StableSR's official canvas plan is this planner too.
* :func:`plan_axis`: the same plan with a discarded *context* margin around each kept tile (the windows a
  network actually sees), for the image runner and the VAE windows.
* :func:`feather_weight` / :func:`tile_weight`: linear feather ramps over the overlaps (image and VAE tiles).
* :func:`gaussian_weights`: StableSR's Gaussian tile weights (per-step latent aggregation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InvalidInputError

__all__ = [
    "GAUSSIAN_VARIANCE",
    "AxisPlan",
    "check_ints",
    "feather_weight",
    "gaussian_weights",
    "plan_axis",
    "plan_tiles",
    "tile_weight",
]

#: Variance of StableSR's Gaussian tile weights in units of the tile size (sigma = 0.1 * tile).
GAUSSIAN_VARIANCE: float = 0.01


def check_ints(*specs: tuple[str, object, int], unit: str = "") -> None:
    """Refuse any ``(name, value, low)`` whose value is not an integer (bools excluded) >= ``low``.

    ``unit`` (e.g. ``" (in grid cells)"``) is appended to the requirement in the message.
    """
    for name, value, low in specs:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidInputError(f"{name} must be an integer >= {low}{unit}, got {value!r}")


def plan_tiles(length: int, tile: int, overlap: int) -> list[int]:
    """Tile start offsets covering ``[0, length)`` along one axis.

    Tiles advance by ``tile - overlap``; the last one is anchored at ``length - tile`` so no tile
    sticks out of the image (its overlap with the previous tile may therefore exceed
    ``overlap``, never fall short of it).

    Args:
        length: axis length in pixels (>= 1).
        tile: tile size (>= 1).  ``tile >= length`` gives a single tile at 0.
        overlap: pixels shared by neighbouring tiles, ``0 <= overlap < tile``.

    Returns:
        increasing start offsets; the first is 0, the last is ``max(0, length - tile)``.
    """
    if length < 1:
        raise InvalidInputError(f"length must be >= 1, got {length}")
    if tile < 1:
        raise InvalidInputError(f"tile must be >= 1, got {tile}")
    if tile >= length:
        return [0]
    if not 0 <= overlap < tile:
        raise InvalidInputError(f"overlap must be in [0, tile) = [0, {tile}), got {overlap}")
    stride = tile - overlap
    starts = [0]
    while starts[-1] + tile < length:
        starts.append(min(starts[-1] + stride, length - tile))
    return starts


@dataclass(frozen=True)
class AxisPlan:
    """Tiles with context windows along one axis, in input units (pixels, or latent cells)."""

    tile: int  # kept region size
    window: int  # size of the region given to the network (tile + context, clamped to the axis)
    starts: list[int]  # kept region starts
    window_starts: list[int]  # window starts (shifted inwards at the borders)
    overlap: int  # blended overlap (the feather ramp), clamped to tile // 2

    def weight(self, i: int, scale: int = 1) -> Tensor:
        """Output-space 1-D feather weight of tile ``i`` (``scale`` output units per input unit)."""
        n = len(self.starts)
        return feather_weight(self.tile * scale, self.overlap * scale, ramp_start=i > 0, ramp_end=i < n - 1)


def plan_axis(length: int, tile: int, overlap: int, context: int) -> AxisPlan:
    """Kept tiles of :func:`plan_tiles` and the windows around them.

    The tile is clamped to ``length`` and the overlap to half the tile (keeping the stride >= tile / 2).
    Every window has the size ``min(length, tile + 2 * context)``: a window at the border is shifted
    inwards rather than truncated, so windows batch together and the kept region still has >= ``context``
    units on its inner sides.
    """
    tile = min(tile, length)
    overlap = min(overlap, tile // 2)
    starts = plan_tiles(length, tile, overlap)
    window = min(length, tile + 2 * context)
    window_starts = [min(max(s - context, 0), length - window) for s in starts]
    return AxisPlan(tile, window, starts, window_starts, overlap)


def feather_weight(size: int, ramp: int, *, ramp_start: bool, ramp_end: bool) -> Tensor:
    """1-D blend weight of one tile: 1 inside, a linear ramp over ``ramp`` pixels at each
    side that touches a neighbouring tile.

    Ramp values are ``k / (ramp + 1)`` for k = 1..ramp, so they are strictly positive (every
    pixel keeps a non-zero total weight) and a rising and a falling ramp over the same ``ramp``
    pixels sum to exactly 1.

    Args:
        size: tile length (>= 1).
        ramp: ramp length, clipped to ``size``.
        ramp_start, ramp_end: whether the low / high side has a neighbour (False at image borders).

    Returns:
        (size,) float32 weights in (0, 1].
    """
    w = torch.ones(size, dtype=torch.float32)
    ramp = min(ramp, size)
    if ramp <= 0:
        return w
    rise = torch.arange(1, ramp + 1, dtype=torch.float32) / (ramp + 1)
    if ramp_start:
        w[:ramp] = torch.minimum(w[:ramp], rise)
    if ramp_end:
        w[size - ramp :] = torch.minimum(w[size - ramp :], rise.flip(0))
    return w


def tile_weight(weight_y: Tensor, weight_x: Tensor) -> Tensor:
    """Separable 2-D blend weight: (h,) and (w,) -> (h, w) outer product."""
    return weight_y[:, None] * weight_x[None, :]


def _gaussian_1d(n: int, mid: float, var: float) -> Tensor:
    i = torch.arange(n, dtype=torch.float64)
    return torch.exp(-((i - mid) ** 2) / (n * n) / (2 * var)) / math.sqrt(2 * math.pi * var)


def gaussian_weights(
    tile_h: int, tile_w: int, var: float = GAUSSIAN_VARIANCE, dtype: torch.dtype = torch.float64
) -> Tensor:
    """StableSR's blending weights of one tile, ``w(y, x) = p_y(y) * p_x(x)``.

    ``p(i) = exp(-(i - m)^2 / T^2 / (2 var)) / sqrt(2 pi var)``.  As in the official code (inherited from
    Mixture of Diffusers) x is centred at ``(T_w - 1) / 2`` but y at ``T_h / 2``; the weights at a
    tile edge are about 4e-6 of the centre value.

    Args:
        tile_h, tile_w: tile size.
        var: variance relative to the tile size.
        dtype: result dtype (float64 reference by default).

    Returns:
        (tile_h, tile_w) weights, row = y, column = x, all > 0.
    """
    return torch.outer(_gaussian_1d(tile_h, tile_h / 2, var), _gaussian_1d(tile_w, (tile_w - 1) / 2, var)).to(dtype)
