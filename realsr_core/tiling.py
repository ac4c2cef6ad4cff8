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

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import Cancelled, InvalidInputError

__all__ = [
    "auto_tile_size",
    "balanced_tile",
    "feather_weight",
    "is_oom_error",
    "memory_budget",
    "plan_tiles",
    "run_tiled",
    "tile_weight",
]

TileFn = Callable[[Tensor], Tensor]
ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]

DEFAULT_MIN_TILE: int = 32
# torch.OutOfMemoryError appeared in torch 2.5; older releases only have the CUDA alias.
_OOM_ERROR: type[RuntimeError] = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
# Activation memory "auto" tiles may use on a CPU (the command line's --memory-budget changes it).
DEFAULT_CPU_BUDGET: int = 1024**3


# ---------------------------------------------------------------------------- planning


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


@dataclass(frozen=True)
class _AxisPlan:
    """Where tiles go along one axis, in input pixels."""

    tile: int  # kept region size
    window: int  # size of the region given to the model (tile + context, clamped to the image)
    starts: list[int]  # kept region starts
    window_starts: list[int]  # window starts (shifted inwards at the borders)


def _plan_axis(length: int, tile: int, overlap: int, context: int) -> _AxisPlan:
    tile = min(tile, length)
    overlap = min(overlap, tile // 2)  # keeps the stride >= tile / 2 after tile shrinking
    starts = plan_tiles(length, tile, overlap)
    window = min(length, tile + 2 * context)
    # Shifting (not truncating) a window at the border keeps every window the same size, so
    # tiles batch together; the kept region still has >= context pixels on its inner sides.
    window_starts = [min(max(s - context, 0), length - window) for s in starts]
    return _AxisPlan(tile, window, starts, window_starts)


def _axis_weights(plan: _AxisPlan, overlap: int, scale: int) -> list[Tensor]:
    """Output-space 1-D weights for each tile of an axis."""
    ramp = min(overlap, plan.tile // 2) * scale
    n = len(plan.starts)
    return [feather_weight(plan.tile * scale, ramp, ramp_start=i > 0, ramp_end=i < n - 1) for i in range(n)]


# ---------------------------------------------------------------------------- memory


def is_oom_error(exc: BaseException) -> bool:
    """True for an out-of-memory failure of any backend (CUDA, CPU allocator, MPS, ...)."""
    if isinstance(exc, (_OOM_ERROR, torch.cuda.OutOfMemoryError)):
        return True
    if isinstance(exc, RuntimeError):
        msg = str(exc).lower()
        return "out of memory" in msg or "can't allocate" in msg or "defaultcpuallocator" in msg
    return False


def _round_down(value: int, multiple: int) -> int:
    return max(multiple, value // multiple * multiple)


def auto_tile_size(
    height: int,
    width: int,
    bytes_per_px: float,
    budget_bytes: float,
    multiple: int = 1,
    max_tile: int | None = None,
    *,
    context: int = 0,
) -> int:
    """Largest square tile whose model window fits a memory budget.

    Args:
        height, width: image size in input pixels.
        bytes_per_px: peak memory the model needs per input pixel (activations, all channels).
        budget_bytes: memory available for one tile.
        multiple: the result is a multiple of this (unless the whole image is returned).
        max_tile: upper bound on the tile size; None for none.
        context: margin added on each side of a tile (see ``run_tiled``); the window
            ``(tile + 2*context)**2`` is what must fit.

    Returns:
        ``max(height, width)`` when the whole image fits (and ``max_tile`` allows it), so
        ``run_tiled`` uses one tile; otherwise the largest fitting multiple of ``multiple``,
        at least ``multiple``.
    """
    if height < 1 or width < 1:
        raise InvalidInputError(f"height and width must be >= 1, got {height}x{width}")
    if bytes_per_px <= 0:
        raise InvalidInputError(f"bytes_per_px must be > 0, got {bytes_per_px}")
    if multiple < 1:
        raise InvalidInputError(f"multiple must be >= 1, got {multiple}")
    if max_tile is not None and max_tile < 1:
        raise InvalidInputError(f"max_tile must be >= 1 or None, got {max_tile}")
    whole = max(height, width)
    if height * width * bytes_per_px <= budget_bytes and (max_tile is None or whole <= max_tile):
        return whole
    side = int(math.isqrt(max(0, int(budget_bytes / bytes_per_px)))) - 2 * context
    if max_tile is not None:
        side = min(side, max_tile)
    return _round_down(side, multiple)


def balanced_tile(length: int, tile: int, overlap: int, multiple: int = 1) -> int:
    """The smallest tile (a multiple of ``multiple``, at most ``tile``) that covers ``length`` with as few tiles
    as ``tile`` does.

    ``auto_tile_size`` gives the largest tile that fits memory; with it the last tile of an axis overlaps its
    neighbour by much more than ``overlap`` (1024 px in 558 px tiles: 92 px run twice), and every tile also
    runs its context margin.  Splitting the axis evenly instead runs the fewest pixels for the same count.
    """
    if tile >= length:
        return tile
    overlap = min(overlap, tile // 2)
    count = math.ceil((length - overlap) / (tile - overlap))
    even = math.ceil((length - overlap) / count) + overlap
    return min(tile, math.ceil(even / multiple) * multiple)


def _cpu_available_bytes() -> int | None:
    try:
        import psutil  # optional dependency

        return int(psutil.virtual_memory().available)
    except Exception:  # not installed or unsupported platform
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # value is in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_budget(
    device: torch.device | str,
    *,
    cuda_safety: float = 0.8,
    cpu_budget: int = DEFAULT_CPU_BUDGET,
) -> int:
    """Bytes a tiled run may use on ``device`` (for ``auto_tile_size``).

    CUDA: (driver free memory + memory cached by torch's allocator) * ``cuda_safety``; the cache
    counts because torch reuses it without asking the driver.  CPU: ``cpu_budget`` (1 GiB by default),
    and never more than half of the available RAM: free RAM is not a budget, the user's other programs
    need it too, and tiles of a few hundred pixels run as fast as one huge tile on a CPU.  MPS:
    recommended working set minus what is allocated, times ``cuda_safety``.  Other devices: ``cpu_budget``.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        return int((free + max(0, cached)) * cuda_safety)
    if dev.type == "mps":
        mps = getattr(torch, "mps", None)
        recommended = getattr(mps, "recommended_max_memory", None)
        allocated = getattr(mps, "driver_allocated_memory", None)
        if recommended is not None and allocated is not None:
            return int(max(0, recommended() - allocated()) * cuda_safety)
        return cpu_budget
    if dev.type == "cpu":
        available = _cpu_available_bytes()
        return min(cpu_budget, available // 2) if available is not None else cpu_budget
    return cpu_budget


# ---------------------------------------------------------------------------- running


def _check_run_args(
    image: Tensor, scale: int, tile: int, overlap: int, context: int, multiple: int, tiles_per_batch: int, min_tile: int
) -> None:
    if not isinstance(image, Tensor) or image.ndim != 4:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise InvalidInputError(f"image must be a (B, C, H, W) tensor, got {shape}")
    if min(image.shape) < 1:
        raise InvalidInputError(f"image must not have an empty dimension, got {tuple(image.shape)}")
    for name, value, low in (
        ("scale", scale, 1),
        ("tile", tile, 1),
        ("overlap", overlap, 0),
        ("context", context, 0),
        ("multiple", multiple, 1),
        ("tiles_per_batch", tiles_per_batch, 1),
        ("min_tile", min_tile, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidInputError(f"{name} must be an integer >= {low}, got {value!r}")


class _OutOfMemory(Exception):
    """Internal signal: the current tile size ran out of memory."""


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
    plan_y = _plan_axis(height, tile, overlap, context)
    plan_x = _plan_axis(width, tile, overlap, context)
    weights_y = _axis_weights(plan_y, overlap, scale)
    weights_x = _axis_weights(plan_x, overlap, scale)
    jobs = [(b, iy, ix) for b in range(batch) for iy in range(len(plan_y.starts)) for ix in range(len(plan_x.starts))]
    total = len(jobs)
    single = len(plan_y.starts) == 1 and len(plan_x.starts) == 1  # weights all 1: no blending needed

    out: Tensor | None = None  # allocated once the output channel count is known
    # Single-channel weight sum: the weights are the same for every image and channel.
    wsum = None if single else torch.zeros(height * scale, width * scale, dtype=acc_dtype, device=output_device)
    th, tw = plan_y.tile * scale, plan_x.tile * scale

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
        oom_message: str | None = None
        try:
            x = torch.cat(windows).to(device)
            y = fn(x)
        except Exception as exc:
            if not is_oom_error(exc):
                raise
            oom_message = f"{type(exc).__name__}: {exc}"
        if oom_message is not None:
            # Raised outside the handler and without chaining, so the failed batch's tensors
            # (held by the original traceback) are freed before the retry.
            raise _OutOfMemory(oom_message)
        del x, windows
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

    tile = _round_down(tile, multiple) if tile < max(height, width) else tile
    floor = _round_down(min_tile, multiple)
    with torch.no_grad():
        while True:
            oom_message: str | None = None
            try:
                result = _run_pass(
                    fn,
                    image,
                    scale=scale,
                    tile=tile,
                    overlap=overlap,
                    context=context,
                    tiles_per_batch=tiles_per_batch,
                    device=compute_device,
                    output_device=out_device,
                    acc_dtype=acc_dtype,
                    progress=progress,
                    cancel=cancel,
                )
                return result.to(dtype=out_dtype)
            except _OutOfMemory as exc:
                oom_message = str(exc)
            # Outside the handler: the failed pass's frames are gone; collect any cycles fn left.
            gc.collect()
            if compute_device.type == "cuda":
                torch.cuda.empty_cache()
            current = min(tile, max(height, width))
            smaller = max(_round_down(current // 2, multiple), floor)
            if smaller >= current:
                raise _OOM_ERROR(
                    f"out of memory with {current}px tiles (+{context}px context per side, "
                    f"{tiles_per_batch} per batch) on {compute_device}, and the tile size cannot go below "
                    f"min_tile={min_tile} (multiple {multiple}); free memory, lower tiles_per_batch or use a "
                    f"lower precision. Original error: {oom_message}"
                )
            tile = smaller
