"""Image-quality metrics of the usual super-resolution protocol: PSNR / SSIM on Y, and NIQE.

* :func:`psnr_y` and :func:`ssim_y` follow the protocol of the SR literature: both images are
  quantised to 8 bit, converted to the luma Y of ITU-R BT.601 exactly as MATLAB's ``rgb2ycbcr``
  (Y in [16, 235]), ``crop_border`` pixels are removed from every side, and the metric is computed
  in float64 on Y in 0..255 units.  SSIM is Wang et al. (IEEE TIP 2004): 11x11 Gaussian window,
  sigma 1.5, K1 = 0.01, K2 = 0.03, L = 255, "valid" filtering (no padding).
* :func:`niqe` is the Natural Image Quality Evaluator (A. Mittal, R. Soundararajan and A. C. Bovik,
  "Making a Completely Blind Image Quality Analyzer", IEEE SPL 2013) with the LIVE pristine model
  shipped beside this file (``niqe_pris_params.npz``, see ``NIQE_NOTICE.txt``).  It reproduces the
  reference implementation commonly used in SR papers (BasicSR's ``calculate_niqe`` on the Y channel)
  to better than 1e-4, which is what ``tests/fixtures/niqe`` checks.

NIQE runs in numpy on the CPU (a per-image statistic, not a training loss): float32 at full scale,
where the reference's float32 rounding decides whether flat areas give exactly zero MSCN
coefficients, and float64 at half scale.  PSNR and SSIM run in float64 torch on the inputs' device.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InvalidInputError

__all__ = ["NIQE_BLOCK_SIZE", "imresize_matlab", "niqe", "psnr_y", "quantize_8bit", "rgb_to_y", "ssim_y"]

# ITU-R BT.601 luma for RGB in [0, 1] giving Y in [16, 235] (MATLAB rgb2ycbcr, first row).
_BT601_Y: tuple[float, float, float] = (65.481, 128.553, 24.966)
_BT601_Y_OFFSET: float = 16.0

_SSIM_WINDOW: int = 11
_SSIM_SIGMA: float = 1.5
_SSIM_K1: float = 0.01
_SSIM_K2: float = 0.03
_DATA_RANGE: float = 255.0

NIQE_BLOCK_SIZE: int = 96
# Shape-parameter grid of the (A)GGD moment matching, as in the NIQE paper's code (0.2:0.001:10).
_NIQE_GAMMA_GRID: np.ndarray = np.arange(0.2, 10.001, 0.001)
# Neighbour offsets (dy, dx) of the paired products: horizontal, vertical, main and anti diagonal.
_NIQE_SHIFTS: tuple[tuple[int, int], ...] = ((0, 1), (1, 0), (1, 1), (1, -1))
_NIQE_PARAMS = Path(__file__).with_name("niqe_pris_params.npz")


# --------------------------------------------------------------------------------------------
# Colour and quantisation
# --------------------------------------------------------------------------------------------


def _check_image(name: str, x: Tensor, channels: tuple[int, ...] = (1, 3)) -> None:
    if not isinstance(x, Tensor):
        raise InvalidInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] not in channels:
        raise InvalidInputError(f"{name} must have shape (B, C, H, W) with C in {channels}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InvalidInputError(f"{name} must be a floating-point tensor in [0, 1], got {x.dtype}")


def quantize_8bit(img: Tensor) -> Tensor:
    """Round an image to the 8-bit grid the way it would be saved to PNG.

    Args:
        img: floating tensor of any shape, values nominally in [0, 1].

    Returns:
        float64 tensor of the same shape with integer values in [0, 255].
    """
    return (img.detach().to(torch.float64).clamp(0.0, 1.0) * 255.0).round()


def rgb_to_y(img: Tensor) -> Tensor:
    """Luma Y of ITU-R BT.601 (MATLAB ``rgb2ycbcr``, "studio swing").

    Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255 for R, G, B in [0, 1].

    Args:
        img: (B, 3, H, W) RGB, floating, in [0, 1].

    Returns:
        (B, 1, H, W) Y of the same dtype, in [16/255, 235/255].
    """
    _check_image("img", img, (3,))
    w = torch.tensor(_BT601_Y, dtype=img.dtype, device=img.device).view(1, 3, 1, 1)
    return ((img * w).sum(dim=1, keepdim=True) + _BT601_Y_OFFSET) / 255.0


def _y_255(img: Tensor, crop_border: int) -> Tensor:
    """8-bit quantised Y in 0..255 units, float64, border cropped; a 1-channel input is taken as Y."""
    q = quantize_8bit(img)
    if q.shape[1] == 3:
        w = torch.tensor(_BT601_Y, dtype=torch.float64, device=q.device).view(1, 3, 1, 1)
        q = (q / 255.0 * w).sum(dim=1, keepdim=True) + _BT601_Y_OFFSET
    if crop_border > 0:
        q = q[..., crop_border:-crop_border, crop_border:-crop_border]
    return q


def _pair_y(sr: Tensor, hr: Tensor, crop_border: int, min_size: int) -> tuple[Tensor, Tensor]:
    _check_image("sr", sr)
    _check_image("hr", hr)
    if sr.shape != hr.shape:
        raise InvalidInputError(f"sr and hr must have the same shape, got {tuple(sr.shape)} and {tuple(hr.shape)}")
    if crop_border < 0:
        raise InvalidInputError(f"crop_border must be >= 0, got {crop_border}")
    h, w = sr.shape[-2] - 2 * crop_border, sr.shape[-1] - 2 * crop_border
    if min(h, w) < min_size:
        raise InvalidInputError(
            f"after removing crop_border={crop_border} the image is {h}x{w}; at least {min_size}x{min_size} is needed"
        )
    if sr.device.type == "mps":  # no float64 there
        sr, hr = sr.cpu(), hr.cpu()
    return _y_255(sr, crop_border), _y_255(hr.to(sr.device), crop_border)


# --------------------------------------------------------------------------------------------
# PSNR / SSIM
# --------------------------------------------------------------------------------------------


def psnr_y(sr: Tensor, hr: Tensor, *, crop_border: int) -> Tensor:
    """PSNR on the Y channel, SR protocol (8-bit quantised images, BT.601 Y, border cropped).

    PSNR = 10 log10(255^2 / MSE); Y itself is not re-rounded.  Identical images give ``inf``.

    Args:
        sr: (B, 3, H, W) (or (B, 1, H, W), taken as Y) restored image in [0, 1].
        hr: same shape, ground truth in [0, 1].
        crop_border: pixels removed from each side before comparing (usually the scale factor).

    Returns:
        (B,) float64 PSNR in dB, on ``sr``'s device.
    """
    y_sr, y_hr = _pair_y(sr, hr, crop_border, 1)
    mse = (y_sr - y_hr).square().mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(_DATA_RANGE**2 / mse)


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g).view(1, 1, size, size)


def ssim_y(sr: Tensor, hr: Tensor, *, crop_border: int) -> Tensor:
    """SSIM (Wang et al. 2004) on the Y channel, SR protocol.

    Local statistics use an 11x11 Gaussian window (sigma 1.5) without padding, so the SSIM map
    is (H - 2 crop_border - 10) x (W - 2 crop_border - 10); C1 = (0.01 L)^2, C2 = (0.03 L)^2, L = 255.

    Args:
        sr: (B, 3, H, W) (or (B, 1, H, W), taken as Y) restored image in [0, 1].
        hr: same shape, ground truth in [0, 1].
        crop_border: pixels removed from each side before comparing.

    Returns:
        (B,) float64 mean SSIM in [-1, 1] (1 for identical images), on ``sr``'s device.
    """
    x, y = _pair_y(sr, hr, crop_border, _SSIM_WINDOW)
    win = _gaussian_window(_SSIM_WINDOW, _SSIM_SIGMA, x.dtype, x.device)
    c1 = (_SSIM_K1 * _DATA_RANGE) ** 2
    c2 = (_SSIM_K2 * _DATA_RANGE) ** 2
    mu_x, mu_y = F.conv2d(x, win), F.conv2d(y, win)
    var_x = F.conv2d(x * x, win) - mu_x**2
    var_y = F.conv2d(y * y, win) - mu_y**2
    cov_xy = F.conv2d(x * y, win) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3))


# --------------------------------------------------------------------------------------------
# MATLAB-style bicubic resize (NIQE's second scale)
# --------------------------------------------------------------------------------------------


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's ``cubic``)."""
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return near + far


