"""PSNR / SSIM on Y and NIQE (realsr_core.training.metrics), on real photos.

NIQE is checked against the BasicSR reference values in tests/fixtures/niqe; PSNR and SSIM against
numbers computed independently here (numpy, and scikit-image's own SSIM / PSNR).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from helpers import FIXTURES, ROOT, load_png, skimage_photo
from PIL import Image

from realsr_core.errors import InvalidInputError
from realsr_core.training.metrics import imresize_matlab, niqe, psnr_y, quantize_8bit, rgb_to_y, ssim_y

NIQE_DIR = FIXTURES / "niqe"
NIQE_META = json.loads((NIQE_DIR / "meta.json").read_text())

# ITU-R BT.601: Y = Kr R + (1 - Kr - Kb) G + Kb B, scaled to the studio range [16, 235].
KR, KB = 0.299, 0.114


def y_numpy(img: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W) 8-bit-quantised BT.601 Y in 0..255, written from the standard."""
    q = np.round(np.clip(img.double().numpy(), 0, 1) * 255.0) / 255.0
    r, g, b = q[:, 0], q[:, 1], q[:, 2]
    return 16.0 + 219.0 * (KR * r + (1 - KR - KB) * g + KB * b)


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    r = int(3 * sigma + 0.5)
    x = torch.arange(-r, r + 1, dtype=img.dtype)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    c = img.shape[1]
    p = torch.nn.functional.pad(img, (r, r, r, r), mode="reflect")
    p = torch.nn.functional.conv2d(p, k.view(1, 1, 1, -1).expand(c, 1, 1, -1).contiguous(), groups=c)
    return torch.nn.functional.conv2d(p, k.view(1, 1, -1, 1).expand(c, 1, -1, 1).contiguous(), groups=c)


@pytest.fixture(scope="module")
def astro() -> torch.Tensor:
    return skimage_photo("astronaut")[..., 100:228, 180:308].contiguous()  # (1, 3, 128, 128): face + suit


# ------------------------------------------------------------------------------------------------
# Y conversion
# ------------------------------------------------------------------------------------------------


def test_rgb_to_y_pure_colours_match_bt601() -> None:
    colours = torch.tensor(
        [[0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0.5, 0.5, 0.5]], dtype=torch.float64
    )
    img = colours.view(-1, 3, 1, 1).expand(-1, 3, 2, 2)
    y = rgb_to_y(img)
    assert y.shape == (7, 1, 2, 2) and y.dtype == torch.float64
    kg = 1 - KR - KB
    expected = [0, 219, 219 * KR, 219 * kg, 219 * KB, 219 * (KR + kg), 219 * 0.5]
    for i, e in enumerate(expected):
        assert torch.allclose(y[i], torch.full_like(y[i], (16 + e) / 255), atol=1e-12), i


def test_rgb_to_y_range_and_dtype_on_photo(astro: torch.Tensor) -> None:
    y = rgb_to_y(astro)
    assert y.shape == (1, 1, 128, 128) and y.dtype == torch.float32
    assert y.min() >= 16 / 255 - 1e-6 and y.max() <= 235 / 255 + 1e-6
    assert np.allclose(y[:, 0].double().numpy() * 255, y_numpy(astro), atol=1e-3)  # astro is already 8-bit


# ------------------------------------------------------------------------------------------------
# PSNR
# ------------------------------------------------------------------------------------------------


def test_psnr_identical_is_infinite(astro: torch.Tensor) -> None:
    assert torch.isinf(psnr_y(astro, astro.clone(), crop_border=4)).all()


