"""Tiled inference for feed-forward image models.

An image too large for the device is cut into tiles.  Two separate margins are involved:

* ``context``: extra input pixels around each tile that the model sees but whose output is
  thrown away.  A model whose receptive-field radius (in input pixels) is at most ``context``
  gives exactly the whole-image result, whatever the tile size.
* ``overlap``: neighbouring tiles also share ``overlap`` kept pixels, which are blended with a
  linear feather ramp.  This hides seams of models with a larger (or global) receptive field.

Every tile window has the same size (windows near the border are shifted inwards rather than
truncated), so tiles can be batched, also across images of the batch.  Only one tile batch lives
on the compute device at a time; the result is accumulated on ``output_device``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import Cancelled, InvalidInputError
from .memory import guard_oom, round_down, run_with_backoff
from .plan import check_ints, plan_axis, tile_weight
from .types import CancelFn, ProgressFn

__all__ = ["DEFAULT_MIN_TILE", "TileFn", "run_tiled"]

TileFn = Callable[[Tensor], Tensor]

DEFAULT_MIN_TILE: int = 32


def _check_run_args(
    image: Tensor, scale: int, tile: int, overlap: int, context: int, multiple: int, tiles_per_batch: int, min_tile: int
) -> None:
    if not isinstance(image, Tensor) or image.ndim != 4:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise InvalidInputError(f"image must be a (B, C, H, W) tensor, got {shape}")
    if min(image.shape) < 1:
        raise InvalidInputError(f"image must not have an empty dimension, got {tuple(image.shape)}")
    check_ints(
        ("scale", scale, 1),
        ("tile", tile, 1),
        ("overlap", overlap, 0),
        ("context", context, 0),
        ("multiple", multiple, 1),
        ("tiles_per_batch", tiles_per_batch, 1),
        ("min_tile", min_tile, 1),
    )


def _run_pass(
    fn: TileFn,
    image: Tensor,
    *,
    scale: int,
    tile: int,
    overlap: int,
    context: int,
    tiles_per_batch: int,
    device: torch.device,
    output_device: torch.device,
    acc_dtype: torch.dtype,
    progress: ProgressFn | None,
    cancel: CancelFn | None,
) -> Tensor:
    """One full tiling pass at a fixed tile size; returns the normalised float result."""
    batch, _, height, width = image.shape
    plan_y = plan_axis(height, tile, overlap, context)
    plan_x = plan_axis(width, tile, overlap, context)
    weights_y = [plan_y.weight(i, scale) for i in range(len(plan_y.starts))]
    weights_x = [plan_x.weight(i, scale) for i in range(len(plan_x.starts))]
    jobs = [(b, iy, ix) for b in range(batch) for iy in range(len(plan_y.starts)) for ix in range(len(plan_x.starts))]
    total = len(jobs)
    single = len(plan_y.starts) == 1 and len(plan_x.starts) == 1  # weights all 1: no blending needed

    out: Tensor | None = None  # allocated once the output channel count is known
    # Single-channel weight sum: the weights are the same for every image and channel.
    wsum = None if single else torch.zeros(height * scale, width * scale, dtype=acc_dtype, device=output_device)
    th, tw = plan_y.tile * scale, plan_x.tile * scale

    def run_batch(windows: list[Tensor]) -> Tensor:
        return fn(torch.cat(windows).to(device))

    done = 0
    for first in range(0, total, tiles_per_batch):
        chunk = jobs[first : first + tiles_per_batch]
        if cancel is not None and cancel():
            raise Cancelled(f"tiled run cancelled after {done} of {total} tiles")
        windows = [
            image[
                b : b + 1,
                :,
                plan_y.window_starts[iy] : plan_y.window_starts[iy] + plan_y.window,
                plan_x.window_starts[ix] : plan_x.window_starts[ix] + plan_x.window,
            ]
            for b, iy, ix in chunk
        ]
        y = guard_oom(run_batch, windows)
        del windows
        expected = (len(chunk), plan_y.window * scale, plan_x.window * scale)
        if not isinstance(y, Tensor) or y.ndim != 4 or (y.shape[0], y.shape[2], y.shape[3]) != expected:
            got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise InvalidInputError(
                f"fn must map (N, C, h, w) to (N, C_out, h*{scale}, w*{scale}); for input "
                f"{(len(chunk), image.shape[1], plan_y.window, plan_x.window)} it returned {got}"
            )
        if out is None:
            out = torch.zeros(batch, y.shape[1], height * scale, width * scale, dtype=acc_dtype, device=output_device)

        for k, (b, iy, ix) in enumerate(chunk):
            # Crop the context margin on the compute device, before the transfer.
            cy = (plan_y.starts[iy] - plan_y.window_starts[iy]) * scale
            cx = (plan_x.starts[ix] - plan_x.window_starts[ix]) * scale
            kept = y[k, :, cy : cy + th, cx : cx + tw].to(device=output_device, dtype=acc_dtype)
            oy, ox = plan_y.starts[iy] * scale, plan_x.starts[ix] * scale
            region = out[b, :, oy : oy + th, ox : ox + tw]
            if wsum is None:
                region.copy_(kept)
                continue
            w = tile_weight(weights_y[iy], weights_x[ix]).to(device=output_device, dtype=acc_dtype)
            region.addcmul_(kept, w)
            if b == 0:  # every image has the same tile positions; count each position once
                wsum[oy : oy + th, ox : ox + tw] += w
        del y
        done += len(chunk)
        if progress is not None:
            progress(done, total)

    assert out is not None  # total >= 1
    if wsum is not None:
        out /= wsum
    return out


def run_tiled(
    fn: TileFn,
    image: Tensor,
    *,
    scale: int,
    tile: int,
    overlap: int = 0,
    context: int = 0,
    multiple: int = 1,
    tiles_per_batch: int = 1,
    device: torch.device | str | None = None,
    output_device: torch.device | str = "cpu",
    out_dtype: torch.dtype = torch.float32,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    min_tile: int = DEFAULT_MIN_TILE,
) -> Tensor:
    """Run an image model tile by tile and blend the tiles into one output.

    Each kept tile of ``tile`` x ``tile`` input pixels is run inside a window enlarged by
    ``context`` pixels per side (clamped to the image; border windows are shifted inwards so all
    windows have the same size); the margin is cropped from the output, and kept tiles that
    share ``overlap`` pixels are feather-blended.  With ``context`` >= the model's receptive
    field radius the result equals running the whole image at once.

    Only one batch of ``tiles_per_batch`` windows is on ``device`` at a time; the output
    (B, C_out, H*scale, W*scale) and a single-channel (H*scale, W*scale) weight sum are kept on
    ``output_device``.  Runs under ``torch.no_grad()``.

    On out-of-memory the tile size is halved (rounded down to ``multiple``, not below
    ``min_tile``) and the run restarts from the first tile; ``progress`` then counts against the
    new total.

    Args:
        fn: maps (N, C, h, w) on ``device`` to (N, C_out, h*scale, w*scale) on any device; it pads
            to the model's size multiple itself.
        image: (B, C, H, W) floating tensor on any device, in the range ``fn`` expects.
        scale: output size / input size (integer >= 1).
        tile: kept tile size in input pixels; rounded down to ``multiple``; ``tile >= H, W`` runs
            the whole image.  ``fn`` never receives more than ``tile + 2*context`` per side.
        overlap: input pixels shared (and blended) by neighbouring tiles; clamped to ``tile // 2``.
        context: input pixels of discarded margin around each tile.
        multiple: tile sizes are rounded down to a multiple of this, to keep ``fn``'s padding
            small (choose ``context`` a multiple of ``multiple / 2`` to keep windows aligned too).
        tiles_per_batch: windows per ``fn`` call, taken across tiles and images.
        device: where windows are sent before calling ``fn``; default ``image.device``.
        output_device: where the result is accumulated and returned.
        out_dtype: dtype of the returned tensor (accumulation is float32, or float64 if asked).
        progress: called as ``progress(done_tiles, total_tiles)`` after each ``fn`` call.
        cancel: called before each ``fn`` call; returning True raises ``Cancelled``.
        min_tile: smallest tile size the out-of-memory fallback may try.

    Returns:
        (B, C_out, H*scale, W*scale) on ``output_device`` in ``out_dtype``, not clamped.

    Raises:
        InvalidInputError: bad arguments or an ``fn`` output of the wrong shape.
        Cancelled: ``cancel()`` returned True.
        torch.OutOfMemoryError: still out of memory at ``min_tile``.
    """
    _check_run_args(image, scale, tile, overlap, context, multiple, tiles_per_batch, min_tile)
    if not image.is_floating_point():
        raise InvalidInputError(f"image must be a floating-point tensor, got {image.dtype}")
    compute_device = image.device if device is None else torch.device(device)
    out_device = torch.device(output_device)
    acc_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    height, width = image.shape[-2:]

    def run_pass(tile_px: int) -> Tensor:
        return _run_pass(
            fn,
            image,
            scale=scale,
            tile=tile_px,
            overlap=overlap,
            context=context,
            tiles_per_batch=tiles_per_batch,
            device=compute_device,
            output_device=out_device,
            acc_dtype=acc_dtype,
            progress=progress,
            cancel=cancel,
        ).to(dtype=out_dtype)

    def describe(current: int) -> str:
        return (
            f"out of memory with {current}px tiles (+{context}px context per side, "
            f"{tiles_per_batch} per batch) on {compute_device}, and the tile size cannot go below "
            f"min_tile={min_tile} (multiple {multiple}); free memory, lower tiles_per_batch or use a "
            f"lower precision."
        )

    tile = round_down(tile, multiple) if tile < max(height, width) else tile
    with torch.no_grad():
        return run_with_backoff(
            run_pass,
            tile,
            length=max(height, width),
            floor=round_down(min_tile, multiple),
            multiple=multiple,
            device=compute_device,
            describe=describe,
        )
