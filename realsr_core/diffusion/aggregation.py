"""Progressive patch aggregation: StableSR's per-step tiled denoising of a large latent.

At every sampling step the latent canvas is cut into overlapping tiles, each tile is denoised on its
own (with the matching crop of the LR latent as structure condition) and the raw model outputs (eps
or v) are blended back with Gaussian weights: ``out = sum_k W * out_k / sum_k W``.  Because x0 is
affine in the model output at fixed ``x_t``, the sampler can then apply its update to the whole
canvas at once.

The tile geometry is the official one: along an axis of length ``L`` the tile count is the smallest
``n`` with ``(n - 1) * (tile - overlap) + tile >= L``, tile ``k`` starts at ``k * (tile - overlap)``
and the last tile is anchored at ``L - tile``: the shared planner :func:`~realsr_core.tiling.plan_tiles`.
Tiles are visited x-outer / y-inner; the weights are :func:`~realsr_core.tiling.gaussian_weights`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import Cancelled, InvalidInputError
from ..tiling import CancelFn, ProgressFn, gaussian_weights, plan_tiles

__all__ = [
    "TileDenoiseFn",
    "TilePlan",
    "aggregate_tiles",
    "plan_latent_tiles",
]

#: ``denoise_tile(x_tiles, lr_tiles, t) -> out_tiles`` on a batch of tiles, see :func:`aggregate_tiles`.
TileDenoiseFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class TilePlan:
    """Tiles of a latent canvas, in processing order.

    Attributes:
        height, width: canvas size in latent pixels.
        tile_h, tile_w: size shared by every tile (the requested tile, clamped to the canvas).
        tiles: ``(y0, y1, x0, x1)`` per tile, x-outer / y-inner order.
    """

    height: int
    width: int
    tile_h: int
    tile_w: int
    tiles: tuple[tuple[int, int, int, int], ...]

    def __len__(self) -> int:
        return len(self.tiles)


def _pair(v: int | tuple[int, int], name: str) -> tuple[int, int]:
    a, b = (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))
    if a < 1 or b < 1:
        raise InvalidInputError(f"{name} must be >= 1, got {v}")
    return a, b


def plan_latent_tiles(
    height: int, width: int, tile_size: int | tuple[int, int], tile_overlap: int, clamp: bool = True
) -> TilePlan:
    """Official StableSR canvas tile plan.

    The official sampler fails when the latent is smaller than the tile along an axis (it computes a
    negative offset).  With ``clamp=True`` (default) the tile is instead shrunk to the latent size
    along that axis, which gives a single tile covering it; the other axis keeps the official plan.
    For every size the official code handles, the plan is identical to it.

    Args:
        height, width: latent size.
        tile_size: tile side (64 for 512 models, 96 for 768-v), or ``(tile_h, tile_w)``.
        tile_overlap: overlap between neighbouring tiles (32 / 48), ``< tile``.
        clamp: shrink the tile to the latent size instead of raising.

    Raises:
        InvalidInputError: bad sizes, ``tile_overlap >= tile``, or (``clamp=False``) a latent smaller
            than the tile.
    """
    if height < 1 or width < 1:
        raise InvalidInputError(f"latent size must be positive, got {height}x{width}")
    th, tw = _pair(tile_size, "tile_size")
    if tile_overlap < 0:
        raise InvalidInputError(f"tile_overlap must be >= 0, got {tile_overlap}")
    if th > height or tw > width:
        if not clamp:
            raise InvalidInputError(
                f"latent {height}x{width} is smaller than the {th}x{tw} tile; use a larger image or a smaller tile"
            )
        th, tw = min(th, height), min(tw, width)
    for tile, length in ((th, height), (tw, width)):
        if tile < length and tile_overlap >= tile:
            raise InvalidInputError(f"tile_overlap must be in [0, tile) = [0, {tile}), got {tile_overlap}")
    ys = plan_tiles(height, th, tile_overlap)
    xs = plan_tiles(width, tw, tile_overlap)
    tiles = tuple((y, y + th, x, x + tw) for x in xs for y in ys)
    return TilePlan(height=height, width=width, tile_h=th, tile_w=tw, tiles=tiles)


def aggregate_tiles(
    denoise_tile: TileDenoiseFn,
    x: Tensor,
    lr_latent: Tensor,
    t: Tensor,
    tile_size: int | tuple[int, int] = 64,
    tile_overlap: int = 32,
    tiles_per_batch: int = 1,
    weights: Tensor | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    clamp: bool = True,
) -> Tensor:
    """Denoise a latent canvas tile by tile and blend the outputs with Gaussian weights.

    ``denoise_tile`` receives ``k <= tiles_per_batch`` tiles at once, concatenated tile-major along the
    batch axis: rows ``[j*B, (j+1)*B)`` are tile ``j`` of every image of the batch, and ``t`` is repeated
    accordingly.  Tiles are visited in plan order (x-outer / y-inner).

    Args:
        denoise_tile: ``(x_tiles (k*B, C, th, tw), lr_tiles (k*B, C_lr, th, tw), t (k*B,)) ->
            out_tiles (k*B, C_out, th, tw)``; ``C_out`` may differ from ``C``.
        x: (B, C, H, W) noisy latent ``x_t``.
        lr_latent: (B or 1, C_lr, H, W) LR latent (structure condition), same spatial size as ``x``.
        t: (B,) or (1,) or scalar original timestep(s) passed through to ``denoise_tile``.
        tile_size: tile side or ``(tile_h, tile_w)`` in latent pixels.
        tile_overlap: overlap between tiles.
        tiles_per_batch: tiles per ``denoise_tile`` call (>= 1).
        weights: (tile_h, tile_w) blending weights (default :func:`gaussian_weights` of the tile).
        progress: called as ``progress(tiles_done, tiles_total)`` after each call.
        cancel: polled before each call; returning True raises :class:`~realsr_core.errors.Cancelled`.
        clamp: see :func:`plan_latent_tiles`.

    Returns:
        (B, C_out, H, W) blended model output, in the dtype of the tile outputs (at least float32).
    """
    if x.ndim != 4:
        raise InvalidInputError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    bsz, _, height, width = x.shape
    if lr_latent.ndim != 4 or lr_latent.shape[-2:] != x.shape[-2:] or lr_latent.shape[0] not in (1, bsz):
        raise InvalidInputError(
            f"lr_latent must be (B or 1, C, {height}, {width}) to match x {tuple(x.shape)}, got {tuple(lr_latent.shape)}"
        )
    if tiles_per_batch < 1:
        raise InvalidInputError(f"tiles_per_batch must be >= 1, got {tiles_per_batch}")
    lr = lr_latent.expand(bsz, -1, -1, -1)
    t = torch.as_tensor(t, device=x.device).reshape(-1)
    if t.shape[0] not in (1, bsz):
        raise InvalidInputError(f"t must hold 1 or {bsz} timesteps, got {t.shape[0]}")
    t = t.expand(bsz)

    plan = plan_latent_tiles(height, width, tile_size, tile_overlap, clamp=clamp)
    if weights is None:
        weights = gaussian_weights(plan.tile_h, plan.tile_w)
    elif tuple(weights.shape[-2:]) != (plan.tile_h, plan.tile_w):
        raise InvalidInputError(f"weights must be ({plan.tile_h}, {plan.tile_w}), got {tuple(weights.shape)}")

    canvas: Tensor | None = None
    total_w = torch.zeros((height, width), dtype=torch.float32, device=x.device)
    n = len(plan)
    done = 0
    while done < n:
        if cancel is not None and cancel():
            raise Cancelled("cancelled during tiled denoising")
        group = plan.tiles[done : done + tiles_per_batch]
        x_tiles = torch.cat([x[:, :, y0:y1, x0:x1] for y0, y1, x0, x1 in group])
        lr_tiles = torch.cat([lr[:, :, y0:y1, x0:x1] for y0, y1, x0, x1 in group])
        out = denoise_tile(x_tiles, lr_tiles, t.repeat(len(group)))
        if out.ndim != 4 or out.shape[0] != x_tiles.shape[0] or out.shape[-2:] != x_tiles.shape[-2:]:
            raise InvalidInputError(
                f"denoise_tile returned shape {tuple(out.shape)} for tiles of shape {tuple(x_tiles.shape)}"
            )
        if canvas is None:
            acc_dtype = torch.promote_types(out.dtype, torch.float32)
            canvas = torch.zeros((bsz, out.shape[1], height, width), dtype=acc_dtype, device=x.device)
            w = weights.to(device=x.device, dtype=acc_dtype)
        for j, (y0, y1, x0, x1) in enumerate(group):
            canvas[:, :, y0:y1, x0:x1] += out[j * bsz : (j + 1) * bsz].to(acc_dtype) * w
            total_w[y0:y1, x0:x1] += w.to(torch.float32)
        done += len(group)
        if progress is not None:
            progress(done, n)
    assert canvas is not None  # a plan always holds at least one tile
    return canvas / total_w.to(canvas.dtype)
