"""Degradation pipelines (realsr_core.training.degradations) on real photos shipped in scikit-image."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import skimage_photo

from realsr_core.errors import InvalidInputError
from realsr_core.training import degradations as deg


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """Two different 128x128 photo crops, (2, 3, 128, 128) in [0, 1]."""
    a = skimage_photo("astronaut")[..., 160:288, 160:288]
    b = skimage_photo("coffee")[..., 120:248, 220:348]
    return torch.cat([a, b]).contiguous()


@pytest.fixture(scope="module")
def wide_photo() -> torch.Tensor:
    """A 192x384 crop of coffee(), with texture across its whole width."""
    return skimage_photo("coffee")[..., 100:292, 100:484].contiguous()


def _laplacian(img: torch.Tensor) -> torch.Tensor:
    c = img[..., 1:-1, 1:-1]
    return 4 * c - img[..., :-2, 1:-1] - img[..., 2:, 1:-1] - img[..., 1:-1, :-2] - img[..., 1:-1, 2:]


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / (a - b).pow(2).mean()))


# ------------------------------------------------------------------------------------------------
# every pipeline


@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("name", sorted(deg.DEGRADATIONS))
def test_pipeline_shape_range_and_determinism(name: str, scale: int, photos: torch.Tensor) -> None:
    fn = deg.DEGRADATIONS[name]
    lr = fn(photos, scale, _gen(0))
    assert lr.shape == (2, 3, 128 // scale, 128 // scale)
    assert lr.dtype == photos.dtype and lr.device == photos.device
    assert torch.isfinite(lr).all()
    assert lr.min() >= 0 and lr.max() <= 1
    assert torch.equal(lr, fn(photos, scale, _gen(0))), "same seed must give the same LR"
    if name != "bicubic":  # the one deterministic setting
        assert not torch.equal(lr, fn(photos, scale, _gen(1))), "another seed must give another LR"
    if name in ("bsrgan", "bsrgan_plus", "realesrgan", "camera", "bicubic"):
        # the originals end in 8 bit (a decoded JPEG / an explicit rounding)
        assert torch.allclose(lr * 255, (lr * 255).round(), atol=1e-4)
    # the LR still shows the photo: close to a clean downscale at the coarsest level
    clean = deg.bicubic_downscale(photos, scale)
    coarse = F.avg_pool2d(lr, 8 // scale * 2), F.avg_pool2d(clean, 8 // scale * 2)
    assert (coarse[0] - coarse[1]).abs().mean() < 0.12


def test_inputs_are_checked(photos: torch.Tensor) -> None:
    with pytest.raises(InvalidInputError):
        deg.classical(photos[..., :126, :], 4, sigma=1.0)
    with pytest.raises(InvalidInputError):
        deg.bsrgan(photos[:, :1], 4, _gen(0))
    with pytest.raises(InvalidInputError):
        deg.classical(photos, 4)


# ------------------------------------------------------------------------------------------------
# kernels


def _moments(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (x, y) and covariance of a kernel treated as a density on the tap grid."""
    size = k.shape[-1]
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    y, x = torch.meshgrid(ax, ax, indexing="ij")
    k = k.double()
    mx, my = (k * x).sum(), (k * y).sum()
    dx, dy = x - mx, y - my
    cov = torch.stack([torch.stack([(k * dx * dx).sum(), (k * dx * dy).sum()]),
                       torch.stack([(k * dx * dy).sum(), (k * dy * dy).sum()])])
    return torch.stack([mx, my]), cov


def test_isotropic_kernel() -> None:
    k = deg.isotropic_kernel(torch.tensor([0.2, 1.0, 2.0, 4.0]))
    assert k.shape == (4, 21, 21)
    assert torch.allclose(k.sum((-2, -1)), torch.ones(4), atol=1e-5)
    for ki in k:
        assert torch.allclose(ki, ki.flip(0)) and torch.allclose(ki, ki.flip(1)) and torch.allclose(ki, ki.T)
        assert ki.argmax() == 10 * 21 + 10
    mean, cov = _moments(k[2])
    assert mean.abs().max() < 1e-6
    assert cov[0, 0] == pytest.approx(4.0, rel=0.01) and cov[1, 1] == pytest.approx(4.0, rel=0.01)
    assert abs(float(cov[0, 1])) < 1e-6
    # width 0.2 is practically a delta
    assert k[0, 10, 10] > 0.99