def _resize_matrix(in_len: int, scale: float, antialias: bool) -> np.ndarray:
    """(out_len, in_len) matrix of MATLAB ``imresize(..., 'bicubic')`` along one axis.

    When shrinking with antialiasing the kernel is stretched by 1/scale (and scaled by ``scale``)
    so it low-passes before sampling.  Taps outside the signal are folded back by symmetric
    reflection (index -1 -> 0, n -> n - 1), MATLAB's boundary rule.
    """
    out_len = math.ceil(in_len * scale)
    widen = antialias and scale < 1
    kernel_width = 4.0 / scale if widen else 4.0
    x = np.arange(1, out_len + 1, dtype=np.float64)
    # Output pixel x (1-based) maps to input coordinate u so that pixel *areas* line up.
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - kernel_width / 2)
    taps = int(math.ceil(kernel_width)) + 2
    idx = left[:, None] + np.arange(taps)[None, :]
    dist = u[:, None] - idx
    w = scale * _cubic(dist * scale) if widen else _cubic(dist)
    w = w / w.sum(axis=1, keepdims=True)
    j = (idx - 1).astype(np.int64) % (2 * in_len)  # 0-based, one period of the mirrored signal
    j = np.where(j >= in_len, 2 * in_len - 1 - j, j)
    m = np.zeros((out_len, in_len), dtype=np.float64)
    np.add.at(m, (np.repeat(np.arange(out_len), taps), j.ravel()), w.ravel())
    return m


