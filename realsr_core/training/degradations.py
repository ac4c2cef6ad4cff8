"""Synthetic degradations that turn an HR photo into the LR input of a training pair or a benchmark.

Pipelines (all registered in :data:`DEGRADATIONS`):

* ``classical_iso`` / ``classical_aniso``: the CRL-SR degradation model, Eq. (1) of the paper,
  ``I_l = (I_h ⊗ k)↓s + n``, with 21x21 Gaussian kernels and additive white Gaussian noise; the
  parameter ranges of its Section 4.1 (isotropic: width in [0.2, 4], noise level in [0, 75];
  anisotropic: θ ~ U(0, π), λ1, λ2 ~ U(0.2, 4), noise level in [0, 25]).
* ``spatially_variant``: Section 4.3 / Table 1: kernel width and noise level grow linearly from the
  left edge (0.2, 5) to the right edge (4, 50) of the image.
* ``bsrgan`` / ``bsrgan_plus``: BSRGAN's randomly shuffled degradation model and its extension
  (Zhang et al., ICCV 2021), per image.
* ``realesrgan``: Real-ESRGAN's second-order model (Wang et al., ICCVW 2021), batched.
* ``bicubic``: the plain antialiased bicubic downscale, 8-bit (the "bicubic" SR setting), deterministic.
* ``camera``: our model of the real camera pairs LWay is evaluated on (RealSR / DRealSR: the same scene shot
  at two focal lengths): lens defocus (a disk) and a small Gaussian PSF, sensor area integration, weak
  signal-dependent sensor noise and a high-quality JPEG, batched.  Unlike the three synthetic families
  above it has little noise, as real photos from a camera usually do.

Conventions shared by every function here:

* Images are ``(B, C, H, W)`` floating tensors in [0, 1] (RGB for BSRGAN / Real-ESRGAN), ``H`` and
  ``W`` multiples of ``scale``.  The LR result is ``(B, C, H // scale, W // scale)`` in [0, 1], on the
  input's device and in its dtype (the work itself is done in float32).
* Every random draw comes from the ``generator`` argument and is made on the generator's device, then
  moved to the image: the same seed gives the same LR on any device, also for a CUDA image with a CPU
  generator.
* Noise levels are in 0..255 units (level / 255 on [0, 1] images), as in the papers.
* Kernels are ``(B, k, k)`` with odd ``k``, centred on the middle tap, and are applied by
  cross-correlation with reflect borders (BSRGAN's ``mirror`` and Real-ESRGAN's ``reflect`` padding).
  Kernel coordinates are ``(x, y) = (column, row)`` offsets from the centre; an angle θ turns the
  first principal axis from +x towards +y (i.e. clockwise on screen, rows growing downwards).

Downsampling of the classical model: bicubic, as the paper says ("We adopt bicubic down-sampler ... as in
[9, 22, 38, 57, 59]").  We use ``F.interpolate(mode="bicubic", antialias=True)``: Keys' cubic with
a = -0.5 whose support is widened by the scale factor, which is MATLAB's ``imresize`` (the resizer of
IKC/DASR/SRMD) everywhere except at the outermost pixels, where torch renormalises the truncated
weights instead of mirroring the image.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from typing import Any

import kornia.filters
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..errors import InvalidInputError

__all__ = [
    "DEGRADATIONS",
    "DegradationFn",
    "anisotropic_kernel",
    "bicubic_downscale",
    "bsrgan",
    "bsrgan_plus",
    "camera",
    "camera_optics",
    "classical",
    "disk_kernel",
    "isotropic_kernel",
    "jpeg_compress",
    "random_classical_aniso",
    "random_classical_iso",
    "realesrgan",
    "sample_classical_aniso_params",
    "sample_classical_iso_params",
    "spatially_variant",
    "usm_sharpen",
]

DegradationFn = Callable[[Tensor, int, torch.Generator], Tensor]

# CRL-SR Section 4.1 (the ranges of DASR [35]).
KERNEL_SIZE: int = 21
ISO_SIGMA_RANGE: tuple[float, float] = (0.2, 4.0)
ISO_NOISE_RANGE: tuple[float, float] = (0.0, 75.0)
ANISO_THETA_RANGE: tuple[float, float] = (0.0, math.pi)
ANISO_LAMBDA_RANGE: tuple[float, float] = (0.2, 4.0)
ANISO_NOISE_RANGE: tuple[float, float] = (0.0, 25.0)
# CRL-SR Section 4.3 / Table 1.
SV_SIGMA_RANGE: tuple[float, float] = (0.2, 4.0)
SV_NOISE_RANGE: tuple[float, float] = (5.0, 50.0)
# Our camera model (see :func:`camera`): HR-pixel radii / widths, 0..255 noise levels, JPEG qualities.
CAMERA_DISK_RADIUS_RANGE: tuple[float, float] = (0.5, 3.0)
CAMERA_PSF_SIGMA_RANGE: tuple[float, float] = (0.3, 1.0)
CAMERA_READ_NOISE_RANGE: tuple[float, float] = (0.5, 2.0)
CAMERA_SHOT_NOISE_RANGE: tuple[float, float] = (0.5, 3.0)
CAMERA_JPEG_RANGE: tuple[int, int] = (85, 95)

# cv2.resize interpolations BSRGAN draws from ({INTER_LINEAR, INTER_CUBIC, INTER_AREA}) as interpolate
# modes: torch's bilinear / bicubic (a = -0.75, half-pixel centres, no antialias) are cv2's; torch's
# area is exact for integer factors and uses integer bins otherwise (cv2 weights fractional pixels).
_CV2_MODES: tuple[str, ...] = ("bilinear", "bicubic", "area")
# Real-ESRGAN's resize modes, drawn uniformly.
_RESR_MODES: tuple[str, ...] = ("area", "bilinear", "bicubic")
# ITU-R BT.601 luma, used by both BSRGAN and Real-ESRGAN for their gray noise.
_LUMA: tuple[float, float, float] = (0.299, 0.587, 0.114)


# --------------------------------------------------------------------------------------------------
# checks and random draws


def _check_hr(hr: Tensor, scale: int, *, rgb: bool = False) -> None:
    if not isinstance(hr, Tensor) or hr.ndim != 4 or not hr.is_floating_point():
        raise InvalidInputError(f"hr must be a floating (B, C, H, W) tensor, got {getattr(hr, 'shape', type(hr))}")
    if not isinstance(scale, int) or scale < 1:
        raise InvalidInputError(f"scale must be a positive int, got {scale!r}")
    b, c, h, w = hr.shape
    if b == 0 or h < scale or w < scale:
        raise InvalidInputError(f"hr must hold at least one image of at least scale x scale pixels, got {tuple(hr.shape)}")
    if h % scale or w % scale:
        raise InvalidInputError(f"hr height and width must be multiples of scale {scale}, got {h}x{w}; crop first")
    if rgb and c != 3:
        raise InvalidInputError(f"this degradation needs RGB images (3 channels), got {c}")


def _rand(g: torch.Generator, *shape: int) -> Tensor:
    """U(0, 1) float32 of ``shape`` on the generator's device."""
    return torch.rand(shape, generator=g, device=g.device)


