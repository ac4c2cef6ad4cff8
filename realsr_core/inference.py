"""Run a loaded feed-forward model on images of any size: validation, channels, tiling.

The one entry point is :func:`upscale`.  Whole-image quantities (MM-RealSR's scores) come from the
descriptor's ``prepare`` once per image, before tiling, and are reused for every tile.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from . import tiling
from .descriptor import ModelDescriptor
from .errors import Cancelled, InvalidInputError, NumericalError, RealSRWarning

TileSize = int | Literal["auto"] | None
AlphaMode = Literal["bicubic", "model"]


@dataclass
class UpscaleResult:
    """``image``: (B, C, H*s, W*s) in [0, 1]; ``context``: per image, what ``prepare`` returned."""

    image: Tensor
    context: list[dict[str, Any]] = field(default_factory=list)
    tile: int | None = None


# Pixel values may overshoot [0, 1] a little after resampling (bicubic, Lanczos ringing); those are clamped.
# Anything further out is a different convention (0..255, -1..1) and is refused rather than clamped to white.
RANGE_TOLERANCE = 0.25


def validate_image(image: Tensor, desc: ModelDescriptor) -> None:
    """Refuse what the model cannot take, with a message that says what is expected.

    Args:
        image: (B, C, H, W) float in [0, 1], C in {1, 2, 3, 4} (gray, gray + alpha, RGB, RGBA).
    """
    if not isinstance(image, Tensor) or image.ndim != 4:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise InvalidInputError(f"expected an image tensor of shape (B, C, H, W), got {shape}")
    if not image.is_floating_point():
        raise InvalidInputError(f"expected a float image in [0, 1], got dtype {image.dtype}")
    b, c, h, w = image.shape
    if b == 0:
        raise InvalidInputError("the image batch is empty")
    if c not in (1, 2, 3, 4):
        raise InvalidInputError(f"expected 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA) channels, got {c}")
    if min(h, w) < desc.min_size:
        raise InvalidInputError(
            f"image is {w}x{h} pixels; {desc.name} needs at least {desc.min_size}x{desc.min_size}"
        )
    if not torch.isfinite(image).all():
        raise InvalidInputError("the image contains NaN or infinite values; expected finite values in [0, 1]")
    low, high = float(image.min()), float(image.max())
    if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        hint = " (8-bit values: divide by 255)" if high > 2 else " (a -1..1 image: use (x + 1) / 2)" if low < -0.5 else ""
        raise InvalidInputError(f"pixel values range from {low:g} to {high:g}; expected [0, 1]{hint}")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """A usable torch device from a user's string, or InvalidInputError saying why not.

    None picks CUDA when it is available, else the CPU.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InvalidInputError(f"unknown device {device!r}; expected cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise InvalidInputError(f"device {str(device)!r} was asked for, but {why} (torch {torch.__version__}); "
                                    "use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidInputError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise InvalidInputError(f"device {str(device)!r} was asked for, but MPS is not available here; use cpu")
    elif dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise InvalidInputError(f"device {str(device)!r} is not supported; expected cpu, cuda, cuda:N or mps")
    return dev


def _check_tile(tile: object) -> TileSize:
    if tile is None or tile == "auto":
        return tile  # type: ignore[return-value]
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 0:
        raise InvalidInputError(f"tile must be a size in pixels (an int), 'auto' or None, got {tile!r}")
    return None if tile == 0 else tile


def _check_options(desc: ModelDescriptor, options: dict[str, Any]) -> None:
    accepted = desc.option_names()
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = f"takes {', '.join(accepted)}" if accepted else "takes no options"
        raise InvalidInputError(f"{desc.name} {takes}; got unknown option(s) {', '.join(unknown)}")


def compute_dtype(desc: ModelDescriptor, device: torch.device, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a model actually runs in when ``dtype`` is asked for on ``device`` (None: float32)."""
    if dtype is None:
        return torch.float32
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise InvalidInputError(f"dtype must be torch.float32, torch.float16, torch.bfloat16 or None, got {dtype!r}")
    if dtype == torch.float16 and (not desc.supports_half or device.type == "cpu"):
        # float16 convolutions are slow or missing on CPU; bf16 is the CPU half type.
        return torch.bfloat16 if desc.supports_bf16 and device.type == "cpu" else torch.float32
    if dtype == torch.bfloat16 and not desc.supports_bf16:
        return torch.float32
    return dtype


def _broadcast(ctx: dict[str, Any], n: int) -> dict[str, Any]:
    """Per-image context tensors have batch 1; a tile batch has n items."""
    return {k: v.expand(n, *v.shape[1:]) if isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] == 1 else v
            for k, v in ctx.items()}


def upscale(
    desc: ModelDescriptor,
    image: Tensor,
    *,
    tile: TileSize = "auto",
    overlap: int = 16,
    context: int = 16,
    tiles_per_batch: int = 1,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    output_device: torch.device | str = "cpu",
    alpha: AlphaMode = "bicubic",
    progress: tiling.ProgressFn | None = None,
    cancel: tiling.CancelFn | None = None,
    memory_budget: int | None = None,
    **options: Any,
) -> UpscaleResult:
    """Upscale images with a feed-forward model, tiling when needed.

    Args:
        desc: a loaded model (``load_model``).
        image: (B, C, H, W) in [0, 1], C = 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA); any
            device.  Values within ``RANGE_TOLERANCE`` of the range (resampling overshoot) are clamped;
            others are refused.
        tile: input tile size in pixels, ``"auto"`` (largest that fits the memory budget), None or 0
            (whole image).  Tiles below ``tiling.DEFAULT_MIN_TILE`` are raised to it with a warning.
        overlap: feathered blend width between tiles, input pixels.
        context: extra margin run around each tile and discarded, input pixels.
        tiles_per_batch: tiles of equal size per model call.
        device: where the model runs (default: where it is); the model is moved there.
        dtype: compute dtype (float32 default; half types where the model supports them).  A dtype
            other than the model's runs on a cast copy: the loaded weights are never rounded.
        output_device: where the result is assembled (CPU keeps GPU memory bounded).
        alpha: with alpha only: ``"bicubic"`` resizes alpha, ``"model"`` runs it through the model as gray.
        progress: ``progress(done, total)`` after each tile batch (totals over the whole job).
        cancel: checked before each model call; True raises ``Cancelled``.
        memory_budget: bytes for ``tile="auto"`` (default ``tiling.memory_budget(device)``: a share
            of free GPU memory, or a fixed CPU budget).
        options: architecture options for ``prepare`` (e.g. MM-RealSR ``blur``, ``noise``); a list
            gives one value per image of the batch; an option the model does not take is refused.

    Raises:
        InvalidInputError: a bad image, argument, device or option (the message says which).
        NumericalError: the model produced NaN / inf values.
        Cancelled: ``cancel()`` returned True.

    Returns:
        an ``UpscaleResult``: the image (B, C, H*s, W*s) clamped to [0, 1] on ``output_device``,
        float32, and per-image ``prepare`` results (e.g. the MM-RealSR scores used).
    """
    if desc.purpose == "Module":
        raise InvalidInputError(f"{desc.name} is not an image model on its own; it runs inside its own pipeline")
    validate_image(image, desc)
    if desc.in_channels != 3:
        raise InvalidInputError(f"{desc.name} takes {desc.in_channels}-channel input; only RGB models are run here")
    tile = _check_tile(tile)
    tiling.check_ints(("overlap", overlap, 0), ("context", context, 0), ("tiles_per_batch", tiles_per_batch, 1))
    if alpha not in ("bicubic", "model"):
        raise InvalidInputError(f"alpha must be 'bicubic' or 'model', got {alpha!r}")
    _check_options(desc, options)
    device = resolve_device(device) if device is not None else desc.device
    run_dtype = compute_dtype(desc, device, dtype)
    desc.to(device)  # moving is lossless; a dtype change runs on a copy, so the loaded model is never rounded
    desc = desc.with_dtype(run_dtype)
    b, c, h, w = image.shape
    s = desc.scale

    colour = 3 if c >= 3 else 1
    rgb = image[:, :3] if colour == 3 else image[:, :1].expand(b, 3, h, w)
    has_alpha = c in (2, 4)
    jobs = b * (2 if has_alpha and alpha == "model" else 1)
    floor = max(tiling.DEFAULT_MIN_TILE, desc.min_size)
    if tile == "auto":
        budget = memory_budget if memory_budget is not None else tiling.memory_budget(device)
        # Half types roughly halve activation memory.
        bpp = desc.bytes_per_px * (0.5 if run_dtype in (torch.float16, torch.bfloat16) else 1.0)
        tile_px: int | None = tiling.auto_tile_size(h, w, bpp * tiles_per_batch, budget, desc.size_multiple,
                                                    context=context)
        tile_px = tiling.balanced_tile(max(h, w), tile_px, overlap, desc.size_multiple)
        if tile_px < min(floor, max(h, w)):
            warnings.warn(f"a memory budget of {budget / 2**20:.0f} MiB fits only {tile_px}px tiles of {desc.name}; "
                          f"using {floor}px tiles (smaller ones would run for very long)", RealSRWarning, stacklevel=2)
            tile_px = floor
    else:
        tile_px = tile
        if tile_px is not None and tile_px < floor and tile_px < max(h, w):
            warnings.warn(f"tile {tile_px}px is too small to be useful (each tile runs with a {context}px margin); "
                          f"using {floor}px tiles", RealSRWarning, stacklevel=2)
            tile_px = floor
    if tile_px is not None and tile_px >= max(h, w):
        tile_px = None

    done_before = 0

    def job_progress(done: int, total: int) -> None:
        if progress is not None:
            # One tiling total per image; report over the whole batch.
            progress(done_before + done, total * jobs)

    def run(img: Tensor, ctx: dict[str, Any]) -> Tensor:
        nonlocal done_before
        def fn(x: Tensor) -> Tensor:
            x = x.to(device=device, dtype=run_dtype)
            return desc.forward(x, **_broadcast(ctx, x.shape[0])).float()

        if tile_px is None:
            if cancel is not None and cancel():
                raise Cancelled("cancelled before the model ran")
            out = fn(img).to(output_device)
            job_progress(1, 1)
            done_before += 1
            return out
        totals: list[int] = []

        def track(done: int, total: int) -> None:
            totals[:] = [total]
            job_progress(done, total)

        out = tiling.run_tiled(
            fn, img, scale=s, tile=tile_px, overlap=overlap, context=context,
            multiple=desc.size_multiple, tiles_per_batch=tiles_per_batch, device=device,
            output_device=output_device, progress=track, cancel=cancel,
        )
        done_before += totals[0] if totals else 0
        return out

    for k, v in options.items():
        if isinstance(v, (list, tuple)) and len(v) != b:
            raise InvalidInputError(f"option {k!r} has {len(v)} per-image values for a batch of {b} images")
    outs: list[Tensor] = []
    contexts: list[dict[str, Any]] = []
    for i in range(b):
        x = rgb[i : i + 1].float().clamp(0, 1)
        # A list option gives one value per image (e.g. a sweep of MM-RealSR scores).
        opts = {k: v[i] if isinstance(v, (list, tuple)) else v for k, v in options.items()}
        with torch.inference_mode():
            ctx = desc.prepare(x.to(device, run_dtype), **opts)
            y = _finite(run(x, ctx), desc, run_dtype, device).clamp_(0, 1)
        contexts.append(ctx)
        if colour == 1:
            y = y.mean(dim=1, keepdim=True)
        if has_alpha:
            a = image[i : i + 1, c - 1 : c].float().clamp(0, 1)
            if alpha == "model":
                with torch.inference_mode():
                    ya = _finite(run(a.expand(1, 3, h, w), ctx), desc, run_dtype, device).mean(dim=1, keepdim=True)
            else:
                ya = F.interpolate(a.to(output_device), size=(h * s, w * s), mode="bicubic", align_corners=False)
            y = torch.cat([y, ya.clamp(0, 1)], dim=1)
        outs.append(y)
    # Outside inference mode, cat gives an ordinary tensor that callers may modify or train on.
    return UpscaleResult(torch.cat(outs, dim=0), contexts, tile_px)


def _finite(y: Tensor, desc: ModelDescriptor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Refuse a result with NaN / inf values: saved, they would be silently black or white pixels."""
    bad = int((~torch.isfinite(y)).sum())
    if bad:
        hint = "; run it in float32 (without --half)" if dtype != torch.float32 else ""
        raise NumericalError(f"{desc.name} produced {bad} NaN or infinite values of {y.numel()} on {device} in "
                             f"{str(dtype).removeprefix('torch.')}{hint}; the result was not kept")
    return y
