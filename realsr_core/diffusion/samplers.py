"""Samplers on a respaced DDPM schedule: StableSR's ancestral DDPM and DDIM.

The denoiser is any callable ``model(x_t, t_original, **cond) -> eps or v`` where ``t_original`` is the
(B,) int64 tensor of *original* 0..999 timesteps (``schedule.timesteps[i]``); every coefficient of
the update is read at the respaced index ``i``.  Sampling math runs in at least float32 whatever the
model's dtype.

Noise can be injected for reproducibility: ``noises`` holds one tensor per executed step (row ``k``
is used by the ``k``-th step, i.e. respaced index ``N-1-k``), otherwise it is drawn from
``generator`` (or the global RNG).  DDPM draws a noise at every step, including the last one where
it is multiplied by zero, so a generator stays aligned with the reference sampler.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from ..errors import Cancelled, InvalidInputError
from ..tiling import CancelFn, ProgressFn
from .schedule import DDPMSchedule, extract, predict_x0_from_eps, predict_x0_from_v, q_posterior, q_sample

__all__ = [
    "DDPMStep",
    "ModelFn",
    "Prediction",
    "SampleTrace",
    "SamplerName",
    "StepCallback",
    "ddim_step",
    "ddpm_step",
    "initial_latent",
    "model_output_to_eps",
    "model_output_to_x0",
    "sample",
]

#: ``model(x_t (B,C,H,W), t_original (B,) int64, **cond) -> eps or v (B,C,H,W)``.
ModelFn = Callable[..., Tensor]
#: ``callback(step_index, x0_pred)`` after each step; ``step_index`` counts executed steps from 0.
StepCallback = Callable[[int, Tensor], None]
Prediction = Literal["eps", "v"]
SamplerName = Literal["ddpm", "ddim"]
Noises = Tensor | Sequence[Tensor]


def _check_prediction(prediction: str) -> None:
    if prediction not in ("eps", "v"):
        raise InvalidInputError(f"prediction must be 'eps' or 'v', got {prediction!r}")


def model_output_to_x0(schedule: DDPMSchedule, x_t: Tensor, i: int, out: Tensor, prediction: Prediction) -> Tensor:
    """x0 estimate from the model output at respaced index ``i`` (eps or v parameterisation)."""
    _check_prediction(prediction)
    if prediction == "eps":
        return predict_x0_from_eps(schedule, x_t, i, out)
    return predict_x0_from_v(schedule, x_t, i, out)


def model_output_to_eps(schedule: DDPMSchedule, x_t: Tensor, i: int, out: Tensor, prediction: Prediction) -> Tensor:
    """Noise estimate from the model output: identity for eps, ``sqrt(abar) v + sqrt(1-abar) x_t`` for v."""
    _check_prediction(prediction)
    if prediction == "eps":
        return out
    idx = torch.full((x_t.shape[0],), i, dtype=torch.int64)
    return extract(schedule.sqrt_alphas_cumprod, idx, x_t) * out + extract(
        schedule.sqrt_one_minus_alphas_cumprod, idx, x_t
    ) * x_t


@dataclass(frozen=True)
class DDPMStep:
    """One ancestral DDPM update.

    Attributes:
        x0_pred: (B, C, H, W) x0 estimate (not clipped).
        mean: (B, C, H, W) posterior mean ``coef1 * x0 + coef2 * x_t``.
        log_variance: (B, 1, 1, 1) clipped posterior log-variance.
        x_prev: (B, C, H, W) the sample at index ``i - 1``.
    """

    x0_pred: Tensor
    mean: Tensor
    log_variance: Tensor
    x_prev: Tensor


def ddpm_step(
    schedule: DDPMSchedule, x_t: Tensor, i: int, model_out: Tensor, prediction: Prediction, noise: Tensor | None
) -> DDPMStep:
    """Ancestral DDPM step ``x_{i-1} = mean + [i > 0] * exp(logvar / 2) * noise`` (no x0 clipping).

    Args:
        schedule: the (respaced) schedule.
        x_t: (B, C, H, W) current sample.
        i: respaced index of ``x_t``.
        model_out: eps or v for ``x_t``.
        prediction: ``"eps"`` or ``"v"``.
        noise: standard normal noise like ``x_t``; unused (may be None) at ``i == 0``.
    """
    x0 = model_output_to_x0(schedule, x_t, i, model_out, prediction)
    mean, _, log_var = q_posterior(schedule, x0, x_t, i)
    if i > 0:
        if noise is None:
            raise InvalidInputError("ddpm_step needs a noise tensor for i > 0")
        x_prev = mean + torch.exp(0.5 * log_var) * noise
    else:
        x_prev = mean
    return DDPMStep(x0_pred=x0, mean=mean, log_variance=log_var, x_prev=x_prev)


def ddim_step(
    schedule: DDPMSchedule,
    x_t: Tensor,
    i: int,
    model_out: Tensor,
    prediction: Prediction,
    eta: float = 0.0,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """DDIM step from respaced index ``i`` to ``i - 1`` (``abar_{-1} = 1``).

    ``x_prev = sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps + sigma noise`` with
    ``sigma = eta sqrt((1 - abar') / (1 - abar)) sqrt(1 - abar / abar')``.

    Returns:
        ``(x0_pred, x_prev)``.
    """
    if eta < 0:
        raise InvalidInputError(f"eta must be >= 0, got {eta}")
    x0 = model_output_to_x0(schedule, x_t, i, model_out, prediction)
    eps = model_output_to_eps(schedule, x_t, i, model_out, prediction)
    a = float(schedule.alphas_cumprod[i])
    a_prev = float(schedule.alphas_cumprod_prev[i])
    sigma = eta * ((1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev)) ** 0.5
    x_prev = a_prev**0.5 * x0 + max(1.0 - a_prev - sigma * sigma, 0.0) ** 0.5 * eps
    if sigma > 0:
        if noise is None:
            raise InvalidInputError("ddim_step with eta > 0 needs a noise tensor")
        x_prev = x_prev + sigma * noise
    return x0, x_prev


@dataclass
class SampleTrace:
    """Per-step tensors collected by :func:`sample` (for tests, debugging and analysis).

    Entry ``k`` of each list belongs to the ``k``-th executed step: its input ``x_t`` (entry 0 is
    x_T), the model output, the x0 estimate and the resulting ``x_prev``.  Tensors are detached
    references, not copies.
    """

    x_t: list[Tensor] = field(default_factory=list)
    model_out: list[Tensor] = field(default_factory=list)
    x0_pred: list[Tensor] = field(default_factory=list)
    x_prev: list[Tensor] = field(default_factory=list)


class _NoiseSource:
    """Per-step standard normal noise: injected rows, a generator, or the global RNG."""

    def __init__(self, noises: Noises | None, generator: torch.Generator | None, steps: int) -> None:
        if noises is not None and len(noises) < steps - 1:
            raise InvalidInputError(f"need a noise per step ({steps}, the last may be omitted), got {len(noises)}")
        self.noises = noises
        self.generator = generator

    def __call__(self, k: int, like: Tensor) -> Tensor | None:
        if self.noises is not None:
            if k >= len(self.noises):
                return None
            n = torch.as_tensor(self.noises[k])
            if n.numel() != like.numel():
                raise InvalidInputError(f"noise {k} has shape {tuple(n.shape)}, expected {tuple(like.shape)}")
            return n.reshape(like.shape).to(device=like.device, dtype=like.dtype)
        if self.generator is not None:
            n = torch.randn(like.shape, generator=self.generator, device=self.generator.device, dtype=torch.float32)
            return n.to(device=like.device, dtype=like.dtype)
        return torch.randn(like.shape, device=like.device, dtype=like.dtype)


def initial_latent(
    lr_latent: Tensor,
    start: Literal["lr", "noise"] = "lr",
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """x_T: ``q_sample(lr_latent, 999)`` (official tiled script) or pure noise.

    Args:
        lr_latent: (B, 4, H, W) scaled LR latent (``0.18215 * VAE.encode(lr).sample()``).
        start: ``"lr"`` = ``0.068265 * lr_latent + 0.99767 * noise`` on the 1000-step table,
            ``"noise"`` = the noise itself.
        noise: standard normal noise like ``lr_latent`` (drawn from ``generator`` when None).
        generator: RNG for the draw.

    Returns:
        (B, 4, H, W) float32 (or wider) starting latent.
    """
    if start not in ("lr", "noise"):
        raise InvalidInputError(f"start must be 'lr' or 'noise', got {start!r}")
    x = lr_latent.to(torch.promote_types(lr_latent.dtype, torch.float32))
    if noise is None:
        noise = _NoiseSource(None, generator, 1)(0, x)
    else:
        noise = noise.reshape(x.shape).to(device=x.device, dtype=x.dtype)
    assert noise is not None
    if start == "noise":
        return noise
    return q_sample(x, 999, noise)


def sample(
    model: ModelFn,
    x_T: Tensor,
    schedule: DDPMSchedule,
    sampler: SamplerName = "ddpm",
    prediction: Prediction = "eps",
    eta: float = 0.0,
    noises: Noises | None = None,
    generator: torch.Generator | None = None,
    cond: Mapping[str, Any] | None = None,
    callback: StepCallback | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    trace: SampleTrace | None = None,
) -> Tensor:
    """Run the whole reverse chain from ``x_T`` at respaced index ``N-1`` down to 0.

    ``"ddpm"`` is StableSR's official sampler: x0 from the model output, posterior mean with
    ``coef1/coef2``, noise scaled by ``exp(logvar_clipped / 2)`` except at the last step, no x0 clipping.
    ``"ddim"`` is DDIM with ``eta`` on the same timesteps (deterministic for ``eta = 0``).

    Args:
        model: ``model(x, t_original, **cond) -> eps or v``.
        x_T: (B, C, H, W) starting latent (see :func:`initial_latent`).
        schedule: respaced schedule, e.g. ``make_schedule(200)``.
        sampler: ``"ddpm"`` or ``"ddim"``.
        prediction: model parameterisation, ``"eps"`` (512 models) or ``"v"`` (768-v).
        eta: DDIM stochasticity (ignored by DDPM).
        noises: per-step noises, row ``k`` for the ``k``-th executed step, each like ``x_T``.
        generator: RNG for the noises when ``noises`` is None.
        cond: extra keyword arguments for ``model``.
        callback: ``callback(step_index, x0_pred)`` after each step (previews).
        progress: ``progress(steps_done, steps_total)`` after each step.
        cancel: polled before each step; True raises :class:`~realsr_core.errors.Cancelled`.
        trace: when given, filled with every step's tensors (see :class:`SampleTrace`).

    Returns:
        (B, C, H, W) final latent ``x_0``.
    """
    _check_prediction(prediction)
    if sampler not in ("ddpm", "ddim"):
        raise InvalidInputError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
    n = schedule.num_steps
    draw = _NoiseSource(noises, generator, n)
    cond = {} if cond is None else dict(cond)
    x = x_T.to(torch.promote_types(x_T.dtype, torch.float32))
    for k, i in enumerate(range(n - 1, -1, -1)):
        if cancel is not None and cancel():
            raise Cancelled("sampling cancelled")
        t = schedule.timesteps[i].to(x.device).expand(x.shape[0])
        out = model(x, t, **cond).to(x.dtype)
        x_t = x
        if sampler == "ddpm":
            noise = draw(k, x)
            step = ddpm_step(schedule, x, i, out, prediction, noise)
            x0, x = step.x0_pred, step.x_prev
        else:
            noise = draw(k, x) if eta > 0 and i > 0 else None
            x0, x = ddim_step(schedule, x, i, out, prediction, eta, noise)
        if trace is not None:
            trace.x_t.append(x_t.detach())
            trace.model_out.append(out.detach())
            trace.x0_pred.append(x0.detach())
            trace.x_prev.append(x.detach())
        if callback is not None:
            callback(k, x0)
        if progress is not None:
            progress(k + 1, n)
    return x