@pytest.mark.parametrize("sigma", [2.0, 10.0, 25.0])
def test_psnr_matches_independent_formula(astro: torch.Tensor, sigma: float) -> None:
    g = torch.Generator().manual_seed(int(sigma))
    noisy = (astro + torch.randn(astro.shape, generator=g) * sigma / 255).clamp(0, 1)
    hr = torch.cat([astro, astro.flip(-1)])
    sr = torch.cat([noisy, noisy.flip(-1)])
    c = 4
    ys, yh = y_numpy(sr)[:, c:-c, c:-c], y_numpy(hr)[:, c:-c, c:-c]
    mse = ((ys - yh) ** 2).mean(axis=(1, 2))
    expected = 10 * np.log10(255.0**2 / mse)
    got = psnr_y(sr, hr, crop_border=c)
    assert got.shape == (2,) and got.dtype == torch.float64
    assert np.allclose(got.numpy(), expected, atol=1e-9)
    # independent RGB noise of std sigma has std sigma * 219/255 * |(Kr, Kg, Kb)| on Y (clipping lowers it a little)
    sigma_y = sigma * 219 / 255 * np.sqrt(KR**2 + (1 - KR - KB) ** 2 + KB**2)
    assert abs(got[0].item() - 20 * np.log10(255 / sigma_y)) < 1.0
    skm = pytest.importorskip("skimage.metrics")
    assert abs(got[0].item() - skm.peak_signal_noise_ratio(yh[0], ys[0], data_range=255)) < 1e-9


def test_psnr_quantises_to_8_bit(astro: torch.Tensor) -> None:
    # below half a grey level the 8-bit images are identical
    assert torch.isinf(psnr_y(astro + 0.4 / 255, astro, crop_border=0)).all()
    assert torch.isfinite(psnr_y(astro + 0.6 / 255, astro, crop_border=0)).all()


def test_crop_border_removes_border(astro: torch.Tensor) -> None:
    sr = astro.clone()
    sr[..., :3, :] = 1 - sr[..., :3, :]
    sr[..., :, -3:] = 0.0
    assert torch.isfinite(psnr_y(sr, astro, crop_border=2)).all()
    assert torch.isinf(psnr_y(sr, astro, crop_border=3)).all()
    assert ssim_y(sr, astro, crop_border=2).item() < 1.0
    assert ssim_y(sr, astro, crop_border=3).item() == pytest.approx(1.0, abs=1e-12)


def test_metrics_reject_bad_inputs(astro: torch.Tensor) -> None:
    with pytest.raises(InvalidInputError):
        psnr_y(astro, astro[..., :64], crop_border=0)
    with pytest.raises(InvalidInputError):
        ssim_y(astro, astro, crop_border=60)  # 8x8 left, smaller than the 11x11 window
    with pytest.raises(InvalidInputError):
        psnr_y(astro, astro, crop_border=-1)


# ------------------------------------------------------------------------------------------------
# SSIM
# ------------------------------------------------------------------------------------------------


def test_ssim_identical_is_one(astro: torch.Tensor) -> None:
    assert ssim_y(astro, astro.clone(), crop_border=4).item() == pytest.approx(1.0, abs=1e-12)


def test_ssim_decreases_with_blur_and_stays_in_range(astro: torch.Tensor) -> None:
    values = [ssim_y(gaussian_blur(astro, s), astro, crop_border=4).item() for s in (0.5, 1.0, 2.0, 4.0)]
    assert all(-1 <= v <= 1 for v in values)
    assert values[0] < 1.0
    assert all(a > b for a, b in zip(values, values[1:], strict=False)), values
    inverted = ssim_y(1 - astro, astro, crop_border=4).item()
    assert -1 <= inverted < 0


