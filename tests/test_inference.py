"""The public upscale path on real photos: tiling vs whole image, channels, batches, refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import fixture_state_dict, skimage_photo

from realsr_core import Cancelled, InvalidInputError, load_model, upscale
from realsr_core.models.mmrealsr import MMRealSRNet

# Receptive-field radius of the small MM-RealSR below, in LR pixels: conv_first (1) + one RRDB
# (3 dense blocks x 5 convs = 15) + conv_body (1), then four convs at 2x / 4x (< 2 LR px).
SMALL_RF = 19


@pytest.fixture(scope="module")
def small_mmrealsr():
    """A small MM-RealSR (our own network, random weights) loaded back through the registry."""
    torch.manual_seed(0)
    net = MMRealSRNet(num_feat=16, num_block=1, num_grow_ch=8, embed_dim=32,
                      de_num_feats=(16, 32), de_num_blocks=(1, 1), de_downscales=(2, 1), de_hidden_dim=32)
    return load_model(net.state_dict())


@pytest.fixture(scope="module")
def femasr_x4():
    return load_model({"params": fixture_state_dict("femasr_x4")})


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    return skimage_photo("astronaut")[:, :, 100:164, 180:260]  # 64x80 face crop


def test_tiled_equals_whole_without_normalisation(small_mmrealsr, photo) -> None:
    whole = upscale(small_mmrealsr, photo, tile=None, blur=0.3, noise=0.6).image
    for tile, tpb in ((32, 1), (40, 3)):
        res = upscale(small_mmrealsr, photo, tile=tile, overlap=8, context=SMALL_RF + 2, tiles_per_batch=tpb,
                      blur=0.3, noise=0.6)
        assert res.tile == tile
        assert (res.image - whole).abs().max().item() < 1e-5
    # Too little context shows seams: the comparison above can fail.
    short = upscale(small_mmrealsr, photo, tile=32, overlap=8, context=2, blur=0.3, noise=0.6).image
    assert (short - whole).abs().max().item() > 1e-4


def test_mmrealsr_scores_estimated_once_for_all_tiles(small_mmrealsr, photo) -> None:
    whole = upscale(small_mmrealsr, photo, tile=None)
    tiled = upscale(small_mmrealsr, photo, tile=32, overlap=8, context=SMALL_RF + 2)
    est = whole.context[0]["degrees"]
    assert torch.equal(tiled.context[0]["degrees"], est)
    assert (tiled.image - whole.image).abs().max().item() < 1e-5
    # The scores used are the whole image's, not each tile's own estimate.
    tile_est = small_mmrealsr.prepare(photo[:, :, :32, :32])["degrees"]
    assert not torch.allclose(tile_est, est, atol=1e-4)
    # A user score replaces the estimate on that axis only.
    user = upscale(small_mmrealsr, photo, tile=None, blur=1.0)
    assert user.context[0]["degrees"][0, 0].item() == 1.0
    assert user.context[0]["degrees"][0, 1].item() == pytest.approx(est[0, 1].item())


def test_femasr_tiled_stays_close_to_whole(femasr_x4) -> None:
    """FeMaSR has GroupNorm and a codebook: tiles differ slightly; the bound is measured, not ideal.

    With the fixture's random weights the output is mostly saturated, so the bound is on the share
    of output pixels that differ by more than 0.1 after clamping.
    """
    x = skimage_photo("coffee")[:, :, 100:180, 200:280]  # 80x80
    whole = upscale(femasr_x4, x, tile=None).image
    tiled = upscale(femasr_x4, x, tile=48, overlap=16, context=8).image
    assert tiled.shape == whole.shape == (1, 3, 320, 320)
    share = ((tiled - whole).abs() > 0.1).float().mean().item()
    assert share < 0.15, share


def test_batch_equals_single_images(small_mmrealsr) -> None:
    a = skimage_photo("chelsea")[:, :, :48, :64]
    b = skimage_photo("coffee")[:, :, :48, :64]
    both = upscale(small_mmrealsr, torch.cat([a, b]), tile=32, context=SMALL_RF + 2)
    one = upscale(small_mmrealsr, a, tile=32, context=SMALL_RF + 2)
    two = upscale(small_mmrealsr, b, tile=32, context=SMALL_RF + 2)
    assert torch.allclose(both.image, torch.cat([one.image, two.image]), atol=1e-6)
    # Each image keeps its own estimated scores.
    assert torch.equal(both.context[1]["degrees"], two.context[0]["degrees"])


def test_rgba_alpha_upscaled_separately(small_mmrealsr, photo) -> None:
    h, w = photo.shape[-2:]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    alpha = ((xx**2 + yy**2) < 0.5).float()[None, None]
    rgba = torch.cat([photo, alpha], 1)
    rgb_only = upscale(small_mmrealsr, photo, tile=None, blur=0.5, noise=0.5).image
    out = upscale(small_mmrealsr, rgba, tile=None, blur=0.5, noise=0.5).image
    assert out.shape == (1, 4, 4 * h, 4 * w)
    assert torch.allclose(out[:, :3], rgb_only, atol=1e-6)  # alpha does not leak into colour
    expected_alpha = F.interpolate(alpha, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
    assert torch.allclose(out[:, 3:], expected_alpha, atol=1e-6)
    through_model = upscale(small_mmrealsr, rgba, tile=None, blur=0.5, noise=0.5, alpha="model").image
    assert through_model.shape == out.shape and not torch.equal(through_model[:, 3:], out[:, 3:])


def test_grayscale_stays_gray(small_mmrealsr, photo) -> None:
    gray = photo.mean(1, keepdim=True)
    out = upscale(small_mmrealsr, gray, tile=None, blur=0.5, noise=0.5).image
    assert out.shape == (1, 1, 4 * gray.shape[2], 4 * gray.shape[3])
    as_rgb = upscale(small_mmrealsr, gray.expand(1, 3, -1, -1), tile=None, blur=0.5, noise=0.5).image
    assert torch.allclose(out, as_rgb.mean(1, keepdim=True), atol=1e-6)


def test_refusals(femasr_x4, small_mmrealsr, photo) -> None:
    nan = photo.clone()
    nan[0, 1, 5, 5] = float("nan")
    with pytest.raises(InvalidInputError, match="NaN"):
        upscale(small_mmrealsr, nan)
    tiny = photo[:, :, :4, :4]
    with pytest.raises(InvalidInputError, match=f"at least {femasr_x4.min_size}"):
        upscale(femasr_x4, tiny)
    with pytest.raises(InvalidInputError, match="channels"):
        upscale(small_mmrealsr, torch.rand(1, 5, 32, 32))
    with pytest.raises(InvalidInputError, match=r"\[0, 1\]"):
        upscale(small_mmrealsr, photo, blur=1.5)


def test_progress_and_cancel(small_mmrealsr, photo) -> None:
    calls: list[tuple[int, int]] = []
    upscale(small_mmrealsr, torch.cat([photo, photo]), tile=32, context=8, progress=lambda d, t: calls.append((d, t)))
    totals = {t for _, t in calls}
    assert len(totals) == 1 and calls[-1][0] == calls[-1][1] == totals.pop()
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    seen = []

    def cancel() -> bool:
        seen.append(1)
        return len(seen) > 2

    with pytest.raises(Cancelled):
        upscale(small_mmrealsr, photo, tile=32, context=8, cancel=cancel)
    assert len(seen) == 3  # stopped at the third tile check, not after the whole image


def test_auto_tile_respects_memory_budget(small_mmrealsr, photo) -> None:
    # The budget must hold the tile's window: the tile plus its 16 px context on each side.
    res = upscale(small_mmrealsr, photo, tile="auto", memory_budget=int(small_mmrealsr.bytes_per_px * (32 + 32) ** 2))
    assert res.tile == 32  # the 64x80 photo would need 5120 px at once: it is tiled
    whole = upscale(small_mmrealsr, photo, tile="auto", memory_budget=2**40)
    assert whole.tile is None
