"""Run a loaded feed-forward model on images of any size: validation, channels, tiling.

The one entry point is :func:`upscale`.  Whole-image quantities (MM-RealSR's scores) come from the
descriptor's ``prepare`` once per image, before tiling, and are reused for every tile.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from . import tiling
from .descriptor import ModelDescriptor
from .errors import Cancelled, InvalidInputError

TileSize = int | Literal["auto"] | None
AlphaMode = Literal["bicubic", "model"]


@dataclass
class UpscaleResult:
    """``image``: (B, C, H*s, W*s) in [0, 1]; ``context``: per image, what ``prepare`` returned."""

    image: Tensor
    context: list[dict[str, Any]] = field(default_factory=list)
    tile: int | None = None


def validate_image(image: Tensor, desc: ModelDescriptor) -> None:
    """Refuse what the model cannot take, with a message that says what is expected.

    Args:
        image: (B, C, H, W) float, C in {1, 3, 4}.
    """
    if not isinstance(image, Tensor) or image.ndim != 4:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise InvalidInputError(f"expected an image tensor of shape (B, C, H, W), got {shape}")
    if not image.is_floating_point():
        raise InvalidInputError(f"expected a float image in [0, 1], got dtype {image.dtype}")
    b, c, h, w = image.shape
    if b == 0:
        raise InvalidInputError("the image batch is empty")
    if c not in (1, 3, 4):
        raise InvalidInputError(f"expected 1 (gray), 3 (RGB) or 4 (RGBA) channels, got {c}")
    if min(h, w) < desc.min_size:
        raise InvalidInputError(
            f"image is {w}x{h} pixels; {desc.name} needs at least {desc.min_size}x{desc.min_size}"
        )
    if not torch.isfinite(image).all():
        raise InvalidInputError("the image contains NaN or infinite values; expected finite values in [0, 1]")


def _pick_dtype(desc: ModelDescriptor, device: torch.device, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
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
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    memory_budget: int | None = None,
    **options: Any,
) -> UpscaleResult:
    """Upscale images with a feed-forward model, tiling when needed.

    Args:
        desc: a loaded model (``load_model``).
        image: (B, C, H, W) in [0, 1], C = 1 (gray), 3 (RGB) or 4 (RGBA); any device.
        tile: input tile size, ``"auto"`` (largest that fits the memory budget) or None (whole image).
        overlap: feathered blend width between tiles, input pixels.
        context: extra margin run around each tile and discarded, input pixels.
        tiles_per_batch: tiles of equal size per model call.
        device: where the model runs (default: where it is).
        dtype: compute dtype (float32 default; half types where the model supports them).
        output_device: where the result is assembled (CPU keeps GPU memory bounded).
        alpha: RGBA only: ``"bicubic"`` resizes alpha, ``"model"`` runs it through the model as gray.
        progress: ``progress(done, total)`` after each tile batch (totals over the whole job).
        cancel: checked before each model call; True raises ``Cancelled``.
        memory_budget: bytes for ``tile="auto"`` (default: from the device's free memory).
        options: architecture options for ``prepare`` (e.g. MM-RealSR ``blur``, ``noise``); a list
            gives one value per image of the batch.

    Returns:
        an ``UpscaleResult``: the image (B, C, H*s, W*s) clamped to [0, 1] on ``output_device``,
        float32, and per-image ``prepare`` results (e.g. the MM-RealSR scores used).
    """
    if desc.purpose == "Module":
        raise InvalidInputError(f"{desc.name} is not an image model on its own; it runs inside its own pipeline")
    validate_image(image, desc)
    if desc.in_channels != 3:
        raise InvalidInputError(f"{desc.name} takes {desc.in_channels}-channel input; only RGB models are run here")
    device = torch.device(device) if device is not None else desc.device
    compute_dtype = _pick_dtype(desc, device, dtype)
    desc.to(device, compute_dtype)
    b, c, h, w = image.shape
    s = desc.scale

    rgb = image[:, :3] if c >= 3 else image.expand(b, 3, h, w)
    jobs = b * (2 if c == 4 and alpha == "model" else 1)
    if tile == "auto":
        budget = memory_budget if memory_budget is not None else tiling.memory_budget(device)
        # Half types roughly halve activation memory.
        bpp = desc.bytes_per_px * (0.5 if compute_dtype in (torch.float16, torch.bfloat16) else 1.0)
        tile_px: int | None = tiling.auto_tile_size(h, w, bpp * tiles_per_batch, budget, desc.size_multiple)
    else:
        tile_px = tile
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
            x = x.to(device=device, dtype=compute_dtype)
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
            ctx = desc.prepare(x.to(device, compute_dtype), **opts)
            y = run(x, ctx).clamp_(0, 1)
        contexts.append(ctx)
        if c == 1:
            y = y.mean(dim=1, keepdim=True)
        elif c == 4:
            a = image[i : i + 1, 3:4].float()
            if alpha == "model":
                with torch.inference_mode():
                    ya = run(a.expand(1, 3, h, w), ctx).mean(dim=1, keepdim=True)
            else:
                ya = F.interpolate(a.to(output_device), size=(h * s, w * s), mode="bicubic", align_corners=False)
            y = torch.cat([y, ya.clamp(0, 1)], dim=1)
        outs.append(y)
    # Outside inference mode, cat gives an ordinary tensor that callers may modify or train on.
    return UpscaleResult(torch.cat(outs, dim=0), contexts, tile_px)
