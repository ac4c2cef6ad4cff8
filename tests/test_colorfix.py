"""Colour fix against the StableSR fixtures, plus the color_fix wrapper's behaviour."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from realsr_core.colorfix import adain, color_fix, wavelet_decomposition, wavelet_reconstruction
from realsr_core.errors import InvalidInputError

FIXTURES = Path(__file__).parent / "fixtures" / "colorfix"
META = json.loads((FIXTURES / "meta.json").read_text())


def load_png(name: str, value_range: str) -> Tensor:
    """(1, 3, H, W) float32 from a fixture PNG, in [0, 1] ('01') or [-1, 1] ('pm1')."""
    arr = np.asarray(Image.open(FIXTURES / name).convert("RGB"), dtype=np.float32) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()
    return x * 2 - 1 if value_range == "pm1" else x


FUNCS = {"wavelet": wavelet_reconstruction, "adain": adain}


@pytest.mark.parametrize("key", sorted(META["outputs"]))
def test_fixture_outputs(key: str) -> None:
    pair, method, value_range = key.split("_")
    spec = META["outputs"][key]
    content = load_png(f"{pair}_content.png", value_range)
    style = load_png(f"{pair}_style.png", value_range)
    expected = torch.from_numpy(np.load(FIXTURES / spec["out"]["file"]))
    assert list(expected.shape) == spec["out"]["shape"]

    out = FUNCS[method](content, style)
    atol = spec["suggested_tolerance"]["atol"]
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert (out - expected).abs().max().item() <= atol

    # The public wrapper gives the same answer for same-size inputs at full strength.
    wrapped = color_fix(content, style, method=method)
    assert (wrapped - expected).abs().max().item() <= atol

    # float64 (the fixtures' compute dtype) agrees too.
    out64 = FUNCS[method](content.double(), style.double())
    assert (out64 - expected.double()).abs().max().item() <= atol


def test_decomposition_sums_back() -> None:
    x = load_png("pair1_content.png", "01").double()
    high, low = wavelet_decomposition(x)
    assert torch.allclose(high + low, x, atol=1e-12)
    # The low band is smooth: much smaller gradient energy than the image.
    assert low.diff(dim=-1).abs().mean() < 0.2 * x.diff(dim=-1).abs().mean()


@pytest.mark.parametrize("method", ["wavelet", "adain"])
def test_batch_equals_singles(method: str) -> None:
    c1, s1 = load_png("pair1_content.png", "pm1"), load_png("pair1_style.png", "pm1")
    c2, s2 = load_png("pair2_content.png", "pm1"), load_png("pair2_style.png", "pm1")
    batched = color_fix(torch.cat([c1, c2]), torch.cat([s1, s2]), method=method)
    singles = torch.cat([color_fix(c1, s1, method=method), color_fix(c2, s2, method=method)])
    assert torch.allclose(batched, singles, atol=1e-6)

    # A batch-1 reference is applied to every image.
    shared = color_fix(torch.cat([c1, c2]), s1, method=method)
    assert torch.allclose(shared[1:], color_fix(c2, s1, method=method), atol=1e-6)


@pytest.mark.parametrize("method", ["wavelet", "adain"])
def test_reference_of_other_size_is_resized(method: str) -> None:
    content = load_png("pair1_content.png", "01")
    style = load_png("pair1_style.png", "01")
    small = F.interpolate(style, scale_factor=0.25, mode="area")  # (1,3,24,32), like an LR input
    expected = FUNCS[method](content, F.interpolate(small, size=(96, 128), mode="bicubic", align_corners=False))
    out = color_fix(content, small, method=method)
    assert out.shape == content.shape
    assert torch.allclose(out, expected, atol=1e-6)

    # A larger reference is shrunk (antialiased) and still gives an image-sized result close to
    # using the same-size reference.
    big = F.interpolate(style, scale_factor=2.0, mode="bicubic", align_corners=False)
    out_big = color_fix(content, big, method=method)
    assert out_big.shape == content.shape
    assert (out_big - color_fix(content, style, method=method)).abs().mean() < 0.02


def test_strength() -> None:
    content = load_png("pair2_content.png", "pm1")
    style = load_png("pair2_style.png", "pm1")
    for method in ("wavelet", "adain"):
        zero = color_fix(content, style, method=method, strength=0.0)
        assert torch.equal(zero, content) and zero.data_ptr() != content.data_ptr()
        full = color_fix(content, style, method=method, strength=1.0)
        assert torch.equal(full, FUNCS[method](content, style))
        half = color_fix(content, style, method=method, strength=0.5)
        assert torch.allclose(half, 0.5 * (content + full), atol=1e-6)
        assert not torch.allclose(half, full, atol=1e-3)


def test_channel_counts_and_dtypes() -> None:
    g = torch.Generator().manual_seed(0)
    for channels in (1, 4):
        image = torch.rand(2, channels, 20, 24, generator=g)
        ref = torch.rand(1, channels, 10, 12, generator=g) * 0.5
        for method in ("wavelet", "adain"):
            out = color_fix(image, ref, method=method)
            assert out.shape == image.shape
            assert torch.isfinite(out).all()
    # adain matches the reference statistics per channel.
    image = torch.rand(1, 4, 20, 24, generator=g)
    ref = torch.rand(1, 4, 30, 10, generator=g) * 0.5 + 0.2
    out = adain(image, ref)
    assert torch.allclose(out.mean(dim=(2, 3)), ref.mean(dim=(2, 3)), atol=1e-5)
    # Half precision in, half precision out.
    half = color_fix(image.half(), ref.half(), method="adain")
    assert half.dtype == torch.float16
    assert (half.float() - color_fix(image, ref, method="adain")).abs().max() < 1e-2


def test_refusals() -> None:
    image = torch.rand(1, 3, 16, 16)
    ref = torch.rand(1, 3, 16, 16)
    with pytest.raises(InvalidInputError, match="method"):
        color_fix(image, ref, method="histogram")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="strength"):
        color_fix(image, ref, strength=1.5)
    with pytest.raises(InvalidInputError, match="strength"):
        color_fix(image, ref, strength=-0.1)
    with pytest.raises(InvalidInputError, match="strength"):
        color_fix(image, ref, strength=float("nan"))
    with pytest.raises(InvalidInputError, match="channel"):
        color_fix(image, torch.rand(1, 1, 16, 16))
    with pytest.raises(InvalidInputError, match="batch"):
        color_fix(torch.rand(3, 3, 16, 16), torch.rand(2, 3, 16, 16))
    with pytest.raises(InvalidInputError, match=r"\(B, C, H, W\)"):
        color_fix(torch.rand(3, 16, 16), ref)
    with pytest.raises(InvalidInputError, match="floating"):
        color_fix(image, (ref * 255).to(torch.uint8))
    with pytest.raises(InvalidInputError, match="same height and width"):
        wavelet_reconstruction(image, torch.rand(1, 3, 8, 8))