@pytest.mark.parametrize(("theta", "l1", "l2"), [(math.pi / 6, 2.0, 0.8), (2.0, 0.5, 1.7), (0.0, 1.5, 1.0)])
def test_anisotropic_kernel_covariance(theta: float, l1: float, l2: float) -> None:
    k = deg.anisotropic_kernel(torch.tensor([theta]), torch.tensor([l1]), torch.tensor([l2]))[0]
    assert float(k.sum()) == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(k, k.flip(0).flip(1), atol=1e-7)   # point-symmetric
    mean, cov = _moments(k)
    assert mean.abs().max() < 1e-6
    # Σ = R(θ) diag(λ1², λ2²) R(θ)ᵀ: eigenvalue λ1² along (cos θ, sin θ), λ2² across it
    d1 = torch.tensor([math.cos(theta), math.sin(theta)], dtype=torch.float64)
    d2 = torch.tensor([-math.sin(theta), math.cos(theta)], dtype=torch.float64)
    assert float(d1 @ cov @ d1) == pytest.approx(l1 ** 2, rel=0.02)
    assert float(d2 @ cov @ d2) == pytest.approx(l2 ** 2, rel=0.02)
    assert abs(float(d1 @ cov @ d2)) < 0.01


def test_anisotropic_kernel_special_cases() -> None:
    iso = deg.isotropic_kernel(torch.tensor([1.3]))
    assert torch.allclose(deg.anisotropic_kernel(torch.tensor([0.7]), torch.tensor([1.3]), torch.tensor([1.3])), iso,
                          atol=1e-7)
    a = deg.anisotropic_kernel(torch.tensor([0.4]), torch.tensor([2.5]), torch.tensor([0.6]))
    b = deg.anisotropic_kernel(torch.tensor([0.4 + math.pi]), torch.tensor([2.5]), torch.tensor([0.6]))
    c = deg.anisotropic_kernel(torch.tensor([0.4 + math.pi / 2]), torch.tensor([0.6]), torch.tensor([2.5]))
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a, c, atol=1e-6)
    # rotating by 90° transposes (x <-> y) a kernel whose axes are x and y
    d = deg.anisotropic_kernel(torch.tensor([0.0]), torch.tensor([2.5]), torch.tensor([0.6]))
    e = deg.anisotropic_kernel(torch.tensor([math.pi / 2]), torch.tensor([2.5]), torch.tensor([0.6]))
    assert torch.allclose(d[0].T, e[0], atol=1e-6)
    assert d[0, 10, 15] > d[0, 15, 10]   # long axis along x (columns) at θ = 0


# ------------------------------------------------------------------------------------------------
# classical model, Eq. (1)