def test_ssim_matches_scikit_image(astro: torch.Tensor) -> None:
    skm = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(0)
    sr = (gaussian_blur(astro, 1.2) + torch.randn(astro.shape, generator=g) * 0.02).clamp(0, 1)
    c = 4
    ys, yh = y_numpy(sr)[0, c:-c, c:-c], y_numpy(astro)[0, c:-c, c:-c]
    # Gaussian window sigma 1.5 (11x11), population covariances, L = 255: Wang et al.'s definition;
    # scikit-image averages only where the window fits, i.e. "valid" filtering.
    expected = skm.structural_similarity(
        ys, yh, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert ssim_y(sr, astro, crop_border=c).item() == pytest.approx(expected, abs=1e-9)


# ------------------------------------------------------------------------------------------------
# MATLAB bicubic resize (NIQE's second scale)
# ------------------------------------------------------------------------------------------------


def test_imresize_half_keeps_constants_and_ramps() -> None:
    assert np.allclose(imresize_matlab(np.full((20, 30), 7.5), 0.5), 7.5, atol=1e-12)
    ramp = np.tile(np.arange(40, dtype=np.float64), (24, 1))
    out = imresize_matlab(ramp, 0.5)
    assert out.shape == (12, 20)
    # output pixel i covers input pixels 2i and 2i+1; the cubic kernel reproduces linear functions
    inner = out[:, 3:-3]
    assert np.allclose(inner, 2 * np.arange(3, 17) + 0.5, atol=1e-12)


def test_imresize_matches_pillow_inside_and_reflects_at_borders() -> None:
    img = y_numpy(skimage_photo("coffee")[..., :96, :160])[0]
    out = imresize_matlab(img, 0.5)
    assert out.shape == (48, 80)
    # Pillow's bicubic is the same a = -0.5 kernel widened when shrinking; it clips at the borders instead
    pil = np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize((80, 48), Image.Resampling.BICUBIC))
    assert np.abs(out[3:-3, 3:-3] - pil[3:-3, 3:-3]).max() < 1e-3
    # symmetric reflection at the borders = resizing the image mirrored outwards by 8 pixels
    padded = np.pad(img, 8, mode="symmetric")
    assert np.allclose(imresize_matlab(padded, 0.5)[4:-4, 4:-4], out, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# NIQE
# ------------------------------------------------------------------------------------------------


def test_shipped_niqe_params_are_the_reference_file() -> None:
    shipped = ROOT / "realsr_core" / "training" / "niqe_pris_params.npz"
    assert hashlib.sha256(shipped.read_bytes()).hexdigest() == NIQE_META["niqe_pris_params"]["sha256"]
    assert (ROOT / "realsr_core" / "training" / "NIQE_NOTICE.txt").is_file()


@pytest.mark.parametrize("name", sorted(NIQE_META["inputs"]))
def test_niqe_reproduces_reference(name: str) -> None:
    spec = NIQE_META["inputs"][name]
    img = load_png(NIQE_DIR / spec["file"])[0]
    assert list(img.shape[1:]) == spec["shape_HWC"][:2]
    value = niqe(img)
    assert isinstance(value, float)
    assert value == pytest.approx(NIQE_META["outputs"][name]["value"], abs=NIQE_META["suggested_tolerance"]["atol"])


def test_niqe_batch_crop_border_and_degradation() -> None:
    img = load_png(NIQE_DIR / "niqe_chelsea.png")[..., :288, :384]
    blurred = gaussian_blur(img, 2.0)
    batch = niqe(torch.cat([img, blurred]))
    assert isinstance(batch, torch.Tensor) and batch.shape == (2,) and batch.dtype == torch.float64
    assert batch[0].item() == pytest.approx(niqe(img[0]), abs=1e-12)
    assert batch[1] > batch[0] + 1.0  # blur makes an image less natural
    # crop_border crops Y before the blocks are cut
    assert niqe(img, crop_border=8)[0].item() == pytest.approx(niqe(img[..., 8:-8, 8:-8])[0].item(), abs=1e-12)
    # values are quantised to 8 bit first
    assert niqe(img[0] + 0.3 / 255) == pytest.approx(niqe(img[0]), abs=1e-12)
    with pytest.raises(InvalidInputError):
        niqe(img[..., :96, :180])  # one whole block only
    assert quantize_8bit(img).max() <= 255
