"""Memory: out-of-memory detection, budgets, tile sizes that fit them, and the one out-of-memory back-off.

A tiled pass signals an out-of-memory failure of one network call with :func:`guard_oom` (which turns the
backend's error into :class:`OutOfMemory`, raised outside the handler so the failed call's tensors can be
freed); :func:`run_with_backoff` then frees memory and restarts the pass with half the tile, down to a floor.
The image runner and the VAE windows both run their passes this way.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from ..errors import InvalidInputError

__all__ = [
    "DEFAULT_CPU_BUDGET",
    "OOM_ERROR",
    "OutOfMemory",
    "auto_tile_size",
    "balanced_tile",
    "guard_oom",
    "is_oom_error",
    "memory_budget",
    "round_down",
    "run_with_backoff",
]

T = TypeVar("T")

# torch.OutOfMemoryError appeared in torch 2.5; older releases only have the CUDA alias.
OOM_ERROR: type[RuntimeError] = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
# Activation memory "auto" tiles may use on a CPU (the command line's --memory-budget changes it).
DEFAULT_CPU_BUDGET: int = 1024**3


def is_oom_error(exc: BaseException) -> bool:
    """True for an out-of-memory failure of any backend (CUDA, CPU allocator, MPS, ...)."""
    if isinstance(exc, (OOM_ERROR, torch.cuda.OutOfMemoryError)):
        return True
    if isinstance(exc, RuntimeError):
        msg = str(exc).lower()
        return "out of memory" in msg or "can't allocate" in msg or "defaultcpuallocator" in msg
    return False


def round_down(value: int, multiple: int) -> int:
    """``value`` rounded down to a multiple of ``multiple``, at least ``multiple``."""
    return max(multiple, value // multiple * multiple)


# ---------------------------------------------------------------------------- back-off


class OutOfMemory(Exception):
    """Internal signal: the current tile size ran out of memory (the message names the original error)."""


def guard_oom(call: Callable[..., T], *args: Any) -> T:
    """``call(*args)``, with an out-of-memory error turned into :class:`OutOfMemory`.

    The signal is raised outside the handler and without chaining, so the failed call's frames and tensors
    (held by the original traceback) are freed before a retry.  Other errors propagate unchanged.
    """
    message: str | None = None
    try:
        return call(*args)
    except Exception as exc:
        if not is_oom_error(exc):
            raise
        message = f"{type(exc).__name__}: {exc}"
    del args  # the failed call's inputs (e.g. the windows moved to the device)
    raise OutOfMemory(message)


def run_with_backoff(
    run_pass: Callable[[int], T],
    tile: int,
    *,
    length: int,
    floor: int,
    multiple: int = 1,
    device: torch.device,
    describe: Callable[[int], str],
) -> T:
    """``run_pass(tile)``, restarted with half the tile each time it raises :class:`OutOfMemory`.

    Args:
        run_pass: one full pass at a fixed tile size (its out-of-memory errors wrapped by :func:`guard_oom`).
        tile: the first tile size.
        length: the longer side of the tiled area (a larger tile counts as this).
        floor: smallest tile size to try.
        multiple: halved tiles are rounded down to a multiple of this (not below ``floor``).
        device: the compute device (its cache is emptied between passes).
        describe: ``describe(tile)`` says what ran out of memory, when the tile cannot shrink any further.

    Raises:
        torch.OutOfMemoryError: still out of memory at ``floor``, with ``describe``'s text and the original error.
    """
    while True:
        oom_message: str | None = None
        try:
            return run_pass(tile)
        except OutOfMemory as exc:
            oom_message = str(exc)
        # Outside the handler: the failed pass's frames are gone; collect any cycles it left.
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        current = min(tile, length)
        smaller = max(round_down(current // 2, multiple), floor)
        if smaller >= current:
            raise OOM_ERROR(f"{describe(current)} Original error: {oom_message}")
        tile = smaller


# ---------------------------------------------------------------------------- budgets and tile sizes


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
    return round_down(side, multiple)


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
