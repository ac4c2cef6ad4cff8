"""A sampling backend for the StableSR engine that runs a host's k-diffusion sampler (Euler, DPM++ 2M, ...).

The webui's samplers are k-diffusion functions ``sample_x(model, x, sigmas, extra_args, callback, disable,
...)`` over a denoiser ``model(x_VE, sigma) -> x0``.  :class:`KDiffusionSampler` gives them StableSR's canvas
denoiser: per call, the SFT-modulated UNet runs on every official tile of the latent (time-aware encoder on
the LR-latent crop) and the outputs are blended with Gaussian weights, so the aggregation happens at every
step whatever the sampler.  Optional classifier-free guidance on a prompt / negative prompt context.

VE form (see :mod:`.ve`): ``x_VE = x0 + sigma * eps``, ``sigma = sqrt((1 - abar) / abar)``; the UNet sees
``x_VP = x_VE / sqrt(1 + sigma^2)`` at the original timestep whose sigma this is (log-sigma interpolated
between the 1000 training timesteps, as k-diffusion does).  Nothing here depends on a host application.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from ..tiling import CancelFn, ProgressFn
from .pipeline import EncoderFn, UNetFn, canvas_denoiser
from .samplers import Prediction
from .schedule import make_schedule
from .ve import ddpm_ve_sigmas, lr_start_ve

__all__ = ["KDiffusionSampler", "SamplerFn", "timestep_of_sigma"]

#: ``sample(denoiser, x, sigmas, extra_args=None, callback=None, disable=None, ...) -> x0`` (k-diffusion).
SamplerFn = Callable[..., Tensor]


def _training_log_sigmas() -> Tensor:
    acp = make_schedule(1000).alphas_cumprod.double()
    return ((1 - acp) / acp).sqrt().log()


def timestep_of_sigma(sigma: Tensor, log_sigmas: Tensor | None = None) -> Tensor:
    """The (fractional) original timestep 0..999 of a sigma: log-sigma interpolated between training steps.

    Args:
        sigma: (N,) positive sigmas.
        log_sigmas: (1000,) log sigmas of the training timesteps (default: SD's scaled-linear schedule).

    Returns:
        (N,) float32 timesteps.
    """
    ls = (_training_log_sigmas() if log_sigmas is None else log_sigmas).to(sigma.device)
    s = sigma.double().clamp(ls[0].exp(), ls[-1].exp()).log()
    hi = torch.searchsorted(ls, s).clamp(1, ls.numel() - 1)
    lo = hi - 1
    w = (s - ls[lo]) / (ls[hi] - ls[lo])
    return (lo.double() + w).float()


class KDiffusionSampler:
    """The engine's sampling backend over a k-diffusion sampler function (see module docstring).

    Args:
        sample_fn: the sampler, e.g. ``k_diffusion.sampling.sample_euler_ancestral``.
        unet, encoder, sft: as for :class:`~realsr_core.diffusion.engine.CoreSampler`.
        context: (1, 77, D) prompt context; ``uncond``: the negative prompt's, used when ``cfg != 1``.
        prediction: ``"eps"`` or ``"v"`` (read from the weights, not from the host).
        steps: sampler steps; the sigmas are those of the respaced official timesteps (uniform in t).
        seed: seeds x_T's noise and the ancestral samplers' noises (CPU generator, any device).
        start: ``"lr_latent"`` (x_T = z_lr + sigma_max * eps) or ``"noise"``.
    """

    def __init__(self, sample_fn: SamplerFn, unet: UNetFn, encoder: EncoderFn, sft: object, context: Tensor,
                 uncond: Tensor | None = None, *, cfg: float = 1.0, prediction: Prediction, steps: int, seed: int,
                 start: Literal["lr_latent", "noise"] = "lr_latent", latent_scale: float = 0.18215,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> None:
        self.sample_fn, self.unet, self.encoder, self.sft = sample_fn, unet, encoder, sft
        self.context, self.uncond, self.cfg = context, uncond, float(cfg)
        self.prediction, self.steps, self.seed, self.start = prediction, steps, seed, start
        self.latent_scale, self.device, self.dtype = latent_scale, torch.device(device), dtype
        self.progress, self.cancel = progress, cancel

    def _denoiser(self, lr: Tensor, tile: int, overlap: int) -> Callable[..., Tensor]:
        dtype = self.dtype

        def unet_fn(x: Tensor, t: Tensor, ctx: Tensor | None, cond: object, sft: object) -> Tensor:
            return self.unet(x.to(dtype), t, None if ctx is None else ctx.to(dtype), cond, sft).float()

        def encoder_fn(x: Tensor, t: Tensor) -> object:
            return self.encoder(x.to(dtype), t)

        def model_for(ctx: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
            return canvas_denoiser(unet_fn, encoder_fn, self.sft, lr, ctx, tile, overlap, cancel=self.cancel)

        cond_model = model_for(self.context)
        uncond_model = model_for(self.uncond) if self.uncond is not None and self.cfg != 1.0 else None
        log_sigmas = _training_log_sigmas()

        def denoise(x: Tensor, sigma: Tensor, **_extra: Any) -> Tensor:
            sigma = sigma.reshape(-1).float().expand(x.shape[0])
            t = timestep_of_sigma(sigma, log_sigmas)
            s = sigma.view(-1, 1, 1, 1).to(x)
            x_vp = x / (1 + s**2).sqrt()
            out = cond_model(x_vp, t)
            if uncond_model is not None:
                u = uncond_model(x_vp, t)
                out = u + self.cfg * (out - u)
            if self.prediction == "v":  # x0 = sqrt(abar) x_t - sqrt(1 - abar) v, with abar = 1 / (1 + sigma^2)
                return (x_vp - s * out) / (1 + s**2).sqrt()
            return x - s * out  # x_VE = x0 + sigma * eps

        return denoise

    def __call__(self, latent: Tensor, tile: int, overlap: int) -> Tensor:
        gen = torch.Generator(device="cpu").manual_seed(int(self.seed))
        lr = (latent.float() * self.latent_scale).to(self.device)
        noise = torch.randn(lr.shape, generator=gen, dtype=torch.float32).to(self.device)
        sigmas = ddpm_ve_sigmas(make_schedule(self.steps)).to(self.device)
        x = lr_start_ve(lr, noise, float(sigmas[0])) if self.start == "lr_latent" else noise * sigmas[0]
        kwargs: dict[str, Any] = {"extra_args": {}, "disable": True}
        params = inspect.signature(self.sample_fn).parameters
        if "noise_sampler" in params:  # ancestral / SDE samplers: seeded noise, the same on every device
            kwargs["noise_sampler"] = lambda _s, _n: torch.randn(lr.shape, generator=gen).to(self.device)
        if self.progress is not None:
            total = len(sigmas) - 1
            kwargs["callback"] = lambda info: self.progress(int(info["i"]) + 1, total)
        with torch.no_grad():
            out = self.sample_fn(self._denoiser(lr, tile, overlap), x, sigmas, **kwargs)
        return (out.float() / self.latent_scale).cpu()
