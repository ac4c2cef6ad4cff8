"""Colour correction of a restored image towards a reference (StableSR's colour fix).

Diffusion-based restorers drift in colour; StableSR corrects this by keeping the fine detail of
the output and taking the coarse colour from the (bicubic-upsampled) low-resolution input.  Two
variants are provided:

* ``wavelet``: a 5-level dilated "à trous" decomposition; the summed detail bands of the image
  plus the final low-pass band of the reference.
* ``adain``: per-channel mean/std transfer (adaptive instance normalisation).

All functions are dtype-agnostic, work on any channel count and never clamp (callers clamp if
their value range requires it).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InvalidInputError

__all__ = [
    "ColorFixMethod",
    "adain",
    "color_fix",
    "wavelet_blur",
    "wavelet_decomposition",
    "wavelet_reconstruction",
]

ColorFixMethod = Literal["wavelet", "adain"]

WAVELET_LEVELS: int = 5
ADAIN_EPS: float = 1e-5

# 3x3 binomial (B-spline) kernel of the à trous transform; sums to 1 so flat regions pass through.
_KERNEL_3X3: tuple[tuple[float, ...], ...] = ((1.0, 2.0, 1.0), (2.0, 4.0, 2.0), (1.0, 2.0, 1.0))


def _check_4d(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise InvalidInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise InvalidInputError(f"{name} must have shape (B, C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InvalidInputError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise InvalidInputError(f"{name} must not have an empty dimension, got {tuple(x.shape)}")


def _check_pair(content: Tensor, style: Tensor, same_size: bool) -> None:
    _check_4d("content", content)
    _check_4d("style", style)
    if content.shape[1] != style.shape[1]:
        raise InvalidInputError(
            f"content and style must have the same channel count, got {content.shape[1]} and {style.shape[1]}"
        )
    if style.shape[0] not in (1, content.shape[0]):
        raise InvalidInputError(
            f"style batch must be 1 or equal the content batch {content.shape[0]}, got {style.shape[0]}"
        )
    if same_size and content.shape[-2:] != style.shape[-2:]:
        raise InvalidInputError(
            f"content and style must have the same height and width, got {tuple(content.shape[-2:])} "
            f"and {tuple(style.shape[-2:])}; resize the style first (color_fix does this)"
        )


def wavelet_blur(image: Tensor, radius: int) -> Tensor:
    """Low-pass one level of the à trous decomposition.

    Replicate-pads by ``radius`` and applies the depthwise 3x3 kernel [[1,2,1],[2,4,2],[1,2,1]]/16
    at dilation ``radius``, so every channel is filtered independently.

    Args:
        image: (B, C, H, W) floating tensor, any value range.
        radius: dilation of the kernel (>= 1).

    Returns:
        (B, C, H, W) low-pass image, same dtype and device.
    """
    _check_4d("image", image)
    if radius < 1:
        raise InvalidInputError(f"radius must be >= 1, got {radius}")
    channels = image.shape[1]
    kernel = torch.tensor(_KERNEL_3X3, dtype=image.dtype, device=image.device) / 16.0
    kernel = kernel.expand(channels, 1, 3, 3)
    # kornia.filter2d has no dilation, hence the explicit pad + grouped conv.
    padded = F.pad(image, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(padded, kernel, groups=channels, dilation=radius)


def wavelet_decomposition(image: Tensor, levels: int = WAVELET_LEVELS) -> tuple[Tensor, Tensor]:
    """Split an image into summed detail bands and a final low-pass band.

    Level ``i`` (0-based) blurs with radius ``2**i``; its detail band is ``img - low`` and the
    next level works on ``low``.  ``high + low`` equals ``image`` up to rounding.

    Args:
        image: (B, C, H, W) floating tensor, any value range.
        levels: number of levels (>= 1); StableSR uses 5.

    Returns:
        ``(high, low)``: both (B, C, H, W); ``high`` is the sum of the detail bands.
    """
    _check_4d("image", image)
    if levels < 1:
        raise InvalidInputError(f"levels must be >= 1, got {levels}")
    high = torch.zeros_like(image)
    current = image
    for i in range(levels):
        low = wavelet_blur(current, 2**i)
        # Summing the bands (not image - final low) follows the reference arithmetic exactly.
        high = high + (current - low)
        current = low
    return high, current


def wavelet_reconstruction(content: Tensor, style: Tensor) -> Tensor:
    """Detail of ``content`` on top of the coarse colour of ``style`` (StableSR wavelet fix).

    Args:
        content: (B, C, H, W) floating tensor, e.g. the restored image, any value range.
        style: (B or 1, C, H, W) floating tensor of the same size, e.g. the upsampled input.

    Returns:
        (B, C, H, W) ``content_high + style_low``, not clamped.
    """
    _check_pair(content, style, same_size=True)
    content_high, _ = wavelet_decomposition(content)
    _, style_low = wavelet_decomposition(style)
    return content_high + style_low


def _mean_std(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per image and channel mean and sqrt(unbiased var + eps), each (B, C, 1, 1)."""
    flat = x.flatten(2)
    var = flat.var(dim=2, unbiased=True) + eps
    mean = flat.mean(dim=2)
    return mean[..., None, None], var.sqrt()[..., None, None]