def test_bicubic_downscale_is_matlab_imresize_inside() -> None:
    """Antialiased bicubic = Keys' cubic (a = -0.5) widened by the factor, as MATLAB's imresize."""
    row = skimage_photo("astronaut")[0, 0, 200, :96].double().numpy()

    def cubic(t: np.ndarray) -> np.ndarray:
        t = np.abs(t)
        return np.where(t <= 1, 1.5 * t**3 - 2.5 * t**2 + 1, np.where(t < 2, -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2, 0))

    for s in (2, 4):
        i = np.arange(row.size)
        ref = []
        for j in range(row.size // s):
            w = cubic((i - ((j + 0.5) * s - 0.5)) / s)
            ref.append((w * row).sum() / w.sum())
        got = deg.bicubic_downscale(torch.from_numpy(row).float().view(1, 1, 1, -1).expand(1, 1, 4, -1), s)[0, 0, 0]
        assert np.abs(np.array(ref) - got.double().numpy())[2:-2].max() < 1e-5


def test_classical_tiny_blur_no_noise_is_bicubic(photos: torch.Tensor) -> None:
    lr = deg.classical(photos, 4, sigma=0.2, noise=0.0)
    ref = F.interpolate(photos, size=(32, 32), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    assert _psnr(lr, ref) > 50
    # a real blur is visibly different
    assert _psnr(deg.classical(photos, 4, sigma=2.0, noise=0.0), ref) < 35


def test_classical_noise_level_in_255_units() -> None:
    flat = torch.full((2, 3, 128, 128), 0.5)
    lr = deg.classical(flat, 4, sigma=2.0, noise=torch.tensor([15.0, 40.0]), generator=_gen(3))
    std = (lr - 0.5).flatten(1).std(1) * 255
    assert float(std[0]) == pytest.approx(15.0, rel=0.06)
    assert float(std[1]) == pytest.approx(40.0, rel=0.06)
    assert torch.allclose(deg.classical(flat, 4, sigma=2.0, noise=0.0), torch.full((2, 3, 32, 32), 0.5), atol=1e-6)


def test_classical_kernel_argument_matches_sigma(photos: torch.Tensor) -> None:
    by_sigma = deg.classical(photos, 2, sigma=1.7, noise=0.0)
    by_kernel = deg.classical(photos, 2, kernel=deg.isotropic_kernel(1.7), noise=0.0)
    assert torch.allclose(by_sigma, by_kernel, atol=1e-5)


def test_classical_per_sample_parameters() -> None:
    hr = skimage_photo("astronaut")[..., 160:288, 160:288].expand(2, -1, -1, -1).contiguous()
    lr = deg.classical(hr, 4, sigma=torch.tensor([0.5, 3.0]), noise=0.0)
    hf = _laplacian(lr).pow(2).flatten(1).mean(1)
    assert hf[1] < 0.5 * hf[0], "the wider kernel must remove more detail"


def test_classical_samplers_follow_the_paper() -> None:
    iso = deg.sample_classical_iso_params(20000, _gen(0))
    aniso = deg.sample_classical_aniso_params(20000, _gen(0))
    for values, (lo, hi) in [(iso["sigma"], (0.2, 4.0)), (iso["noise"], (0.0, 75.0)),
                             (aniso["theta"], (0.0, math.pi)), (aniso["lambda1"], (0.2, 4.0)),
                             (aniso["lambda2"], (0.2, 4.0)), (aniso["noise"], (0.0, 25.0))]:
        assert values.min() >= lo and values.max() <= hi
        span = hi - lo
        # uniform: reaches both ends and has the uniform mean and std
        assert values.min() < lo + 0.01 * span and values.max() > hi - 0.01 * span
        assert float(values.mean()) == pytest.approx((lo + hi) / 2, abs=0.01 * span)
        assert float(values.std()) == pytest.approx(span / math.sqrt(12), rel=0.03)
    assert not torch.allclose(aniso["lambda1"], aniso["lambda2"])


def test_random_classical_batch_has_per_sample_parameters() -> None:
    hr = skimage_photo("coffee")[..., 120:248, 220:348].expand(2, -1, -1, -1).contiguous()
    lr, p = deg.random_classical_iso(hr, 4, _gen(5), return_params=True)
    assert p["sigma"][0] != p["sigma"][1] and p["noise"][0] != p["noise"][1]
    assert not torch.equal(lr[0], lr[1])
    again = deg.classical(hr, 4, sigma=p["sigma"], noise=0.0)
    # the returned parameters are the ones used: the noise-free LR explains the output up to the noise
    resid = (lr - again).flatten(1).std(1) * 255
    for i in range(2):
        assert float(resid[i]) == pytest.approx(float(p["noise"][i]), rel=0.25, abs=1.0)
    lr, p = deg.random_classical_aniso(hr, 2, _gen(5), return_params=True)
    assert lr.shape == (2, 3, 64, 64)
    for key in ("theta", "lambda1", "lambda2", "noise"):
        assert p[key].shape == (2,) and p[key][0] != p[key][1]


# ------------------------------------------------------------------------------------------------
# spatially variant


def test_spatially_variant_parameters_ramp() -> None:
    flat = torch.full((1, 3, 16, 96), 0.5)
    _, p = deg.spatially_variant(flat, 4, generator=_gen(0), return_params=True)
    assert p["sigma"].shape == (96,) and p["noise"].shape == (24,)
    for v, (lo, hi) in ((p["sigma"], (0.2, 4.0)), (p["noise"], (5.0, 50.0))):
        assert (v.diff() > 0).all() and v.min() >= lo and v.max() <= hi
        assert v[0] < lo + 0.05 * (hi - lo) and v[-1] > hi - 0.05 * (hi - lo)


def test_spatially_variant_noise_grows_left_to_right() -> None:
    flat = torch.full((2, 3, 64, 384), 0.5)
    lr, p = deg.spatially_variant(flat, 4, generator=_gen(1), return_params=True)
    resid = lr - 0.5   # a flat image stays flat under any blur: what is left is the noise
    w = lr.shape[-1]
    stds = [float(resid[..., t * w // 3:(t + 1) * w // 3].std()) * 255 for t in range(3)]
    assert stds[0] < stds[1] < stds[2]
    for t in range(3):
        expected = float(p["noise"][t * w // 3:(t + 1) * w // 3].pow(2).mean().sqrt())
        assert stds[t] == pytest.approx(expected, rel=0.08)


def test_spatially_variant_blur_grows_left_to_right(wide_photo: torch.Tensor) -> None:
    lr = deg.spatially_variant(wide_photo, 4, noise_range=(0.0, 0.0))
    clean = deg.bicubic_downscale(wide_photo, 4)
    w = lr.shape[-1]
    ratios = []
    for t in range(3):
        sl = slice(t * w // 3, (t + 1) * w // 3)
        ratios.append(float(_laplacian(lr)[..., sl].pow(2).mean() / _laplacian(clean)[..., sl].pow(2).mean()))
    # share of the clean LR's detail that survives: falls from left to right
    assert 1.0 > ratios[0] > ratios[1] > ratios[2]
    assert ratios[2] < 0.5 * ratios[0]


def test_spatially_variant_matches_per_column_gaussian(wide_photo: torch.Tensor) -> None:
    """The kernel bank + interpolation equals blurring each column with its own width."""
    lr, p = deg.spatially_variant(wide_photo, 4, noise_range=(0.0, 0.0), return_params=True)
    for j in (10, 40, 70):
        sigma = float(p["sigma"][4 * j:4 * j + 4].mean())
        ref = deg.classical(wide_photo, 4, sigma=sigma, noise=0.0)
        assert (lr[..., j] - ref[..., j]).abs().max() < 3e-3


# ------------------------------------------------------------------------------------------------
# BSRGAN and Real-ESRGAN


def _bsrgan_records(fn, seeds: range, scale: int = 4) -> list[dict]:
    hr = skimage_photo("astronaut")[..., 128:384, 128:384]
    hr = F.interpolate(hr, size=(48, 48), mode="area").expand(6, -1, -1, -1).contiguous()
    recs: list[dict] = []
    for s in seeds:
        _, r = fn(hr, scale, _gen(s), return_params=True)
        recs.extend(r)
    return recs


def test_bsrgan_parameters_in_published_ranges() -> None:
    recs = _bsrgan_records(deg.bsrgan, range(6))
    ops = [op for r in recs for op in r["ops"]]
    jpeg = [op["quality"] for op in ops if op["op"] == "jpeg"]
    noise = [op["level"] for op in ops if op["op"] == "gaussian_noise"]
    blur = [op for op in ops if op["op"] == "blur"]
    assert all(30 <= q <= 95 for q in jpeg) and len(set(jpeg)) > 10
    assert all(2 <= v <= 25 for v in noise) and len(set(noise)) > 5
    assert {op["mode"] for op in ops if op["op"] == "gaussian_noise"} == {"color", "gray", "correlated"}
    for op in blur:
        assert op["size"] % 2 == 1 and 7 <= op["size"] <= 25
        if op["kind"] == "aniso":
            assert 0 <= op["theta"] <= math.pi and 0 <= op["l1"] <= 8 and 0 <= op["l2"] <= 8
        else:
            assert 0 <= op["sigma"] <= 2.8
    assert {op["kind"] for op in blur} == {"iso", "aniso"}
    for r in recs:
        order = r["order"]
        assert sorted(order) == list(range(7)) and order.index(2) < order.index(3)
        assert r["ops"][-1]["op"] == "jpeg"   # the final JPEG is always there
        names = [op["op"] for op in r["ops"]]
        assert names.count("blur") == 2 and names.count("downsample2") == 1 and names.count("downsample3") == 1
    ds2 = [op for op in ops if op["op"] == "downsample2"]
    assert {op["kind"] for op in ds2} == {"resize", "shifted_blur"}
    assert all(1.0 <= op["factor"] <= 8.0 for op in ds2 if op["kind"] == "resize")


def test_bsrgan_plus_parameters_in_published_ranges() -> None:
    recs = _bsrgan_records(deg.bsrgan_plus, range(4))
    ops = [op for r in recs for op in r["ops"]]
    assert all(30 <= op["quality"] <= 95 for op in ops if op["op"] == "jpeg")
    assert all(2 <= op["level"] <= 25 for op in ops if op["op"] in ("gaussian_noise", "speckle_noise"))
    assert all(100 <= op["vals"] <= 1e4 for op in ops if op["op"] == "poisson_noise")
    assert all(0.125 <= op["factor"] <= 2.0 for op in ops if op["op"] == "resize")
    for r in recs:
        assert sorted(r["order"]) == list(range(13))
        names = [op["op"] for op in r["ops"]]
        assert names.count("blur") == 2 and names.count("resize") == 2 and names.count("gaussian_noise") == 2
        assert names[-2:] == ["final_resize", "jpeg"]


def test_bsrgan_batch_images_get_their_own_degradation(photos: torch.Tensor) -> None:
    hr = photos[:1].expand(2, -1, -1, -1).contiguous()
    lr, recs = deg.bsrgan(hr, 4, _gen(2), return_params=True)
    assert recs[0] != recs[1] and not torch.equal(lr[0], lr[1])
    # the same image alone with the same stream of draws gives the same LR as the first of the batch
    assert torch.equal(deg.bsrgan(hr[:1], 4, _gen(2)), lr[:1])


def test_bsrgan_shifted_blur_keeps_the_block_centres() -> None:
    """The analytic kernel shift aligns blur + nearest decimation with the block centres (bicubic's grid)."""
    ramp = (torch.arange(128.0) / 128).view(1, 1, 1, 128).expand(1, 3, 64, 128).contiguous()
    for sf in (2, 4):
        s = torch.tensor([1.0], dtype=torch.float64)
        k = deg._normalise(torch.exp(-0.5 * deg._mahalanobis(25, s, s, torch.zeros(1, dtype=torch.float64),
                                                             shift=(sf - 1) / 2)))
        assert torch.allclose(k.sum(), torch.tensor(1.0))
        mean, _ = _moments(k[0])
        assert torch.allclose(mean, torch.full((2,), (sf - 1) / 2, dtype=torch.float64), atol=1e-6)
        dec = deg._filter(ramp, k)[..., 0::sf, 0::sf]
        ref = deg.bicubic_downscale(ramp, sf)
        assert (dec - ref)[..., 4:-4, 4:-4].abs().max() < 1e-4


def test_realesrgan_parameters_in_published_ranges() -> None:
    hr = F.interpolate(skimage_photo("coffee")[..., :256, 100:356], size=(32, 32), mode="area")
    hr = hr.expand(48, -1, -1, -1).contiguous()
    kinds, finals, noise_types = set(), set(), set()
    for seed in range(6):
        lr, p = deg.realesrgan(hr, 4, _gen(seed), return_params=True)
        assert lr.shape == (48, 3, 8, 8)
        for key in ("kernel1", "kernel2", "sinc_kernel"):
            k = p[key]
            assert k.shape == (48, 21, 21)
            assert torch.allclose(k.sum((-2, -1)), torch.ones(48), atol=1e-5)
        for info, (lo, hi) in ((p["kernel1_info"], (0.2, 3.0)), (p["kernel2_info"], (0.2, 1.5))):
            for r in info:
                kinds.add(r["type"])
                assert r["size"] % 2 == 1 and 7 <= r["size"] <= 21
                if r["type"] == "sinc":
                    assert math.pi / 5 <= r["cutoff"] <= math.pi
                    continue
                assert lo <= r["sigma_x"] <= hi and lo <= r["sigma_y"] <= hi and -math.pi <= r["theta"] <= math.pi
                if r["type"].startswith("generalized"):
                    assert 0.5 <= r["beta"] <= 4.0
                if r["type"].startswith("plateau"):
                    assert 1.0 <= r["beta"] <= 2.0
        for r in p["sinc_info"]:
            finals.add(r["type"])
            if r["type"] == "sinc":
                assert math.pi / 3 <= r["cutoff"] <= math.pi
        assert all(30 <= q <= 95 for q in p["jpeg1"] + p["jpeg2"])
        assert 0.15 <= p["resize1"]["factor"] <= 1.5 and 0.3 <= p["resize2"]["factor"] <= 1.2
        for key, (g_hi, p_hi) in (("noise1", (30.0, 3.0)), ("noise2", (25.0, 2.5))):
            n = p[key]
            noise_types.add(n["type"])
            if n["type"] == "gaussian":
                assert n["sigma"].min() >= 1.0 and n["sigma"].max() <= g_hi
            else:
                assert n["scale"].min() >= 0.05 and n["scale"].max() <= p_hi
            assert 0 < n["gray"].float().mean() < 1   # gray noise for some images only (p 0.4)
    assert {"iso", "aniso", "sinc"} <= kinds and len(kinds) >= 5
    assert finals == {"sinc", "pulse"} and noise_types == {"gaussian", "poisson"}


# ------------------------------------------------------------------------------------------------
# building blocks


def test_disk_kernel() -> None:
    k = deg.disk_kernel(torch.tensor([0.0, 1.0, 2.5, 5.0]))
    assert k.shape == (4, 21, 21)
    assert torch.allclose(k.sum(dim=(-2, -1)), torch.ones(4))
    assert k[0, 10, 10] == 1  # radius 0: the identity
    assert torch.equal(k, k.flip(-1)) and torch.equal(k, k.transpose(-2, -1))  # a disk is round
    # nonzero taps cover about the disk's area (antialiased edge: within one ring of taps)
    for r, kr in zip([1.0, 2.5, 5.0], k[1:], strict=True):
        area = float((kr > 0).sum())
        assert math.pi * r**2 <= area <= math.pi * (r + 1.5) ** 2
    flat = k[3][k[3] > 0.9 * k[3].max()]
    assert flat.numel() >= 60  # a pill-box: flat inside, unlike a Gaussian
    with pytest.raises(InvalidInputError, match="radius"):
        deg.disk_kernel(11.0)


def test_camera_parameters_and_low_noise(photos: torch.Tensor) -> None:
    hr = photos[:1].expand(24, -1, -1, -1).contiguous()
    lr, p = deg.camera(hr, 4, _gen(3), return_params=True)
    for key, rng in [("radius", deg.CAMERA_DISK_RADIUS_RANGE), ("psf_sigma", deg.CAMERA_PSF_SIGMA_RANGE),
                     ("shot", deg.CAMERA_SHOT_NOISE_RANGE), ("read", deg.CAMERA_READ_NOISE_RANGE),
                     ("quality", deg.CAMERA_JPEG_RANGE)]:
        assert p[key].shape == (24,) and p[key].unique().numel() > 5
        assert rng[0] <= p[key].min() and p[key].max() <= rng[1], key
    # every image of the batch got its own degradation
    assert all(not torch.equal(lr[0], lr[i]) for i in range(1, 24))
    # little noise: on a flat mid-grey field the LR varies at a camera's level, far below Real-ESRGAN's
    grey = torch.full((4, 3, 64, 64), 0.5)
    noise_camera = float(deg.camera(grey, 4, _gen(0)).std(dim=(-2, -1)).max()) * 255
    noise_resr = float(deg.realesrgan(grey, 4, _gen(0)).std(dim=(-2, -1)).mean()) * 255
    assert 0.2 < noise_camera < 4.0 < noise_resr
    # the sharpest lens is still softer than a plain area downscale, the softest much softer
    sharp = float(_laplacian(deg.camera(photos, 4, _gen(0))).abs().mean())
    area = float(_laplacian(F.avg_pool2d(photos, 4)).abs().mean())
    assert sharp < area


def test_jpeg_and_usm_sharpen(photos: torch.Tensor) -> None:
    low = deg.jpeg_compress(photos, 30)
    high = deg.jpeg_compress(photos, [95, 95])
    assert _psnr(high, photos) > _psnr(low, photos) + 5
    assert torch.allclose(low * 255, (low * 255).round(), atol=1e-4)
    sharp = deg.usm_sharpen(photos)
    assert sharp.min() >= 0 and sharp.max() <= 1
    assert _laplacian(sharp).pow(2).mean() > 1.2 * _laplacian(photos).pow(2).mean()
    flat = torch.full((1, 3, 64, 64), 0.3)
    assert torch.allclose(deg.usm_sharpen(flat), flat, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_image_with_cpu_generator(photos: torch.Tensor) -> None:
    for name in ("classical_iso", "spatially_variant", "realesrgan"):
        cpu = deg.DEGRADATIONS[name](photos, 4, _gen(7))
        gpu = deg.DEGRADATIONS[name](photos.cuda(), 4, _gen(7))
        assert gpu.device.type == "cuda"
        # same draws; only float rounding (and an occasional JPEG block it flips) differs
        assert (gpu.cpu() - cpu).abs().mean() < 2e-3