def _randn(shape: Sequence[int], g: torch.Generator | None, device: torch.device) -> Tensor:
    """N(0, 1) float32 drawn on the generator's device (global RNG without one), returned on ``device``."""
    if g is None:
        return torch.randn(tuple(shape), device=device)
    return torch.randn(tuple(shape), generator=g, device=g.device).to(device)


def _u(g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(_rand(g, 1).item())


def _uniform(g: torch.Generator, lo: float, hi: float, n: int) -> Tensor:
    """``n`` draws of U(lo, hi), float64 on the CPU (parameters, not pixels)."""
    return lo + (hi - lo) * _rand(g, n).double().cpu()


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Integer in [lo, hi], both inclusive (Python's ``random.randint``, which the originals use)."""
    return int(torch.randint(lo, hi + 1, (1,), generator=g, device=g.device).item())


def _pick(g: torch.Generator, probs: Sequence[float]) -> int:
    """Index drawn with the given probabilities."""
    u, acc = _u(g), 0.0
    for i, p in enumerate(probs):
        acc += p
        if u < acc:
            return i
    return len(probs) - 1


def _perm(g: torch.Generator, n: int) -> list[int]:
    return [int(i) for i in torch.randperm(n, generator=g, device=g.device).tolist()]


def _poisson(rate: Tensor, g: torch.Generator) -> Tensor:
    """Poisson draws with the generator (torch.poisson takes one, on the generator's device)."""
    return torch.poisson(rate.to(g.device), generator=g).to(rate.device)


def _as_batch(value: float | Tensor, b: int, name: str) -> Tensor:
    """A scalar or (B,) parameter as a float64 CPU (B,) tensor."""
    t = torch.as_tensor(value, dtype=torch.float64).detach().cpu().flatten()
    if t.numel() == 1:
        return t.expand(b).clone()
    if t.numel() != b:
        raise InvalidInputError(f"{name} must be a scalar or hold one value per image ({b}), got {t.numel()}")
    return t


# --------------------------------------------------------------------------------------------------
# kernels


def _offsets(size: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """(x, y) offsets of every tap from the kernel centre, each (size, size)."""
    ax = torch.arange(size, dtype=dtype) - (size - 1) / 2
    y, x = torch.meshgrid(ax, ax, indexing="ij")
    return x, y


def _mahalanobis(size: int, sigma_x: Tensor, sigma_y: Tensor, theta: Tensor,
                 shift: float = 0.0) -> Tensor:
    """dᵀ Σ⁻¹ d on the tap grid, (B, size, size), for Σ = R(θ) diag(σx², σy²) R(θ)ᵀ.

    Projecting the offsets on the principal axes gives Σ⁻¹ without inverting a (near-)singular matrix;
    ``shift`` moves the centre by (+shift, +shift) taps.
    """
    x, y = _offsets(size)
    x, y = x - shift, y - shift
    c, s = theta.cos()[:, None, None], theta.sin()[:, None, None]
    u = c * x + s * y       # along the first principal axis (cos θ, sin θ)
    v = -s * x + c * y      # along the second
    sx = sigma_x.clamp_min(1e-6)[:, None, None]
    sy = sigma_y.clamp_min(1e-6)[:, None, None]
    return (u / sx) ** 2 + (v / sy) ** 2


def _normalise(k: Tensor) -> Tensor:
    return (k / k.sum(dim=(-2, -1), keepdim=True)).float()


def isotropic_kernel(sigma: float | Tensor, size: int = KERNEL_SIZE) -> Tensor:
    """Isotropic Gaussian blur kernels.

    Args:
        sigma: kernel width(s) in pixels, a float or a (B,) tensor, > 0.
        size: odd kernel size.

    Returns:
        (B, size, size) float32 kernels (on ``sigma``'s device, CPU for a float), each summing to 1 and
        symmetric about its centre.
    """
    s = _as_batch(sigma, torch.as_tensor(sigma).numel(), "sigma")
    k = _normalise(torch.exp(-0.5 * _mahalanobis(size, s, s, torch.zeros_like(s))))
    return k.to(sigma.device) if isinstance(sigma, Tensor) else k


def anisotropic_kernel(theta: float | Tensor, lambda1: float | Tensor, lambda2: float | Tensor,
                       size: int = KERNEL_SIZE) -> Tensor:
    """Anisotropic Gaussian blur kernels N(0, Σ), Σ = R(θ) diag(λ1², λ2²) R(θ)ᵀ.

    As in DASR [35], whose sampler CRL-SR adopts, λ1 and λ2 are the kernel widths (standard deviations)
    along the principal axes, so the eigenvalues of Σ are λ1² and λ2² and λ1 = λ2 = σ is the isotropic
    kernel of width σ.  θ turns the λ1 axis from +x (columns) towards +y (rows).

    Args:
        theta: rotation(s) in radians, float or (B,).
        lambda1: width(s) along the first principal axis, float or (B,), > 0.
        lambda2: width(s) along the second principal axis, float or (B,), > 0.
        size: odd kernel size.

    Returns:
        (B, size, size) float32 kernels (on ``theta``'s device, CPU for a float), each summing to 1.
    """
    b = max(torch.as_tensor(v).numel() for v in (theta, lambda1, lambda2))
    t, l1, l2 = (_as_batch(v, b, n) for v, n in ((theta, "theta"), (lambda1, "lambda1"), (lambda2, "lambda2")))
    k = _normalise(torch.exp(-0.5 * _mahalanobis(size, l1, l2, t)))
    return k.to(theta.device) if isinstance(theta, Tensor) else k


def _gaussian_1d(sigma: Tensor, size: int) -> Tensor:
    """(B, size) normalised 1-D Gaussians; their outer products are :func:`isotropic_kernel`."""
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    k = torch.exp(-0.5 * (ax[None] / sigma.double().clamp_min(1e-6)[:, None]) ** 2)
    return (k / k.sum(-1, keepdim=True)).float()


def _border(x: Tensor, k: int) -> str:
    # reflect padding needs every side longer than the pad; tiny intermediates fall back to replicate.
    return "reflect" if min(x.shape[-2:]) > k // 2 else "replicate"


def _filter(x: Tensor, kernel: Tensor) -> Tensor:
    """Per-sample 2-D cross-correlation, reflect border. kernel: (1 or B, k, k)."""
    return kornia.filters.filter2d(x, kernel.to(x.device, x.dtype), border_type=_border(x, kernel.shape[-1]))


def _filter_sep(x: Tensor, k1d: Tensor) -> Tensor:
    """Per-sample separable filtering with the same 1-D kernel (1 or B, k) along both axes."""
    k1d = k1d.to(x.device, x.dtype)
    return kornia.filters.filter2d_separable(x, k1d, k1d, border_type=_border(x, k1d.shape[-1]))


# --------------------------------------------------------------------------------------------------
# resizing, noise, JPEG, sharpening


def _resize(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    size = (max(1, int(size[0])), max(1, int(size[1])))
    if tuple(x.shape[-2:]) == size:
        return x
    if mode == "area":
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


def bicubic_downscale(x: Tensor, scale: int) -> Tensor:
    """Antialiased bicubic downscale by an integer factor (MATLAB ``imresize``-like, see module doc).

    Args:
        x: (B, C, H, W) float, H and W multiples of ``scale``.
        scale: integer factor >= 1.

    Returns:
        (B, C, H // scale, W // scale), not clamped (bicubic overshoots slightly at edges).
    """
    h, w = x.shape[-2:]
    if scale == 1:
        return x
    return F.interpolate(x, size=(h // scale, w // scale), mode="bicubic", align_corners=False, antialias=True)


def jpeg_compress(x: Tensor, quality: int | Sequence[int] | Tensor) -> Tensor:
    """Baseline JPEG round trip with Pillow (libjpeg, 4:2:0 chroma subsampling like cv2.imencode).

    Args:
        x: (B, 3, H, W) float RGB in [0, 1] (clamped, then rounded to 8 bit before encoding).
        quality: JPEG quality in [1, 100], one for all or one per image.

    Returns:
        (B, 3, H, W) decoded images in [0, 1] (multiples of 1/255), on ``x``'s device and dtype.
    """
    q = [int(round(float(v))) for v in torch.as_tensor(quality).flatten().tolist()]
    if len(q) == 1:
        q = q * x.shape[0]
    if len(q) != x.shape[0]:
        raise InvalidInputError(f"quality must be one value or one per image ({x.shape[0]}), got {len(q)}")
    arr = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for img, qi in zip(arr, q, strict=True):
        buf = io.BytesIO()
        Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=qi, subsampling=2)
        buf.seek(0)
        out.append(np.asarray(Image.open(buf).convert("RGB")))
    y = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255.0
    return y.to(x.device, x.dtype)


def usm_sharpen(x: Tensor, weight: float = 0.5, radius: int = 50, threshold: float = 10.0) -> Tensor:
    """Unsharp masking as BSRGAN-plus and Real-ESRGAN apply it to the HR image before degrading it.

    ``sharp = clamp(x + weight·(x - G*x))`` blended with ``x`` by a blurred mask of the pixels whose
    residual exceeds ``threshold`` (in 0..255), so flat regions are not sharpened (noise is not boosted).
    ``G`` is a Gaussian of ``radius`` (made odd, 50 -> 51 taps) with OpenCV's default width for that size,
    ``0.3·((k-1)/2 - 1) + 0.8`` (= 8 for 51 taps).

    Args:
        x: (B, C, H, W) float in [0, 1].

    Returns:
        (B, C, H, W) in [0, 1].
    """
    k = radius + 1 if radius % 2 == 0 else radius
    g1 = _gaussian_1d(torch.tensor([0.3 * ((k - 1) * 0.5 - 1) + 0.8]), k)
    blur = _filter_sep(x, g1)
    residual = x - blur
    mask = (residual.abs() * 255 > threshold).to(x.dtype)
    soft = _filter_sep(mask, g1)
    sharp = (x + weight * residual).clamp(0, 1)
    return soft * sharp + (1 - soft) * x


def _luma(x: Tensor) -> Tensor:
    w = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


# --------------------------------------------------------------------------------------------------
# CRL-SR classical model, Eq. (1)


def classical(hr: Tensor, scale: int, *, sigma: float | Tensor | None = None, noise: float | Tensor = 0.0,
              generator: torch.Generator | None = None, kernel: Tensor | None = None,
              quantize: bool = False) -> Tensor:
    """CRL-SR Eq. (1): ``I_l = (I_h ⊗ k)↓s + n`` with fixed (per-image) parameters.

    Blur with a Gaussian kernel (reflect border), bicubic downscale (antialiased, see the module doc),
    add white Gaussian noise of std ``noise / 255``, clamp to [0, 1].

    Args:
        hr: (B, C, H, W) float in [0, 1], H and W multiples of ``scale``.
        scale: downscale factor.
        sigma: isotropic kernel width (21x21 kernel), a float or (B,); ignored when ``kernel`` is given.
        noise: noise level in 0..255 units, a float or (B,).
        generator: source of the noise (the global RNG when None).
        kernel: explicit normalised blur kernel(s), (k, k) or (1 or B, k, k) with odd k.
        quantize: round the LR to 8 bit (as a saved PNG would be).

    Returns:
        (B, C, H // scale, W // scale) float in [0, 1] on ``hr``'s device and dtype.
    """
    _check_hr(hr, scale)
    b = hr.shape[0]
    x = hr.float()
    if kernel is not None:
        k = kernel if kernel.ndim == 3 else kernel[None]
        if k.shape[0] not in (1, b) or k.shape[-1] != k.shape[-2] or k.shape[-1] % 2 == 0:
            raise InvalidInputError(f"kernel must be (k, k) or (1 or B, k, k) with odd k, got {tuple(kernel.shape)}")
        x = _filter(x, k)
    elif sigma is not None:
        # an isotropic Gaussian is separable: two 21-tap passes instead of one 441-tap pass.
        x = _filter_sep(x, _gaussian_1d(_as_batch(sigma, b, "sigma"), KERNEL_SIZE))
    else:
        raise InvalidInputError("classical needs sigma or kernel")
    lr = bicubic_downscale(x, scale)
    level = _as_batch(noise, b, "noise")
    if bool((level != 0).any()):
        n = _randn(lr.shape, generator, lr.device)
        lr = lr + n * (level / 255.0).float().to(lr.device).view(b, 1, 1, 1)
    lr = lr.clamp(0, 1)
    if quantize:
        lr = (lr * 255).round() / 255
    return lr.to(hr.dtype)


def sample_classical_iso_params(n: int, generator: torch.Generator) -> dict[str, Tensor]:
    """CRL-SR 4.1 isotropic setting: ``sigma`` ~ U(0.2, 4.0), ``noise`` ~ U(0, 75); (n,) float64 each."""
    return {"sigma": _uniform(generator, *ISO_SIGMA_RANGE, n), "noise": _uniform(generator, *ISO_NOISE_RANGE, n)}


def sample_classical_aniso_params(n: int, generator: torch.Generator) -> dict[str, Tensor]:
    """CRL-SR 4.1 anisotropic setting: ``theta`` ~ U(0, π), ``lambda1``, ``lambda2`` ~ U(0.2, 4),
    ``noise`` ~ U(0, 25); (n,) float64 each."""
    return {
        "theta": _uniform(generator, *ANISO_THETA_RANGE, n),
        "lambda1": _uniform(generator, *ANISO_LAMBDA_RANGE, n),
        "lambda2": _uniform(generator, *ANISO_LAMBDA_RANGE, n),
        "noise": _uniform(generator, *ANISO_NOISE_RANGE, n),
    }


def random_classical_iso(hr: Tensor, scale: int, generator: torch.Generator, *,
                         return_params: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Eq. (1) with a random isotropic kernel and noise level per image (CRL-SR 4.1).

    Args:
        hr: (B, C, H, W) float in [0, 1]. scale: factor. generator: all randomness.
        return_params: also return ``{"sigma": (B,), "noise": (B,)}``.

    Returns:
        LR (B, C, H // scale, W // scale) in [0, 1] (and the parameters).
    """
    p = sample_classical_iso_params(hr.shape[0], generator)
    lr = classical(hr, scale, sigma=p["sigma"], noise=p["noise"], generator=generator)
    return (lr, p) if return_params else lr


def random_classical_aniso(hr: Tensor, scale: int, generator: torch.Generator, *,
                           return_params: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Eq. (1) with a random anisotropic 21x21 kernel and noise level per image (CRL-SR 4.1).

    Args:
        hr: (B, C, H, W) float in [0, 1]. scale: factor. generator: all randomness.
        return_params: also return ``{"theta", "lambda1", "lambda2", "noise"}``, (B,) each.

    Returns:
        LR (B, C, H // scale, W // scale) in [0, 1] (and the parameters).
    """
    p = sample_classical_aniso_params(hr.shape[0], generator)
    k = anisotropic_kernel(p["theta"], p["lambda1"], p["lambda2"], KERNEL_SIZE)
    lr = classical(hr, scale, kernel=k, noise=p["noise"], generator=generator)
    return (lr, p) if return_params else lr


def spatially_variant(hr: Tensor, scale: int, *, sigma_range: tuple[float, float] = SV_SIGMA_RANGE,
                      noise_range: tuple[float, float] = SV_NOISE_RANGE,
                      generator: torch.Generator | None = None, levels: int = 16,
                      return_params: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Spatially variant Eq. (1) (CRL-SR 4.3 / Table 1): blur width and noise level grow left to right.

    At horizontal position ``u = (x + 0.5) / W`` of a pixel centre (the same ``u`` for an LR column and
    the HR block under it) the kernel width is ``lo + (hi - lo)·u`` and the noise level likewise.
    Blurring every column with its own kernel is done with a bank of ``levels`` isotropic 21x21
    Gaussians at evenly spaced widths: since blurring is linear in the kernel, linearly interpolating
    the two neighbouring blurred images per column equals blurring with the interpolated kernel, and
    each bank level is only computed on the strip of columns (plus the kernel halo) where its weight is
    non-zero, so the whole bank costs a few ordinary blurs.  The interpolated kernel of a column matches
    the Gaussian of that column's width to a few 1e-4 on the LR (see the tests).

    Args:
        hr: (B, C, H, W) float in [0, 1], H and W multiples of ``scale``.
        scale: downscale factor.
        sigma_range: kernel width at the left and right edge.
        noise_range: noise level (0..255 units) at the left and right edge.
        generator: source of the noise (the global RNG when None).
        levels: number of kernel widths in the bank (>= 2).
        return_params: also return ``{"sigma": (W,) per HR column, "noise": (W // scale,) per LR column}``.

    Returns:
        LR (B, C, H // scale, W // scale) in [0, 1] (and the parameters).
    """
    _check_hr(hr, scale)
    if levels < 2:
        raise InvalidInputError(f"levels must be >= 2, got {levels}")
    x = hr.float()
    w = x.shape[-1]
    lo, hi = sigma_range
    u_hr = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    sigma_col = lo + (hi - lo) * u_hr
    bank = torch.linspace(lo, hi, levels, dtype=torch.float64)
    pos = (u_hr * (levels - 1)).clamp(0, levels - 1)
    i0 = pos.floor().long().clamp(max=levels - 2)
    frac = pos - i0
    pad = KERNEL_SIZE // 2
    border = "reflect" if min(x.shape[-2:]) > pad else "replicate"
    xp = F.pad(x, (pad, pad, pad, pad), mode=border)
    out = torch.zeros_like(x)
    k1d = _gaussian_1d(bank, KERNEL_SIZE).to(x.device)
    weights = [torch.where(i0 == k, 1 - frac, torch.where(i0 + 1 == k, frac, torch.zeros_like(frac)))
               for k in range(levels)]
    spans = [torch.nonzero(wk > 0).flatten() for wk in weights]
    # one strip width for every level (extra columns carry weight 0): one conv shape, one CPU kernel setup
    width = max(int(c[-1]) + 1 - int(c[0]) for c in spans if c.numel())
    for k, (wk, cols) in enumerate(zip(weights, spans, strict=True)):
        if cols.numel() == 0:
            continue
        c0 = min(int(cols[0]), w - width)
        c1 = c0 + width
        strip = xp[..., c0:c1 + 2 * pad]
        blurred = kornia.filters.filter2d_separable(strip, k1d[k:k + 1], k1d[k:k + 1], padding="valid")
        out[..., c0:c1] += blurred * wk[c0:c1].to(x.device, x.dtype)
    lr = bicubic_downscale(out, scale)
    lw = lr.shape[-1]
    u_lr = (torch.arange(lw, dtype=torch.float64) + 0.5) / lw
    noise_col = noise_range[0] + (noise_range[1] - noise_range[0]) * u_lr
    lr = lr + _randn(lr.shape, generator, lr.device) * (noise_col / 255.0).float().to(lr.device)
    lr = lr.clamp(0, 1).to(hr.dtype)
    return (lr, {"sigma": sigma_col, "noise": noise_col}) if return_params else lr


def _spatially_variant_fn(hr: Tensor, scale: int, generator: torch.Generator) -> Tensor:
    return spatially_variant(hr, scale, generator=generator)


# --------------------------------------------------------------------------------------------------
# BSRGAN (per image: every image has its own op order and intermediate size)


def _bsr_blur(x: Tensor, sf: int, g: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
    """BSRGAN ``add_blur``: 50 % anisotropic Gaussian, 50 % isotropic, odd size 7..25."""
    wd2, wd = 4.0 + sf, 2.0 + 0.2 * sf
    if _u(g) < 0.5:
        size = 2 * _randint(g, 2, 11) + 3
        theta, l1, l2 = _u(g, 0.0, math.pi), _u(g, 0.0, wd2), _u(g, 0.0, wd2)
        # BSRGAN's l1, l2 are the eigenvalues of Σ (variances), hence the square roots.
        t = torch.tensor([theta], dtype=torch.float64)
        k = _normalise(torch.exp(-0.5 * _mahalanobis(size, torch.tensor([l1]).double().sqrt(),
                                                     torch.tensor([l2]).double().sqrt(), t)))
        rec: dict[str, Any] = {"op": "blur", "kind": "aniso", "size": size, "theta": theta, "l1": l1, "l2": l2}
    else:
        size = 2 * _randint(g, 2, 11) + 3
        sigma = wd * _u(g)
        k = isotropic_kernel(torch.tensor([max(sigma, 1e-3)]), size)
        rec = {"op": "blur", "kind": "iso", "size": size, "sigma": sigma}
    return _filter(x, k), rec


def _bsr_resize_random(x: Tensor, size: tuple[int, int], g: torch.Generator) -> tuple[Tensor, str]:
    mode = _CV2_MODES[_randint(g, 0, 2)]
    return _resize(x, size, mode), mode


def _bsr_noise_field(shape: tuple[int, int], level: int, g: torch.Generator,
                     device: torch.device) -> tuple[Tensor, str]:
    """The three noise fields of BSRGAN's Gaussian / speckle noise, (1, 3, h, w)."""
    h, w = shape
    r = _u(g)
    if r > 0.6:      # p = 0.4: independent per channel
        return _randn((1, 3, h, w), g, device) * (level / 255.0), "color"
    if r < 0.4:      # p = 0.4: the same noise on the three channels
        return _randn((1, 1, h, w), g, device).expand(1, 3, h, w) * (level / 255.0), "gray"
    # p = 0.2: channel-correlated noise N(0, |L²·UᵀDU|), U a random orthonormal basis, D = diag(U(0,1)³).
    # As in the original, L is the top of the level range (25 / 255), not the drawn level.
    big_l = 25.0 / 255.0
    d = torch.diag(_rand(g, 3).double().cpu())
    u = torch.linalg.svd(_rand(g, 3, 3).double().cpu())[0]
    cov = (big_l ** 2 * (u.T @ d @ u)).abs()
    # |·| can leave the matrix slightly indefinite; like numpy's SVD-based sampler, use |eigenvalues|.
    evals, evecs = torch.linalg.eigh(cov)
    factor = (evecs * evals.abs().sqrt()).float()
    z = _randn((h * w, 3), g, device)
    n = (z @ factor.T.to(device)).T.reshape(1, 3, h, w)
    return n, "correlated"


def _bsr_gaussian_noise(x: Tensor, g: torch.Generator, lo: int = 2, hi: int = 25) -> tuple[Tensor, dict[str, Any]]:
    level = _randint(g, lo, hi)
    n, mode = _bsr_noise_field(tuple(x.shape[-2:]), level, g, x.device)
    return (x + n).clamp(0, 1), {"op": "gaussian_noise", "level": level, "mode": mode}


def _bsr_speckle_noise(x: Tensor, g: torch.Generator, lo: int = 2, hi: int = 25) -> tuple[Tensor, dict[str, Any]]:
    level = _randint(g, lo, hi)
    x = x.clamp(0, 1)
    n, mode = _bsr_noise_field(tuple(x.shape[-2:]), level, g, x.device)
    return (x + x * n).clamp(0, 1), {"op": "speckle_noise", "level": level, "mode": mode}


def _bsr_poisson_noise(x: Tensor, g: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
    x = (x.clamp(0, 1) * 255).round() / 255
    vals = 10 ** (2 * _u(g) + 2)
    if _u(g) < 0.5:
        x = _poisson(x * vals, g) / vals
        mode = "color"
    else:
        gray = (_luma(x).clamp(0, 1) * 255).round() / 255
        x = x + (_poisson(gray * vals, g) / vals - gray)
        mode = "gray"
    return x.clamp(0, 1), {"op": "poisson_noise", "vals": vals, "mode": mode}


def _bsr_jpeg(x: Tensor, g: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
    q = _randint(g, 30, 95)
    return jpeg_compress(x, q), {"op": "jpeg", "quality": q}


def _bsr_add_resize(x: Tensor, sf: int, g: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
    """BSRGAN-plus ``add_resize``: p 0.2 up U(1, 2), p 0.7 down U(0.5/sf, 1), p 0.1 keep."""
    r = _u(g)
    s = _u(g, 1.0, 2.0) if r > 0.8 else _u(g, 0.5 / sf, 1.0) if r < 0.7 else 1.0
    h, w = x.shape[-2:]
    x, mode = _bsr_resize_random(x, (int(s * h), int(s * w)), g)
    return x.clamp(0, 1), {"op": "resize", "factor": s, "mode": mode}


def _bsrgan_one(x: Tensor, sf: int, g: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
    """``degradation_bsrgan`` on one (1, 3, H, W) image; H, W multiples of sf."""
    h1, w1 = x.shape[-2:]
    ops: list[dict[str, Any]] = []
    if sf == 4 and _u(g) < 0.25:
        # downsample1 (scale2_prob): halve first, then degrade as for x2.
        if _u(g) < 0.5:
            x, mode = _bsr_resize_random(x, (h1 // 2, w1 // 2), g)
        else:
            x, mode = bicubic_downscale(x, 2), "bicubic_antialias"
        x = x.clamp(0, 1)
        ops.append({"op": "downsample1", "mode": mode})
        sf = 2
    order = _perm(g, 7)
    i2, i3 = order.index(2), order.index(3)
    if i2 > i3:  # downsample2 must precede downsample3
        order[i2], order[i3] = order[i3], order[i2]
    hb, wb = x.shape[-2:]
    for op in order:
        if op in (0, 1):
            x, rec = _bsr_blur(x, sf, g)
        elif op == 2:
            hb, wb = x.shape[-2:]
            if _u(g) < 0.75:
                sf1 = _u(g, 1.0, 2.0 * sf)
                x, mode = _bsr_resize_random(x, (int(hb / sf1), int(wb / sf1)), g)
                rec = {"op": "downsample2", "kind": "resize", "factor": sf1, "mode": mode}
            else:
                # Blur then keep every sf-th pixel.  BSRGAN shifts the kernel by (sf-1)/2 pixels with
                # SciPy's interp2d (removed in SciPy 1.14) so that LR pixel j samples HR around
                # sf·j + (sf-1)/2, the centre of its block; we build the Gaussian centred there instead.
                sigma = _u(g, 0.1, 0.6 * sf)
                s = torch.tensor([sigma], dtype=torch.float64)
                k = _normalise(torch.exp(-0.5 * _mahalanobis(25, s, s, torch.zeros(1, dtype=torch.float64),
                                                             shift=(sf - 1) / 2)))
                x = _filter(x, k)[..., 0::sf, 0::sf]
                rec = {"op": "downsample2", "kind": "shifted_blur", "sigma": sigma}
            x = x.clamp(0, 1)
        elif op == 3:
            x, mode = _bsr_resize_random(x, (hb // sf, wb // sf), g)
            x = x.clamp(0, 1)
            rec = {"op": "downsample3", "mode": mode}
        elif op == 4:
            x, rec = _bsr_gaussian_noise(x, g)
        elif op == 5:
            if _u(g) >= 0.9:
                continue
            x, rec = _bsr_jpeg(x, g)
        else:
            # op 6, camera ISP noise: needs a trained ISP model; the public BSRGAN code passes none and
            # skips it too.
            continue
        ops.append(rec)
    x, rec = _bsr_jpeg(x, g)
    ops.append(rec)
    return x, {"order": order, "ops": ops}


def _bsrgan_plus_one(x: Tensor, sf: int, g: torch.Generator, shuffle_prob: float,
                     use_sharp: bool) -> tuple[Tensor, dict[str, Any]]:
    """``degradation_bsrgan_plus`` on one (1, 3, H, W) image."""
    h1, w1 = x.shape[-2:]
    if use_sharp:
        x = usm_sharpen(x)
    if _u(g) < shuffle_prob:
        order = _perm(g, 13)
    else:
        order = list(range(13))
        order[2:6] = [order[2 + i] for i in _perm(g, 4)]
        order[9:13] = [order[9 + i] for i in _perm(g, 4)]
    ops: list[dict[str, Any]] = []
    for op in order:
        if op in (0, 7):
            x, rec = _bsr_blur(x, sf, g)
        elif op in (1, 8):
            x, rec = _bsr_add_resize(x, sf, g)
        elif op in (2, 9):
            x, rec = _bsr_gaussian_noise(x, g)
        elif op in (3, 10):
            if _u(g) >= 0.1:
                continue
            x, rec = _bsr_poisson_noise(x, g)
        elif op in (4, 11):
            if _u(g) >= 0.1:
                continue
            x, rec = _bsr_speckle_noise(x, g)
        elif op == 6:
            x, rec = _bsr_jpeg(x, g)
        else:
            # ops 5 and 12, camera ISP noise: needs a trained ISP model (none in the public code either).
            continue
        ops.append(rec)
    x, mode = _bsr_resize_random(x, (h1 // sf, w1 // sf), g)
    ops.append({"op": "final_resize", "mode": mode})
    x, rec = _bsr_jpeg(x.clamp(0, 1), g)
    ops.append(rec)
    return x, {"order": order, "ops": ops}


def disk_kernel(radius: float | Tensor, size: int = KERNEL_SIZE) -> Tensor:
    """Defocus (pill-box) kernels: the area of a disk of ``radius`` taps covering each tap, normalised.

    The coverage is antialiased (a tap at distance ``d`` from the centre gets ``clamp(radius + 0.5 - d, 0, 1)``),
    so the kernel changes smoothly with the radius; radius 0 is the identity.

    Args:
        radius: a float or (B,) radii in taps, ``<= size // 2``.
        size: odd kernel size.

    Returns:
        (B, size, size) float32 kernels summing to 1.
    """
    r = torch.as_tensor(radius, dtype=torch.float64).detach().cpu().flatten()
    if (r < 0).any() or (r > size // 2).any():
        raise InvalidInputError(f"disk radius must be in [0, {size // 2}], got {r.tolist()}")
    x, y = _offsets(size)
    d = (x.square() + y.square()).sqrt()
    return _normalise((r[:, None, None] + 0.5 - d[None]).clamp(0, 1))


def camera_optics(hr: Tensor, scale: int, radius: float | Tensor, psf_sigma: float | Tensor) -> Tensor:
    """The deterministic part of :func:`camera`: defocus disk, lens Gaussian, area downscale (no noise, no JPEG).

    Args:
        hr: (B, C, H, W) float in [0, 1], H and W multiples of ``scale``.
        scale: factor.
        radius, psf_sigma: a float or (B,) each, in HR pixels.

    Returns:
        (B, C, H // scale, W // scale) float32, not clamped.
    """
    _check_hr(hr, scale)
    b, _, h, w = hr.shape
    x = _filter(hr.float(), disk_kernel(_as_batch(radius, b, "radius")))
    x = _filter_sep(x, _gaussian_1d(_as_batch(psf_sigma, b, "psf_sigma"), KERNEL_SIZE))
    return _resize(x, (h // scale, w // scale), "area")


def camera(hr: Tensor, scale: int, generator: torch.Generator, *,
           return_params: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """A digital camera's degradation, modelled on the real LR / HR pairs of RealSR and DRealSR, batched.

    Per image: defocus blur (disk of radius ``CAMERA_DISK_RADIUS_RANGE`` HR px) and the lens PSF (Gaussian of
    width ``CAMERA_PSF_SIGMA_RANGE``); the sensor integrates each LR pixel over its ``scale x scale`` HR
    footprint (area downsampling); signal-dependent noise ``N(0, (shot^2 * x + read^2) / 255^2)`` per colour
    sample, with ``shot`` and ``read`` levels (0..255 units at x = 1) from ``CAMERA_SHOT_NOISE_RANGE`` and
    ``CAMERA_READ_NOISE_RANGE``; 8-bit output through a JPEG of quality ``CAMERA_JPEG_RANGE``.  The
    parameters are our choice (no paper gives them): a focused-to-slightly-soft lens and the noise of a
    camera at base ISO, i.e. far less noise than the BSRGAN / Real-ESRGAN families.

    Args:
        hr: (B, 3, H, W) float RGB in [0, 1], H and W multiples of ``scale``.
        scale: factor. generator: all randomness.
        return_params: also return the drawn parameters, each (B,): ``radius``, ``psf_sigma``, ``shot``,
            ``read``, ``quality``.

    Returns:
        LR (B, 3, H // scale, W // scale) in [0, 1], 8-bit values (and the parameters).
    """
    _check_hr(hr, scale, rgb=True)
    b = hr.shape[0]
    params = {
        "radius": _uniform(generator, *CAMERA_DISK_RADIUS_RANGE, b),
        "psf_sigma": _uniform(generator, *CAMERA_PSF_SIGMA_RANGE, b),
        "shot": _uniform(generator, *CAMERA_SHOT_NOISE_RANGE, b),
        "read": _uniform(generator, *CAMERA_READ_NOISE_RANGE, b),
        "quality": torch.tensor([_randint(generator, *CAMERA_JPEG_RANGE) for _ in range(b)], dtype=torch.float64),
    }
    x = camera_optics(hr, scale, params["radius"], params["psf_sigma"])
    var = (params["shot"].square()[:, None, None, None] * x.clamp(0, 1).double().cpu()
           + params["read"].square()[:, None, None, None]) / 255.0**2
    x = x + var.sqrt().float().to(x.device) * _randn(x.shape, generator, x.device)
    lr = jpeg_compress(x.clamp(0, 1), params["quality"]).to(hr.dtype)
    return (lr, params) if return_params else lr


def _per_image(hr: Tensor, scale: int, one: Callable[[Tensor], tuple[Tensor, dict[str, Any]]],
               return_params: bool) -> Tensor | tuple[Tensor, list[dict[str, Any]]]:
    _check_hr(hr, scale, rgb=True)
    h, w = hr.shape[-2:]
    outs, recs = [], []
    for i in range(hr.shape[0]):
        y, rec = one(hr[i:i + 1].float())
        if tuple(y.shape[-2:]) != (h // scale, w // scale):   # guard; the op sizes already give this
            y = _resize(y, (h // scale, w // scale), "bicubic")
        outs.append(y)
        recs.append(rec)
    lr = torch.cat(outs).clamp(0, 1).to(hr.dtype)
    return (lr, recs) if return_params else lr


def bsrgan(hr: Tensor, scale: int, generator: torch.Generator, *,
           return_params: bool = False) -> Tensor | tuple[Tensor, list[dict[str, Any]]]:
    """BSRGAN's ``degradation_bsrgan``: two blurs, two-step downsampling, noise and JPEG in random order.

    Per image: for x4, with p 0.25 first halve the image (cv2-like resize or antialiased bicubic) and
    continue as x2; then ops {blur, blur, downsample2, downsample3, Gaussian noise 2..25,
    JPEG (p 0.9)} in a random order with downsample2 before downsample3; then a final JPEG (quality
    30..95).  The output is 8-bit (a decoded JPEG).  No HR sharpening, no random crop.

    Args:
        hr: (B, 3, H, W) float RGB in [0, 1], H and W multiples of ``scale`` (2 or 4).
        scale: factor. generator: all randomness.
        return_params: also return one record per image: the op order and every op's drawn parameters.

    Returns:
        LR (B, 3, H // scale, W // scale) in [0, 1] (and the records).
    """
    return _per_image(hr, scale, lambda x: _bsrgan_one(x, scale, generator), return_params)


def bsrgan_plus(hr: Tensor, scale: int, generator: torch.Generator, *, shuffle_prob: float = 0.5,
                use_sharp: bool = True,
                return_params: bool = False) -> Tensor | tuple[Tensor, list[dict[str, Any]]]:
    """BSRGAN's ``degradation_bsrgan_plus`` (BSRGAN + Real-ESRGAN ops), per image.

    Optional USM sharpening of the HR (the original then uses the *sharpened* HR as the target; use
    :func:`usm_sharpen` on the target to reproduce that), then 13 ops — blur, resize, Gaussian noise,
    Poisson (p 0.1), speckle (p 0.1), JPEG, blur, resize, Gaussian noise, Poisson (p 0.1), speckle (p 0.1)
    — fully shuffled with p ``shuffle_prob``, else in this order with positions 2-5 and 9-12 shuffled;
    then a resize to H/scale (random cv2 mode) and a final JPEG.

    Args:
        hr: (B, 3, H, W) float RGB in [0, 1], H and W multiples of ``scale``.
        scale: factor. generator: all randomness.
        shuffle_prob: probability of a full shuffle. use_sharp: sharpen the HR first.
        return_params: also return one record per image.

    Returns:
        LR (B, 3, H // scale, W // scale) in [0, 1] (and the records).
    """
    return _per_image(hr, scale, lambda x: _bsrgan_plus_one(x, scale, generator, shuffle_prob, use_sharp),
                      return_params)


# --------------------------------------------------------------------------------------------------
# Real-ESRGAN second-order model (batched like its GPU pipeline)

_RESR_KERNEL_TYPES: tuple[str, ...] = ("iso", "aniso", "generalized_iso", "generalized_aniso",
                                       "plateau_iso", "plateau_aniso")
_RESR_KERNEL_PROBS: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
_RESR_BETAG: tuple[float, float] = (0.5, 4.0)
_RESR_BETAP: tuple[float, float] = (1.0, 2.0)


def _pad_to(k: Tensor, size: int) -> Tensor:
    p = (size - k.shape[-1]) // 2
    return F.pad(k, (p, p, p, p)) if p > 0 else k


def _sinc_kernel(cutoff: float, size: int) -> Tensor:
    """Circular low-pass (2-D sinc) kernel ω_c·J1(ω_c·r) / (2π·r), normalised; (size, size)."""
    x, y = _offsets(size)
    r = torch.sqrt(x * x + y * y)
    safe = torch.where(r > 0, r, torch.ones_like(r))
    k = torch.where(r > 0, cutoff * torch.special.bessel_j1(cutoff * safe) / (2 * math.pi * safe),
                    torch.full_like(r, cutoff ** 2 / (4 * math.pi)))
    return (k / k.sum()).float()


def _resr_kernel(g: torch.Generator, sigma_range: tuple[float, float], sinc_prob: float) -> tuple[Tensor, dict[str, Any]]:
    """One first/second-order Real-ESRGAN blur kernel, zero-padded to 21x21."""
    size = 2 * _randint(g, 3, 10) + 1          # 7, 9, ..., 21
    if _u(g) < sinc_prob:
        cutoff = _u(g, math.pi / 3, math.pi) if size < 13 else _u(g, math.pi / 5, math.pi)
        return _pad_to(_sinc_kernel(cutoff, size), KERNEL_SIZE), {"type": "sinc", "size": size, "cutoff": cutoff}
    kind = _RESR_KERNEL_TYPES[_pick(g, _RESR_KERNEL_PROBS)]
    sx = _u(g, *sigma_range)
    if kind.endswith("_iso") or kind == "iso":
        sy, theta = sx, 0.0
    else:
        sy, theta = _u(g, *sigma_range), _u(g, -math.pi, math.pi)
    q = _mahalanobis(size, torch.tensor([sx], dtype=torch.float64), torch.tensor([sy], dtype=torch.float64),
                     torch.tensor([theta], dtype=torch.float64))[0]
    rec: dict[str, Any] = {"type": kind, "size": size, "sigma_x": sx, "sigma_y": sy, "theta": theta}
    if kind.startswith("generalized") or kind.startswith("plateau"):
        lo, hi = _RESR_BETAG if kind.startswith("generalized") else _RESR_BETAP
        beta = _u(g, lo, 1.0) if _u(g) < 0.5 else _u(g, 1.0, hi)
        rec["beta"] = beta
        k = torch.exp(-0.5 * q.pow(beta)) if kind.startswith("generalized") else 1.0 / (q.pow(beta) + 1.0)
    else:
        k = torch.exp(-0.5 * q)
    return _pad_to(_normalise(k), KERNEL_SIZE), rec


def _resr_final_sinc(g: torch.Generator, prob: float = 0.8) -> tuple[Tensor, dict[str, Any]]:
    if _u(g) < prob:
        size = 2 * _randint(g, 3, 10) + 1
        cutoff = _u(g, math.pi / 3, math.pi)
        return _pad_to(_sinc_kernel(cutoff, size), KERNEL_SIZE), {"type": "sinc", "size": size, "cutoff": cutoff}
    pulse = torch.zeros(KERNEL_SIZE, KERNEL_SIZE)
    pulse[KERNEL_SIZE // 2, KERNEL_SIZE // 2] = 1.0
    return pulse, {"type": "pulse"}


def _resr_resize(x: Tensor, g: torch.Generator, probs: Sequence[float], up: tuple[float, float],
                 down: tuple[float, float], base: tuple[int, int]) -> tuple[Tensor, dict[str, Any]]:
    """Random up / down / keep resize of the whole batch (one factor and mode, as in Real-ESRGAN)."""
    kind = ("up", "down", "keep")[_pick(g, probs)]
    s = _u(g, *up) if kind == "up" else _u(g, *down) if kind == "down" else 1.0
    mode = _RESR_MODES[_randint(g, 0, 2)]
    return _resize(x, (int(base[0] * s), int(base[1] * s)), mode), {"kind": kind, "factor": s, "mode": mode}


def _resr_noise(x: Tensor, g: torch.Generator, gaussian_prob: float, sigma_range: tuple[float, float],
                poisson_range: tuple[float, float], gray_prob: float = 0.4) -> tuple[Tensor, dict[str, Any]]:
    """Gaussian (σ per image, 0..255) or Poisson (scale per image) noise, gray with p ``gray_prob`` per image."""
    b, c, h, w = x.shape
    gray = (_rand(g, b) < gray_prob).float()
    gmask = gray.to(x.device).view(b, 1, 1, 1)
    if _u(g) < gaussian_prob:
        sigma = _uniform(g, *sigma_range, b)
        std = (sigma / 255.0).float().to(x.device).view(b, 1, 1, 1)
        color_n = _randn((b, c, h, w), g, x.device) * std
        gray_n = _randn((b, 1, h, w), g, x.device) * std
        noise = gmask * gray_n + (1 - gmask) * color_n
        rec: dict[str, Any] = {"type": "gaussian", "sigma": sigma, "gray": gray.bool().cpu()}
    else:
        scale = _uniform(g, *poisson_range, b)

        def poisson_part(img: Tensor) -> Tensor:
            # Quantise to 8 bit; the number of distinct levels of each image, rounded up to a power of
            # two, sets the photon count, so the noise follows the image's own dynamic range.
            img = (img * 255).round().clamp(0, 255) / 255
            vals = torch.tensor([2.0 ** math.ceil(math.log2(max(len(torch.unique(im)), 1))) for im in img],
                                device=img.device).view(-1, 1, 1, 1)
            return _poisson(img * vals, g) / vals - img

        noise = gmask * poisson_part(_luma(x)).expand(b, c, h, w) + (1 - gmask) * poisson_part(x)
        noise = noise * scale.float().to(x.device).view(b, 1, 1, 1)
        rec = {"type": "poisson", "scale": scale, "gray": gray.bool().cpu()}
    return (x + noise).clamp(0, 1), rec


def realesrgan(hr: Tensor, scale: int, generator: torch.Generator, *, sharpen: bool = True,
               return_params: bool = False) -> Tensor | tuple[Tensor, dict[str, Any]]:
    """Real-ESRGAN's second-order degradation (the ``train_realesrgan_x4plus`` / ``x2plus`` settings).

    ``[blur → resize → noise → JPEG] → [blur (p 0.8) → resize → noise] → final``, where final is, with
    p 0.5, resize to H/scale + sinc filter + JPEG, else JPEG + resize + sinc.  Per image: kernels
    (iso / aniso / generalised / plateau Gaussians, or sinc; 7..21 taps padded to 21), noise level,
    gray flag and JPEG quality (30..95); per batch, as in the original GPU pipeline: resize factors and
    modes and the Gaussian/Poisson choice.  JPEG is Pillow's libjpeg with the integer quality nearest to
    the drawn one (the original's DiffJPEG is a torch port of the same baseline JPEG).  The result is
    rounded to 8 bit.

    Args:
        hr: (B, 3, H, W) float RGB in [0, 1], H and W multiples of ``scale``.
        scale: factor. generator: all randomness.
        sharpen: USM-sharpen the HR before degrading, as RealESRGANModel does (it then also trains
            against the sharpened HR for its L1/perceptual losses; see :func:`usm_sharpen`).
        return_params: also return a dict of the drawn kernels (B, 21, 21), kernel records, resize,
            noise and JPEG parameters and the final order.

    Returns:
        LR (B, 3, H // scale, W // scale) in [0, 1] (and the parameters).
    """
    _check_hr(hr, scale, rgb=True)
    g = generator
    b, _, h, w = hr.shape
    x = usm_sharpen(hr.float()) if sharpen else hr.float()
    k1 = [_resr_kernel(g, (0.2, 3.0), 0.1) for _ in range(b)]
    k2 = [_resr_kernel(g, (0.2, 1.5), 0.1) for _ in range(b)]
    ks = [_resr_final_sinc(g) for _ in range(b)]
    kernel1, kernel2, sinc = (torch.stack([k for k, _ in lst]) for lst in (k1, k2, ks))
    p: dict[str, Any] = {"kernel1": kernel1, "kernel2": kernel2, "sinc_kernel": sinc,
                         "kernel1_info": [r for _, r in k1], "kernel2_info": [r for _, r in k2],
                         "sinc_info": [r for _, r in ks]}
    # first order
    x = _filter(x, kernel1)
    x, p["resize1"] = _resr_resize(x, g, (0.2, 0.7, 0.1), (1.0, 1.5), (0.15, 1.0), (h, w))
    x, p["noise1"] = _resr_noise(x, g, 0.5, (1.0, 30.0), (0.05, 3.0))
    p["jpeg1"] = [int(round(v)) for v in _uniform(g, 30.0, 95.0, b).tolist()]
    x = jpeg_compress(x.clamp(0, 1), p["jpeg1"])
    # second order
    p["blur2"] = _u(g) < 0.8
    if p["blur2"]:
        x = _filter(x, kernel2)
    x, p["resize2"] = _resr_resize(x, g, (0.3, 0.4, 0.3), (1.0, 1.2), (0.3, 1.0), (h // scale, w // scale))
    x, p["noise2"] = _resr_noise(x, g, 0.5, (1.0, 25.0), (0.05, 2.5))
    # final: resize + sinc and JPEG in a random order (other orders gave twisted lines, per the authors)
    p["jpeg2"] = [int(round(v)) for v in _uniform(g, 30.0, 95.0, b).tolist()]
    p["final_order"] = "resize_sinc_jpeg" if _u(g) < 0.5 else "jpeg_resize_sinc"
    mode = _RESR_MODES[_randint(g, 0, 2)]
    p["final_mode"] = mode
    if p["final_order"] == "resize_sinc_jpeg":
        x = _filter(_resize(x, (h // scale, w // scale), mode), sinc)
        x = jpeg_compress(x.clamp(0, 1), p["jpeg2"])
    else:
        x = jpeg_compress(x.clamp(0, 1), p["jpeg2"])
        x = _filter(_resize(x, (h // scale, w // scale), mode), sinc)
    lr = ((x.clamp(0, 1) * 255).round() / 255).to(hr.dtype)
    return (lr, p) if return_params else lr


# --------------------------------------------------------------------------------------------------
# registry


def _classical_iso_fn(hr: Tensor, scale: int, generator: torch.Generator) -> Tensor:
    return random_classical_iso(hr, scale, generator)  # type: ignore[return-value]


def _classical_aniso_fn(hr: Tensor, scale: int, generator: torch.Generator) -> Tensor:
    return random_classical_aniso(hr, scale, generator)  # type: ignore[return-value]


def _bsrgan_fn(hr: Tensor, scale: int, generator: torch.Generator) -> Tensor:
    return bsrgan(hr, scale, generator)  # type: ignore[return-value]


def _bsrgan_plus_fn(hr: Tensor, scale: int, generator: torch.Generator) -> Tensor:
    return bsrgan_plus(hr, scale, generator)  # type: ignore[return-value]


def _realesrgan_fn(hr: Tensor, scale: int, generator: torch.Generator) -> Tensor:
    return realesrgan(hr, scale, generator)  # type: ignore[return-value]


def _bicubic_fn(hr: Tensor, scale: int, generator: torch.Generator) -> Tensor:
    _check_hr(hr, scale)
    # deterministic: the generator is not used; 8 bit as a saved LR image would be
    return (bicubic_downscale(hr.float(), scale).clamp(0, 1) * 255).round().div(255).to(hr.dtype)


def _camera_fn(hr: Tensor, scale: int, generator: torch.Generator) -> Tensor:
    return camera(hr, scale, generator)  # type: ignore[return-value]


DEGRADATIONS: dict[str, DegradationFn] = {
    "classical_iso": _classical_iso_fn,
    "classical_aniso": _classical_aniso_fn,
    "spatially_variant": _spatially_variant_fn,
    "bsrgan": _bsrgan_fn,
    "bsrgan_plus": _bsrgan_plus_fn,
    "realesrgan": _realesrgan_fn,
    "bicubic": _bicubic_fn,
    "camera": _camera_fn,
}