def adain(content: Tensor, style: Tensor) -> Tensor:
    """Adaptive instance normalisation: give ``content`` the per-channel mean/std of ``style``.

    ``out = (content - mean_c) / std_c * std_s + mean_s`` with ``std = sqrt(unbiased var + 1e-5)``,
    computed per image and channel over H*W.

    Args:
        content: (B, C, H, W) floating tensor, any value range, H*W >= 2.
        style: (B or 1, C, h, w) floating tensor, any size with h*w >= 2.

    Returns:
        (B, C, H, W), not clamped.
    """
    _check_pair(content, style, same_size=False)
    for name, x in (("content", content), ("style", style)):
        if x.shape[-2] * x.shape[-1] < 2:
            raise InvalidInputError(
                f"{name} needs at least 2 pixels for an unbiased variance, got {tuple(x.shape[-2:])}"
            )
    mean_c, std_c = _mean_std(content, ADAIN_EPS)
    mean_s, std_s = _mean_std(style, ADAIN_EPS)
    return (content - mean_c) / std_c * std_s + mean_s


def _resize_reference(reference: Tensor, size: tuple[int, int]) -> Tensor:
    """Bicubic resize, antialiased when shrinking.

    Bicubic matches StableSR, which corrects against the bicubic-upsampled LR.  When the reference
    is larger than the image, antialiasing keeps the low band of the wavelet fix free of aliasing
    (plain bicubic would point-sample fine detail).  torch's antialias filter is used rather than
    kornia's Gaussian pre-blur because it is the exact PIL-style bicubic area filter.
    """
    shrinking = reference.shape[-2] > size[0] or reference.shape[-1] > size[1]
    return F.interpolate(reference, size=size, mode="bicubic", align_corners=False, antialias=shrinking)


def color_fix(
    image: Tensor,
    reference: Tensor,
    method: ColorFixMethod = "wavelet",
    strength: float = 1.0,
) -> Tensor:
    """Correct the colour of ``image`` towards ``reference``.

    The reference is resized to the image size with bicubic interpolation (antialiased when
    shrinking), as StableSR compares the output with the bicubic-upsampled low-resolution input.
    Computation runs in at least float32 (half-precision statistics are too coarse) and the result
    is returned in the image dtype.

    Args:
        image: (B, C, H, W) floating tensor, any value range (e.g. [0, 1]).
        reference: (B or 1, C, h, w) floating tensor in the same value range; a batch of 1 is
            applied to every image.  Moved to ``image``'s device if needed.
        method: ``"wavelet"`` (keep image detail, take reference low frequencies) or ``"adain"``
            (match per-channel mean and std).
        strength: in [0, 1]; blends ``image`` (0) with the corrected result (1).  0 returns an
            exact copy of ``image``.

    Returns:
        (B, C, H, W) in ``image``'s dtype and device, not clamped.

    Raises:
        InvalidInputError: bad shapes, channel or batch mismatch, NaN / inf pixels, unknown method or
            strength outside [0, 1].
    """
    _check_4d("image", image)
    _check_4d("reference", reference)
    if method not in ("wavelet", "adain"):
        raise InvalidInputError(f"method must be 'wavelet' or 'adain', got {method!r}")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)):
        raise InvalidInputError(f"strength must be a number in [0, 1], got {strength!r}")
    if not math.isfinite(strength) or not 0.0 <= strength <= 1.0:
        raise InvalidInputError(f"strength must be in [0, 1], got {strength}")
    if image.shape[1] != reference.shape[1]:
        raise InvalidInputError(
            f"image and reference must have the same channel count, got {image.shape[1]} and {reference.shape[1]}"
        )
    if reference.shape[0] not in (1, image.shape[0]):
        raise InvalidInputError(
            f"reference batch must be 1 or equal the image batch {image.shape[0]}, got {reference.shape[0]}"
        )
    for name, t in (("image", image), ("reference", reference)):
        if not torch.isfinite(t).all():
            raise InvalidInputError(f"the {name} contains NaN or infinite values; expected finite pixel values")
    if method == "adain" and image.shape[-2] * image.shape[-1] < 2:
        raise InvalidInputError(f"adain needs an image of at least 2 pixels, got {tuple(image.shape[-2:])}")

    if strength == 0.0:
        return image.clone()

    work_dtype = torch.promote_types(image.dtype, torch.float32)
    x = image.to(work_dtype)
    ref = reference.to(device=image.device, dtype=work_dtype)
    if ref.shape[-2:] != x.shape[-2:]:
        ref = _resize_reference(ref, (x.shape[-2], x.shape[-1]))

    # A batch-1 reference broadcasts in both methods (its low band / statistics are computed once).
    fixed = wavelet_reconstruction(x, ref) if method == "wavelet" else adain(x, ref)

    if strength != 1.0:
        fixed = torch.lerp(x, fixed, float(strength))
    return fixed.to(image.dtype)