def imresize_matlab(img: np.ndarray, scale: float, *, antialias: bool = True) -> np.ndarray:
    """MATLAB ``imresize(img, scale, 'bicubic')`` of a 2-D array (rows first, then columns).

    Args:
        img: (H, W) float array, any range.
        scale: resize factor; the output is ceil(H * scale) x ceil(W * scale).
        antialias: widen the kernel when shrinking (MATLAB's default).

    Returns:
        (ceil(H scale), ceil(W scale)) float64 array.
    """
    if img.ndim != 2:
        raise InvalidInputError(f"imresize_matlab expects a 2-D array, got shape {img.shape}")
    if scale <= 0:
        raise InvalidInputError(f"scale must be > 0, got {scale}")
    a = np.asarray(img, dtype=np.float64)
    mh = _resize_matrix(a.shape[0], scale, antialias)
    mw = _resize_matrix(a.shape[1], scale, antialias)
    return (mh @ a) @ mw.T


# --------------------------------------------------------------------------------------------
# NIQE
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _niqe_params() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.load(_NIQE_PARAMS) as d:
        return d["mu_pris_param"].astype(np.float64), d["cov_pris_param"].astype(np.float64), d["gaussian_window"]


@lru_cache(maxsize=1)
def _gamma_ratio_grid() -> np.ndarray:
    """rho(g) = Gamma(2/g)^2 / (Gamma(1/g) Gamma(3/g)) over the shape grid (the GGD moment ratio)."""
    gam = np.vectorize(math.gamma)
    r = 1.0 / _NIQE_GAMMA_GRID
    return gam(2 * r) ** 2 / (gam(r) * gam(3 * r))


