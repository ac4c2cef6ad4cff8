"""StableSR's respaced ancestral DDPM in the variance-exploding ("VE", k-diffusion) parameterisation.

Hosts such as ComfyUI drive samplers with ``x_VE = x_VP * sqrt(1 + sigma^2)`` and a denoiser that
returns x0 for ``(x_VE, sigma)``, where ``sigma = sqrt((1 - abar) / abar)``.  The official StableSR
sampler is ancestral DDPM on a respaced schedule (see :mod:`.schedule` and :func:`.samplers.ddpm_step`);
this module rewrites one step of it in that form so that a host sampler loop can run it unchanged:

1. ``sigma_k`` is the sigma of the respaced index ``i = N-1-k`` (original timestep ``t_i``), so the
   host's denoiser sees exactly the official timestep;
2. ``x_VP = x_VE / sqrt(1 + sigma_k^2)``, ``x0 = denoiser(x_VE, sigma_k)``;
3. ``x_VP' = coef1_i * x0 + coef2_i * x_VP + [i > 0] * exp(logvar_i / 2) * noise`` (the official
   posterior, no clipping, no noise at the last step);
4. ``x_VE' = x_VP' * sqrt(1 + sigma_{k+1}^2)`` (``sigma_N = 0`` after the last step).

The official start ``q_sample(z_lr, 999)`` is ``z_lr + sigma_999 * noise`` in VE form
(:func:`lr_start_ve`).  Nothing here depends on a host application.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import Cancelled, InvalidInputError
from ..tiling import CancelFn
from .schedule import DDPMSchedule, make_schedule

__all__ = [
    "DenoiserFn",
    "ddpm_ve_sigmas",
    "ddpm_ve_step",
    "lr_start_ve",
    "official_start_sigma",
    "sample_ddpm_ve",
    "schedule_for_sigmas",
]

#: ``denoiser(x_VE (B,C,H,W), sigma (B,), **extra_args) -> x0 (B,C,H,W)``.
DenoiserFn = Callable[..., Tensor]
#: ``callback({"x", "i", "sigma", "sigma_hat", "denoised"})`` after each step (k-diffusion convention).
StepInfoFn = Callable[[dict[str, Any]], None]


def _sigma_of(acp: Tensor) -> Tensor:
    a = acp.to(torch.float64)
    return ((1.0 - a) / a).sqrt()


def ddpm_ve_sigmas(schedule: DDPMSchedule) -> Tensor:
    """The host sigmas of a respaced schedule: ``sigma`` at indices ``N-1 .. 0``, then 0.

    Args:
        schedule: a respaced schedule, e.g. ``make_schedule(200)``.

    Returns:
        (N + 1,) float32, strictly decreasing, last entry 0.
    """
    sig = _sigma_of(schedule.alphas_cumprod).flip(0)
    return torch.cat([sig, sig.new_zeros(1)]).to(torch.float32)


def official_start_sigma() -> float:
    """``sigma`` of original timestep 999 on the 1000-step table (the official ``q_sample(z, 999)``)."""
    base = make_schedule(None)
    return float(_sigma_of(base.alphas_cumprod[-1:]))


def lr_start_ve(lr_latent: Tensor, noise: Tensor, sigma: float) -> Tensor:
    """VE start ``z_lr + sigma * noise`` (= ``q_sample(z_lr, t) * sqrt(1 + sigma^2)`` for ``sigma = sigma_t``).

    Args:
        lr_latent: (B, C, H, W) scaled LR latent.
        noise: standard normal noise of the same shape.
        sigma: the first sigma of the sampler (``official_start_sigma()`` for the official start).
    """
    if noise.shape != lr_latent.shape:
        raise InvalidInputError(f"noise {tuple(noise.shape)} must match the LR latent {tuple(lr_latent.shape)}")
    return lr_latent + float(sigma) * noise.to(device=lr_latent.device, dtype=lr_latent.dtype)


def schedule_for_sigmas(sigmas: Tensor, rtol: float = 1e-4) -> DDPMSchedule:
    """The respaced schedule whose :func:`ddpm_ve_sigmas` are ``sigmas`` (``len(sigmas) - 1`` steps).

    Raises:
        InvalidInputError: the sigmas are not those of a respaced StableSR schedule.
    """
    n = int(sigmas.shape[0]) - 1
    if n < 1:
        raise InvalidInputError("need at least one sampling step (two sigmas)")
    sched = make_schedule(n)
    ref = ddpm_ve_sigmas(sched).to(torch.float64)
    got = sigmas.detach().to(device="cpu", dtype=torch.float64)
    if not torch.allclose(got, ref, rtol=rtol, atol=0.0):
        raise InvalidInputError(
            "the StableSR DDPM sampler runs on its own respaced sigmas (ddpm_ve_sigmas(make_schedule(steps))); "
            f"got {n + 1} sigmas starting {got[:3].tolist()}, expected {ref[:3].tolist()}"
        )
    return sched


def ddpm_ve_step(
    schedule: DDPMSchedule,
    i: int,
    x: Tensor,
    denoised: Tensor,
    sigma: float,
    sigma_next: float,
    noise: Tensor | None,
) -> Tensor:
    """One official ancestral DDPM step in VE form (respaced index ``i`` -> ``i - 1``).

    Args:
        schedule: the respaced schedule.
        i: respaced index of ``x``.
        x: (B, C, H, W) current VE sample at ``sigma``.
        denoised: the x0 estimate for ``x``.
        sigma: sigma of index ``i``.
        sigma_next: sigma of index ``i - 1`` (0 after the last step).
        noise: standard normal noise like ``x``; unused at ``i == 0``.

    Returns:
        the VE sample at ``sigma_next``, in ``x``'s dtype (math in at least float32).
    """
    ct = torch.promote_types(x.dtype, torch.float32)
    x_vp = x.to(ct) / math.sqrt(1.0 + sigma * sigma)
    c1 = float(schedule.posterior_mean_coef1[i])
    c2 = float(schedule.posterior_mean_coef2[i])
    out = c1 * denoised.to(ct) + c2 * x_vp
    if i > 0:
        if noise is None:
            raise InvalidInputError("ddpm_ve_step needs a noise tensor for i > 0")
        out = out + math.exp(0.5 * float(schedule.posterior_log_variance_clipped[i])) * noise.to(
            device=x.device, dtype=ct
        )
    return (out * math.sqrt(1.0 + sigma_next * sigma_next)).to(x.dtype)


def sample_ddpm_ve(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: StepInfoFn | None = None,
    disable: bool | None = None,
    generator: torch.Generator | None = None,
    noises: Tensor | Sequence[Tensor] | None = None,
    cancel: CancelFn | None = None,
) -> Tensor:
    """The official respaced ancestral DDPM as a k-diffusion-style sampler function.

    ``sigmas`` must be :func:`ddpm_ve_sigmas` of a respaced schedule (its step count is
    ``len(sigmas) - 1``).  A noise is drawn at every step, the last one included (multiplied by
    zero there), as the official sampler does, so a generator stays aligned with it.

    Args:
        model: ``model(x_VE, sigma (B,), **extra_args) -> x0``.
        x: (B, C, H, W) VE start, e.g. :func:`lr_start_ve`.
        sigmas: (N + 1,) host sigmas.
        extra_args: keyword arguments for ``model``.
        callback: called at each step, before the update, with ``{"x", "i", "sigma", "sigma_hat",
            "denoised"}`` (k-diffusion convention: ``x`` is the sample the model saw).
        disable: accepted for host compatibility (progress is the caller's business).
        generator: RNG of the step noises (drawn in float32 on the generator's device).
        noises: explicit step noises, row ``k`` for the ``k``-th executed step (overrides ``generator``).
        cancel: polled before each step; True raises :class:`~realsr_core.errors.Cancelled`.

    Returns:
        (B, C, H, W) the final sample (sigma 0 = x_VP = x0 space).
    """
    del disable
    schedule = schedule_for_sigmas(sigmas)
    n = schedule.num_steps
    if noises is not None and len(noises) < n - 1:
        raise InvalidInputError(f"need a noise per step ({n}, the last may be omitted), got {len(noises)}")
    extra = {} if extra_args is None else dict(extra_args)
    sig = [float(s) for s in sigmas.detach().to("cpu", torch.float64)]
    s_in = x.new_ones((x.shape[0],))
    for k in range(n):
        if cancel is not None and cancel():
            raise Cancelled("sampling cancelled")
        i = n - 1 - k
        denoised = model(x, sigmas[k] * s_in, **extra)
        if noises is not None:
            noise = torch.as_tensor(noises[k]).reshape(x.shape).to(device=x.device) if k < len(noises) else None
        else:
            gen_dev = generator.device if generator is not None else x.device
            noise = torch.randn(x.shape, generator=generator, device=gen_dev, dtype=torch.float32).to(x.device)
        if callback is not None:
            callback({"x": x, "i": k, "sigma": sigmas[k], "sigma_hat": sigmas[k], "denoised": denoised})
        x = ddpm_ve_step(schedule, i, x, denoised, sig[k], sig[k + 1], noise)
    return x
