"""StableSR's official sampling: respaced DDPM with per-step tiled ("canvas") denoising.

Per sampling step and per latent tile, as the official canvas sampler does:

1. ``cond = encoder(lr_latent[tile], t_original)`` (time-aware encoder on the LR-latent crop);
2. ``out = unet(x_t[tile], t_original, context, cond, sft)`` (SFT-modulated UNet, eps or v);
3. the tile outputs are blended with Gaussian weights over the canvas, and the sampler update
   (DDPM posterior, or DDIM) is applied to the whole latent.

Defaults follow the official tiled script: 200 respaced DDPM steps, x_T = ``q_sample(z_lr, 999)``,
empty-prompt context, no classifier-free guidance, latent tiles 64 / overlap 32 for the 512 models
(96 / 48 for 768-v).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from ..errors import InvalidInputError
from ..tiling import CancelFn, ProgressFn
from .aggregation import aggregate_tiles, plan_latent_tiles
from .samplers import (
    ModelFn,
    Noises,
    Prediction,
    SamplerName,
    SampleTrace,
    StepCallback,
    initial_latent,
    sample,
)
from .schedule import DDPMSchedule, make_schedule

__all__ = ["EncoderFn", "UNetFn", "canvas_denoiser", "stablesr_sample"]

#: ``unet(x (N,4,h,w), t_original (N,), context (N,M,D), struct_cond, sft) -> eps or v (N,C,h,w)``.
UNetFn = Callable[..., Tensor]
#: ``encoder(lr_latent (N,4,h,w), t_original (N,)) -> {str(width): (N,C,h_i,w_i)}``.
EncoderFn = Callable[[Tensor, Tensor], Mapping[Any, Tensor]]


def canvas_denoiser(
    unet: UNetFn,
    encoder: EncoderFn,
    sft: Any,
    lr_latent: Tensor,
    context: Tensor | None,
    tile_size: int | tuple[int, int] = 64,
    tile_overlap: int = 32,
    tiles_per_batch: int = 1,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> ModelFn:
    """The tiled StableSR denoiser as a sampler model ``model(x_t, t_original) -> eps or v``.

    Args:
        unet: SFT-capable UNet callable (e.g. :class:`~realsr_core.models.stablesr.unet.StableSRUNet`).
        encoder: time-aware encoder callable.
        sft: the SFT layers, handed to ``unet`` unchanged.
        lr_latent: (B or 1, 4, H, W) scaled LR latent.
        context: (B or 1, M, D) text context (empty prompt in the official scripts), or None.
        tile_size: latent tile (64 for 512 models, 96 for 768-v), see
            :func:`~realsr_core.diffusion.aggregation.plan_latent_tiles`.
        tile_overlap: latent overlap (32 / 48).
        tiles_per_batch: tiles per UNet call.
        progress: ``progress(tiles_done, tiles_total)`` within one step.
        cancel: polled before every tile batch.

    Returns:
        ``model(x (B,4,H,W), t (B,)) -> (B, C_out, H, W)``, the Gaussian-blended output.
    """

    def tile_fn(x_tiles: Tensor, lr_tiles: Tensor, t: Tensor) -> Tensor:
        n = x_tiles.shape[0]
        ctx = context
        if ctx is not None and ctx.shape[0] != n:
            # Tiles are stacked tile-major, so a per-image context repeats once per tile.
            if n % ctx.shape[0]:
                raise InvalidInputError(f"context batch {ctx.shape[0]} does not divide the tile batch {n}")
            ctx = ctx.repeat(n // ctx.shape[0], 1, 1)
        cond = encoder(lr_tiles, t)
        return unet(x_tiles, t, ctx, cond, sft)

    def model(x: Tensor, t: Tensor) -> Tensor:
        with torch.no_grad():
            return aggregate_tiles(
                tile_fn,
                x,
                lr_latent,
                t,
                tile_size=tile_size,
                tile_overlap=tile_overlap,
                tiles_per_batch=tiles_per_batch,
                progress=progress,
                cancel=cancel,
            )

    return model


def stablesr_sample(
    unet: UNetFn,
    encoder: EncoderFn,
    sft: Any,
    lr_latent: Tensor,
    context: Tensor | None,
    steps: int = 200,
    prediction: Prediction = "eps",
    tile_size: int | tuple[int, int] = 64,
    tile_overlap: int = 32,
    start: Literal["lr", "noise"] = "lr",
    sampler: SamplerName = "ddpm",
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    noise_x_T: Tensor | None = None,
    noises: Noises | None = None,
    tiles_per_batch: int = 1,
    callback: StepCallback | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    schedule: DDPMSchedule | None = None,
    trace: SampleTrace | None = None,
) -> Tensor:
    """Run StableSR's whole sampling on a (scaled) LR latent and return the final latent.

    Args:
        unet: SFT-capable UNet callable ``unet(x, t_original, context, struct_cond, sft)``.
        encoder: time-aware encoder ``encoder(lr_latent, t_original) -> cond dict``.
        sft: SFT layers passed to ``unet``.
        lr_latent: (B, 4, H, W) ``0.18215 * VAE.encode(upsampled LR).sample()``.
        context: (B or 1, M, D) text context (official: the empty prompt), or None.
        steps: respaced step count (200 official, 4 for StableSR-Turbo).
        prediction: ``"eps"`` (512 models) or ``"v"`` (768-v).
        tile_size: latent tile (64 / 96); clamped to the latent when larger.
        tile_overlap: latent overlap (32 / 48).
        start: ``"lr"``: x_T = ``q_sample(lr_latent, 999)`` (official tiled script); ``"noise"``: pure noise.
        sampler: ``"ddpm"`` (official ancestral) or ``"ddim"``.
        eta: DDIM stochasticity.
        generator: RNG for x_T and the step noises (when not given explicitly).
        noise_x_T: the noise of x_T, like ``lr_latent``.
        noises: per-step noises (row ``k`` for the ``k``-th executed step).
        tiles_per_batch: tiles per UNet call.
        callback: ``callback(step_index, x0_pred)`` after each step (previews).
        progress: ``progress(done, total)`` in tile evaluations over the whole run
            (``total = steps * tiles``).
        cancel: polled before every tile batch and every step; True raises
            :class:`~realsr_core.errors.Cancelled`.
        schedule: a prebuilt respaced schedule (default ``make_schedule(steps)``).
        trace: collects every step's tensors (see :class:`~realsr_core.diffusion.samplers.SampleTrace`).

    Returns:
        (B, 4, H, W) float32 (or wider) final latent, to be divided by 0.18215 and decoded.
    """
    if lr_latent.ndim != 4:
        raise InvalidInputError(f"lr_latent must be (B, C, H, W), got {tuple(lr_latent.shape)}")
    sched = make_schedule(steps) if schedule is None else schedule
    n_tiles = len(plan_latent_tiles(lr_latent.shape[-2], lr_latent.shape[-1], tile_size, tile_overlap))
    total = sched.num_steps * n_tiles
    step_box = [0]

    def tile_progress(done: int, _n: int) -> None:
        if progress is not None:
            progress(step_box[0] * n_tiles + done, total)

    def step_callback(k: int, x0: Tensor) -> None:
        step_box[0] = k + 1
        if callback is not None:
            callback(k, x0)

    model = canvas_denoiser(
        unet, encoder, sft, lr_latent, context, tile_size, tile_overlap, tiles_per_batch, tile_progress, cancel
    )
    x_T = initial_latent(lr_latent, start, noise=noise_x_T, generator=generator)
    return sample(
        model,
        x_T,
        sched,
        sampler=sampler,
        prediction=prediction,
        eta=eta,
        noises=noises,
        generator=generator,
        callback=step_callback,
        cancel=cancel,
        trace=trace,
    )
