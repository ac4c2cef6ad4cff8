"""DDPM noise schedules: SD's scaled-linear betas and the respacing StableSR samples with.

StableSR trains on the 1000-step latent-diffusion schedule (``betas = linspace(sqrt(0.00085),
sqrt(0.012), 1000)**2``) and samples on a respaced subset of its timesteps (200 by default, 4 for the
Turbo checkpoint).  Respacing keeps the cumulative products of the kept timesteps:
``beta'_k = 1 - abar[t_k] / abar[t_{k-1}]``.  The UNet and the time-aware encoder then receive the
*original* timestep ``t_k`` while every sampler coefficient is read at the respaced index ``k``.

The tables are built with numpy in exactly the dtypes the latent-diffusion code uses (float64 for the
base schedule, float32 for the ratios taken from the stored float32 ``abar`` buffer, mixed float32 /
float64 for the posterior terms) and are stored as float32, so they are bit-identical to the
reference implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from ..errors import InvalidInputError

__all__ = [
    "DDPMSchedule",
    "LINEAR_END",
    "LINEAR_START",
    "NUM_TRAIN_TIMESTEPS",
    "extract",
    "make_schedule",
    "predict_x0_from_eps",
    "predict_x0_from_v",
    "q_posterior",
    "q_sample",
    "respace_betas",
    "scaled_linear_betas",
    "space_timesteps",
]

NUM_TRAIN_TIMESTEPS: int = 1000
LINEAR_START: float = 0.00085
LINEAR_END: float = 0.012
# Floor of the posterior variance before its log: the first posterior variance is exactly 0.
_LOG_VARIANCE_FLOOR: float = 1e-20


def scaled_linear_betas(
    num_timesteps: int = NUM_TRAIN_TIMESTEPS, linear_start: float = LINEAR_START, linear_end: float = LINEAR_END
) -> np.ndarray:
    """Stable Diffusion's "scaled linear" betas, ``linspace(sqrt(start), sqrt(end), n)**2``.

    Returns:
        float64 array of shape (num_timesteps,).
    """
    if num_timesteps < 1:
        raise InvalidInputError(f"num_timesteps must be >= 1, got {num_timesteps}")
    # torch.linspace (not numpy) in float64: that is what the base schedule was built with.
    root = torch.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=torch.float64)
    return (root**2).numpy()


def space_timesteps(num_timesteps: int, section_counts: int | Sequence[int]) -> list[int]:
    """Original timesteps kept by the "improved diffusion" respacing, sorted ascending.

    The range ``[0, num_timesteps)`` is split into ``len(section_counts)`` equal sections (the first
    ``num_timesteps % len`` sections one step longer); section ``s`` keeps ``section_counts[s]`` evenly
    spaced steps, its first and last step included.  A single section of ``N`` steps over 1000 gives
    ``round(k * 999 / (N - 1))``: N=200 -> 0, 5, 10, ..., 994, 999; N=4 -> 0, 333, 666, 999.

    Args:
        num_timesteps: length of the base schedule (1000).
        section_counts: steps to keep, one count per section (an int means one section).

    Returns:
        the kept original timesteps, strictly increasing.
    """
    counts = [section_counts] if isinstance(section_counts, int) else list(section_counts)
    if not counts:
        raise InvalidInputError("section_counts must not be empty")
    size_per, extra = divmod(num_timesteps, len(counts))
    kept: set[int] = set()
    start = 0
    for s, count in enumerate(counts):
        size = size_per + (1 if s < extra else 0)
        if not 1 <= count <= size:
            raise InvalidInputError(f"cannot keep {count} steps out of a section of {size} timesteps")
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        # Accumulated float position + Python's round(), as the reference respacing does (not k*stride).
        pos = 0.0
        for _ in range(count):
            kept.add(start + round(pos))
            pos += stride
        start += size
    return sorted(kept)


def respace_betas(alphas_cumprod: np.ndarray, use_timesteps: Sequence[int]) -> np.ndarray:
    """Betas of the respaced chain: ``1 - abar[t_k] / abar[t_{k-1}]`` (``abar[t_{-1}] = 1``).

    Args:
        alphas_cumprod: the base cumulative products, as stored (float32).
        use_timesteps: kept original timesteps.

    Returns:
        array of shape (len(use_timesteps),) in the dtype of ``alphas_cumprod``.
    """
    keep = set(int(t) for t in use_timesteps)
    acp = np.asarray(alphas_cumprod)
    one = acp.dtype.type(1.0)
    last = one
    betas: list[np.generic] = []
    for t, a in enumerate(acp):
        if t in keep:
            betas.append(one - a / last)
            last = a
    return np.array(betas, dtype=acp.dtype)


@dataclass(frozen=True)
class DDPMSchedule:
    """Buffers of a (possibly respaced) DDPM chain, all float32 tensors of shape (N,) on the CPU.

    Index ``i`` is the respaced step (0 = least noisy); ``timesteps[i]`` is the original 0..999
    timestep that the denoiser receives at that step.
    """

    betas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    log_one_minus_alphas_cumprod: Tensor
    sqrt_recip_alphas_cumprod: Tensor
    sqrt_recipm1_alphas_cumprod: Tensor
    posterior_variance: Tensor
    posterior_log_variance_clipped: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor
    #: int64 (N,): original timestep of each respaced index (``ori_timesteps``).
    timesteps: Tensor

    @property
    def num_steps(self) -> int:
        return int(self.betas.shape[0])

    @classmethod
    def from_betas(cls, betas: np.ndarray, timesteps: Sequence[int] | None = None) -> DDPMSchedule:
        """All buffers from a beta array, with the reference dtype promotions.

        Args:
            betas: (N,) float64 (base schedule) or float32 (respaced from float32 ``abar``).
            timesteps: original timestep of each index (default ``0..N-1``).
        """
        betas = np.asarray(betas)
        if betas.ndim != 1 or betas.size == 0:
            raise InvalidInputError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        alphas = 1.0 - betas
        acp = np.cumprod(alphas, axis=0)
        # np.append(1., float32 array) promotes to float64; the posterior terms inherit that.
        acp_prev = np.append(1.0, acp[:-1])
        post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
        if timesteps is None:
            timesteps = range(betas.shape[0])
        ts = torch.tensor(list(timesteps), dtype=torch.int64)
        if ts.shape[0] != betas.shape[0]:
            raise InvalidInputError(f"{ts.shape[0]} timesteps for {betas.shape[0]} betas")

        def f32(a: np.ndarray) -> Tensor:
            return torch.tensor(np.asarray(a), dtype=torch.float32)

        return cls(
            betas=f32(betas),
            alphas_cumprod=f32(acp),
            alphas_cumprod_prev=f32(acp_prev),
            sqrt_alphas_cumprod=f32(np.sqrt(acp)),
            sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - acp)),
            log_one_minus_alphas_cumprod=f32(np.log(1.0 - acp)),
            sqrt_recip_alphas_cumprod=f32(np.sqrt(1.0 / acp)),
            sqrt_recipm1_alphas_cumprod=f32(np.sqrt(1.0 / acp - 1)),
            posterior_variance=f32(post_var),
            posterior_log_variance_clipped=f32(np.log(np.maximum(post_var, _LOG_VARIANCE_FLOOR))),
            posterior_mean_coef1=f32(betas * np.sqrt(acp_prev) / (1.0 - acp)),
            posterior_mean_coef2=f32((1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp)),
            timesteps=ts,
        )

    def to(self, device: torch.device | str) -> DDPMSchedule:
        """A copy with every buffer on ``device`` (dtypes unchanged)."""
        return DDPMSchedule(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def make_schedule(
    num_steps: int | None = None,
    num_timesteps: int = NUM_TRAIN_TIMESTEPS,
    linear_start: float = LINEAR_START,
    linear_end: float = LINEAR_END,
) -> DDPMSchedule:
    """The base scaled-linear schedule, or its respacing to ``num_steps`` steps.

    ``num_steps=None`` returns the training schedule (float64 math, float32 buffers), used for
    ``q_sample``.  Any ``num_steps`` (including ``num_timesteps`` itself) goes through the respacing
    path as StableSR's sampling script does, so its betas are the float32 ratios of the stored
    ``abar`` buffer.

    Args:
        num_steps: respaced step count, 1 <= num_steps <= num_timesteps, or None.
        num_timesteps: base schedule length (1000).
        linear_start: first beta (0.00085).
        linear_end: last beta (0.012).
    """
    base = DDPMSchedule.from_betas(scaled_linear_betas(num_timesteps, linear_start, linear_end))
    if num_steps is None:
        return base
    if not 1 <= num_steps <= num_timesteps:
        raise InvalidInputError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
    use = space_timesteps(num_timesteps, [num_steps])
    betas = respace_betas(base.alphas_cumprod.numpy(), use)
    return DDPMSchedule.from_betas(betas, use)


def extract(table: Tensor, index: Tensor, x: Tensor) -> Tensor:
    """``table[index]`` shaped for broadcasting against ``x``.

    Args:
        table: (N,) buffer.
        index: (B,) int64 indices (B == 1 broadcasts over the batch).
        x: (B, ...) tensor whose shape and device the result follows.

    Returns:
        (B, 1, ..., 1) tensor in ``table``'s dtype on ``x``'s device.
    """
    out = table.to(x.device)[index.to(x.device).long()]
    return out.reshape(out.shape[0], *([1] * (x.ndim - 1)))


def _as_index(t: Tensor | int, x: Tensor) -> Tensor:
    if isinstance(t, int):
        return torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)
    return t.reshape(-1)


def q_sample(x0: Tensor, t: Tensor | int, noise: Tensor, schedule: DDPMSchedule | None = None) -> Tensor:
    """Forward diffusion ``x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise``.

    StableSR's tiled script starts from ``q_sample(z_lr, 999)`` on the 1000-step table
    (``0.068265 * z_lr + 0.99767 * noise``).

    Args:
        x0: (B, C, H, W) clean latent.
        t: int or (B,) index into ``schedule`` (original timestep for the default 1000-step table).
        noise: standard normal noise shaped like ``x0``.
        schedule: table to use (default: the 1000-step training schedule).
    """
    sched = _base_schedule() if schedule is None else schedule
    idx = _as_index(t, x0)
    return extract(sched.sqrt_alphas_cumprod, idx, x0) * x0 + extract(sched.sqrt_one_minus_alphas_cumprod, idx, x0) * noise


_BASE: DDPMSchedule | None = None


def _base_schedule() -> DDPMSchedule:
    global _BASE
    if _BASE is None:
        _BASE = make_schedule(None)
    return _BASE


def predict_x0_from_eps(schedule: DDPMSchedule, x_t: Tensor, i: Tensor | int, eps: Tensor) -> Tensor:
    """``x0 = sqrt(1/abar_i) * x_t - sqrt(1/abar_i - 1) * eps`` (``i``: respaced index, int or (B,))."""
    idx = _as_index(i, x_t)
    return extract(schedule.sqrt_recip_alphas_cumprod, idx, x_t) * x_t - extract(
        schedule.sqrt_recipm1_alphas_cumprod, idx, x_t
    ) * eps


def predict_x0_from_v(schedule: DDPMSchedule, x_t: Tensor, i: Tensor | int, v: Tensor) -> Tensor:
    """``x0 = sqrt(abar_i) * x_t - sqrt(1 - abar_i) * v`` for v-prediction models (SD 2.x 768-v)."""
    idx = _as_index(i, x_t)
    return extract(schedule.sqrt_alphas_cumprod, idx, x_t) * x_t - extract(
        schedule.sqrt_one_minus_alphas_cumprod, idx, x_t
    ) * v


def q_posterior(schedule: DDPMSchedule, x0: Tensor, x_t: Tensor, i: Tensor | int) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, variance and clipped log-variance of ``q(x_{i-1} | x_i, x0)``.

    Returns:
        ``(mean, variance, log_variance_clipped)``: mean shaped like ``x_t``; the other two (B, 1, 1, 1).
    """
    idx = _as_index(i, x_t)
    mean = extract(schedule.posterior_mean_coef1, idx, x_t) * x0 + extract(schedule.posterior_mean_coef2, idx, x_t) * x_t
    return (
        mean,
        extract(schedule.posterior_variance, idx, x_t),
        extract(schedule.posterior_log_variance_clipped, idx, x_t),
    )