def _filter_replicate(img: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Correlate with a small odd window, edge pixels repeated outwards (the window is symmetric).

    Accumulates the taps one by one in float64 in row-major kernel order and casts the result to
    ``img``'s dtype, the arithmetic of the reference's filter: flat regions then give exactly the
    same (zero or not) MSCN values, whose *signs* the AGGD fit counts.
    """
    kh, kw = window.shape
    ph, pw = kh // 2, kw // 2
    pad = np.pad(img.astype(np.float64), ((ph, ph), (pw, pw)), mode="edge")
    h, w = img.shape
    out = np.zeros((h, w), dtype=np.float64)
    for dy in range(kh):
        for dx in range(kw):
            out += window[dy, dx] * pad[dy : dy + h, dx : dx + w]
    return out.astype(img.dtype)


def _mscn(img: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Mean-subtracted contrast-normalised coefficients (I - mu) / (sigma + 1), in ``img``'s dtype."""
    mu = _filter_replicate(img, window)
    sigma = np.sqrt(np.abs(_filter_replicate(np.square(img), window) - np.square(mu)))
    return (img - mu) / (sigma + img.dtype.type(1.0))


def _aggd_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Moment-matching fit of an asymmetric generalised Gaussian to each row of ``x``.

    The moments are taken in ``x``'s dtype, as the reference does: its shape choice is an argmin on
    a 0.001 grid, and a float32 image must land on the same grid point.

    Args:
        x: (N, M) samples, one distribution per row (float32 or float64).

    Returns:
        (alpha, beta_l, beta_r), each (N,) float64: shape and left / right scales.  A row without
        negative (or positive) samples has NaN scales and alpha = 0.2 (the first grid value, which
        is where an argmin over NaN lands in the reference).
    """
    n = x.shape[0]
    alpha, left, right = np.empty(n), np.empty(n), np.empty(n)
    ratio = _gamma_ratio_grid()
    nan = x.dtype.type(np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        for i, row in enumerate(x):
            neg, pos = row[row < 0], row[row > 0]
            left_std = np.sqrt(np.mean(np.square(neg))) if neg.size else nan
            right_std = np.sqrt(np.mean(np.square(pos))) if pos.size else nan
            gamma_hat = left_std / right_std
            r_hat = np.mean(np.abs(row)) ** 2 / np.mean(np.square(row))
            r_hat_norm = r_hat * (gamma_hat**3 + 1) * (gamma_hat + 1) / (gamma_hat**2 + 1) ** 2
            alpha[i] = _NIQE_GAMMA_GRID[np.argmin((ratio - r_hat_norm) ** 2)]
            left[i], right[i] = left_std, right_std
    gam = np.vectorize(math.gamma)
    spread = np.sqrt(gam(1.0 / alpha) / gam(3.0 / alpha))
    return alpha, left * spread, right * spread


def _block_features(mscn: np.ndarray, block: int) -> np.ndarray:
    """The 18 NIQE features of every whole ``block`` x ``block`` tile of an MSCN map -> (N, 18)."""
    nh, nw = mscn.shape[0] // block, mscn.shape[1] // block
    tiles = mscn[: nh * block, : nw * block].reshape(nh, block, nw, block).transpose(0, 2, 1, 3)
    tiles = np.ascontiguousarray(tiles.reshape(nh * nw, block, block))
    alpha, bl, br = _aggd_fit(tiles.reshape(nh * nw, -1))
    feats = [alpha, (bl + br) / 2]  # the MSCN distribution is symmetric: shape + scale
    gam = np.vectorize(math.gamma)
    for dy, dx in _NIQE_SHIFTS:
        # Neighbour products inside each tile; the shift wraps around the tile (circular), as the reference.
        prod = tiles * np.roll(tiles, (dy, dx), axis=(1, 2))
        alpha, bl, br = _aggd_fit(prod.reshape(nh * nw, -1))
        with np.errstate(invalid="ignore"):
            mean = (br - bl) * gam(2.0 / alpha) / gam(1.0 / alpha)
        feats += [alpha, mean, bl, br]
    return np.stack(feats, axis=1)


def _niqe_y(y: np.ndarray) -> float:
    """NIQE of a Y image in 0..255 (integer valued, any float dtype)."""
    mu_p, cov_p, window = _niqe_params()
    b = NIQE_BLOCK_SIZE
    nh, nw = y.shape[0] // b, y.shape[1] // b
    # Full scale in float32, the reference's arithmetic: in flat areas the float32 local mean is the
    # pixel value itself, so the MSCN coefficient is exactly 0 (float64 would leave +-1e-15 whose
    # signs change the AGGD fit).
    img = y[: nh * b, : nw * b].astype(np.float32)
    feats = [_block_features(_mscn(img, window), b)]
    # Half scale: the reference resizes in float32 through BLAS, whose rounding is machine dependent;
    # float64 is the accurate value and agrees with it to ~3e-5 on the fixtures.
    half = imresize_matlab(img.astype(np.float64) / 255.0, 0.5) * 255.0
    feats.append(_block_features(_mscn(half, window), b // 2))
    f = np.concatenate(feats, axis=1)  # (N, 36): 18 features at full and at half resolution
    mu = np.nanmean(f, axis=0)
    f_ok = f[~np.isnan(f).any(axis=1)]
    cov = np.cov(f_ok, rowvar=False)
    d = mu_p.reshape(-1) - mu
    q = d @ np.linalg.pinv((cov_p + cov) / 2) @ d
    return float(np.sqrt(q))


def _y_like_reference(img_u8: np.ndarray) -> np.ndarray:
    """Y of an 8-bit (H, W, 3) RGB image, rounded to integers, with the reference's float32 steps.

    The reference computes Y in float32 from value/255, scales back by 255 and rounds (to mimic
    MATLAB's uint8 ``rgb2ycbcr``); keeping its float32 casts makes exact .5 ties fall the same way.
    """
    x = img_u8[..., ::-1].astype(np.float32) / np.float32(255.0)  # the reference sums in B, G, R order
    w = np.asarray(_BT601_Y[::-1], dtype=np.float64)
    y = ((x.astype(np.float64) @ w + _BT601_Y_OFFSET) / 255.0).astype(np.float32)
    return np.round(y * np.float32(255.0)).astype(np.float64)


def niqe(img: Tensor, *, crop_border: int = 0) -> float | Tensor:
    """NIQE with the LIVE pristine model (lower is more natural).

    Steps: quantise to 8 bit; Y of BT.601 rounded to integers; keep the whole 96x96 blocks; at two
    scales (full, then MATLAB bicubic x1/2 with antialiasing) compute the MSCN coefficients with the
    7x7 Gaussian window of the model and, per block, 18 (A)GGD features (36 in all); fit a
    multivariate Gaussian (nan-mean, covariance of NaN-free blocks) and return
    sqrt((mu_p - mu)^T pinv((Sigma_p + Sigma) / 2) (mu_p - mu)).

    Args:
        img: (3, H, W) or (B, 3, H, W) RGB in [0, 1] (1 channel is taken as Y already).  After
            ``crop_border`` the image needs at least two whole 96x96 blocks (e.g. 96x192).
        crop_border: pixels removed from each side of Y first.

    Returns:
        a float for a (C, H, W) input, else a (B,) float64 tensor.
    """
    if not isinstance(img, Tensor):
        raise InvalidInputError(f"img must be a torch.Tensor, got {type(img).__name__}")
    single = img.ndim == 3
    batch = img[None] if single else img
    _check_image("img", batch)
    if crop_border < 0:
        raise InvalidInputError(f"crop_border must be >= 0, got {crop_border}")
    h, w = batch.shape[-2] - 2 * crop_border, batch.shape[-1] - 2 * crop_border
    if (h // NIQE_BLOCK_SIZE) * (w // NIQE_BLOCK_SIZE) < 2:
        raise InvalidInputError(
            f"NIQE needs at least two whole {NIQE_BLOCK_SIZE}x{NIQE_BLOCK_SIZE} blocks, the (cropped) image is {h}x{w}"
        )
    q = quantize_8bit(batch).cpu().numpy().astype(np.uint8).transpose(0, 2, 3, 1)  # (B, H, W, C)
    values = []
    for im in q:
        y = _y_like_reference(im) if im.shape[-1] == 3 else im[..., 0].astype(np.float64)
        if crop_border > 0:
            y = y[crop_border:-crop_border, crop_border:-crop_border]
        values.append(_niqe_y(y))
    return values[0] if single else torch.tensor(values, dtype=torch.float64)
