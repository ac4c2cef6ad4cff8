"""FeMaSR x4 / x2 / HRP against the official-code oracle fixtures (tests/fixtures/femasr_*).

Weights are rebuilt with ``tests/fixtures/make_weights.py``; every model is built once per module.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import make_weights
from PIL import Image
from torch import nn

from realsr_core.errors import InvalidInputError, UnsupportedModelError
from realsr_core.models import femasr
from realsr_core.models.blocks.gn_resblock import group_norm
from realsr_core.models.blocks.swin import shifted_window_mask, window_plan
from realsr_core.models.blocks.vq import nearest_code
from realsr_core.models.femasr.network import nearest_up_conv_weight

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CASES = ("femasr_x4", "femasr_x2", "femasr_hrp")
EXPECTED = {  # (scale, stem channels, stride-2 blocks, purpose, name, size_multiple)
    "femasr_x4": (4, 256, (256,), "SR", "FeMaSR x4", 16),
    "femasr_x2": (2, 128, (256, 256), "SR", "FeMaSR x2", 32),
    "femasr_hrp": (1, 64, (128, 256, 256), "Restoration", "FeMaSR HRP", 64),
}




MW = make_weights


def _manifest(name: str) -> dict[str, Any]:
    return MW.load_manifest(str(FIXTURES / name / "manifest.json"))


def _state_dict(name: str) -> dict[str, torch.Tensor]:
    man = _manifest(name)
    return MW.make_state_dict(man, man["seed"])


def _meta_state_dict(name: str) -> dict[str, torch.Tensor]:
    """Shapes only (meta tensors): enough for detection and configuration inference."""
    return {k: torch.empty(shape, device="meta") for k, shape, _ in _manifest(name)["keys"]}


def _png(path: Path) -> torch.Tensor:
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())[None]


class Case:
    def __init__(self, name: str) -> None:
        self.name = name
        self.dir = FIXTURES / name
        self.meta = json.loads((self.dir / "meta.json").read_text())
        self.desc = femasr.load(_state_dict(name))

    def atol(self, case: str) -> float:
        return float(self.meta["outputs"][case]["suggested_tolerance"]["atol"])


@pytest.fixture(scope="module", params=CASES)
def case(request: pytest.FixtureRequest) -> Case:
    return Case(request.param)


@pytest.fixture(scope="module")
def x4() -> Case:
    return Case("femasr_x4")


@pytest.fixture(scope="module")
def hrp_state_dict() -> dict[str, torch.Tensor]:
    return _state_dict("femasr_hrp")


# ---------------------------------------------------------------------------------- oracle fixtures
def test_a_forward_matches_official(case: Case) -> None:
    """Raw network forward (no padding) = official ``model(x)``: image and code indices."""
    x = _png(case.dir / "input_a_forward.png").contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out, idx = case.desc.model.forward_with_indices(x)
    ref = np.load(case.dir / "a_forward_out.npy")
    ref_idx = np.load(case.dir / "a_forward_indices.npy")
    assert out.shape == ref.shape
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    err = float(np.abs(out.numpy() - ref).max())
    assert err <= case.atol("a_forward"), err


def test_b_test_matches_official(case: Case) -> None:
    """Descriptor forward = official ``test()`` (always-on symmetric mirror padding, crop)."""
    x = _png(case.dir / "input_b_test.png")
    out, idx = case.desc.forward_with_indices(x)
    ref = np.load(case.dir / "b_test_out.npy")
    with np.load(case.dir / "b_test_indices.npz") as f:
        ref_idx = f["call0"]
    assert out.shape == ref.shape
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    err = float(np.abs(out.numpy() - ref).max())
    assert err <= case.atol("b_test"), err


# ---------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("name", CASES)
def test_config_inferred_from_shapes(name: str) -> None:
    scale, stem, down, _, _, _ = EXPECTED[name]
    sd = _meta_state_dict(name)
    assert femasr.detect(sd)
    leftovers = femasr.arch.LEFTOVER_PREFIXES
    cfg = femasr.infer_config({k: v for k, v in sd.items() if not k.startswith(leftovers)})
    assert cfg.scale == scale
    assert (cfg.codebook_size, cfg.codebook_dim) == (1024, 512)
    assert cfg.stem_channels == stem and cfg.down_channels == down
    assert cfg.decoder_channels == (256, 128, 64)
    assert cfg.lq_stage == (scale != 1)
    if cfg.swin is not None:
        assert cfg.up_channels == (256, 128)
        assert (cfg.swin.num_layers, cfg.swin.num_heads, cfg.swin.window_size) == (4, 8, 8)
        assert cfg.swin.shifts == (0, 4, 0, 4, 0, 4)
        assert (cfg.swin.mlp_hidden, cfg.swin.mask_resolution) == (1024, 32)
    else:
        assert cfg.up_channels == ()


def test_descriptor_attributes(case: Case) -> None:
    scale, _, _, purpose, name, multiple = EXPECTED[case.name]
    d = case.desc
    assert (d.arch, d.scale, d.purpose, d.name) == ("femasr", scale, purpose, name)
    assert (d.size_multiple, d.min_size) == (multiple, multiple // 2)
    assert d.supports_half and d.supports_bf16 and d.bytes_per_px > 0
    assert d.config["scale"] == scale and d.config["codebook_size"] == 1024
    genuine_extras = [k for k, _, _ in _manifest(case.name)["keys"] if k.startswith(("conv_semantic.", "vgg_feat"))]
    assert sorted(d.ignored_keys) == sorted(genuine_extras)  # HRP: 28 semantic-head keys, SR: none


def test_leftover_keys_are_ignored(hrp_state_dict: dict[str, torch.Tensor]) -> None:
    fake = {
        "sft_fusion_group.0.condition_scale.weight": torch.zeros(256, 256, 3, 3),
        "sft_fusion_group.0.condition_shift.bias": torch.zeros(256),
        "multiscale_encoder.upsampler.0.1.weight": torch.zeros(256, 256, 3, 3),
        "conv_semantic.0.weight": torch.zeros(512, 512, 1, 1),
    }
    sd = {**hrp_state_dict, **fake}
    desc = femasr.load(sd)
    assert set(fake) <= set(desc.ignored_keys)
    assert all(k.startswith(femasr.arch.LEFTOVER_PREFIXES) for k in desc.ignored_keys)
    with pytest.raises(UnsupportedModelError, match="unexpected"):
        femasr.load({**hrp_state_dict, "decoder_group.0.block.9.weight": torch.zeros(1)})
    missing = dict(hrp_state_dict)
    del missing["decoder_group.1.block.2.conv.5.bias"]
    with pytest.raises(UnsupportedModelError, match="missing"):
        femasr.load(missing)


def test_detection_rejects_other_architectures() -> None:
    assert not femasr.detect(_meta_state_dict("mmrealsr_x4"))
    assert not femasr.detect({})
    assert femasr.ARCHITECTURE.id == "femasr" and femasr.ARCHITECTURE.detect is femasr.detect


# ---------------------------------------------------------------------------------- runtime paths
def _b_test_reference(case: Case) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    x = _png(case.dir / "input_b_test.png")
    with np.load(case.dir / "b_test_indices.npz") as f:
        idx = f["call0"]
    return x, np.load(case.dir / "b_test_out.npy"), idx


@pytest.fixture(scope="module")
def small_runs(x4: Case) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Two small images (24x40, padded to 32x48) and their single float32 channels_last x4 runs."""
    x, _, _ = _b_test_reference(x4)
    a = x[..., :24, :40].contiguous()
    b = (x[..., -24:, -40:].flip(-2, -1) * 0.8 + 0.1).contiguous()
    images = torch.cat((a, b))
    return images, [x4.desc.forward_with_indices(images[i : i + 1]) for i in range(2)]


def test_batch_equals_single_runs(
    x4: Case, small_runs: tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]
) -> None:
    images, singles = small_runs
    out, idx = x4.desc.forward_with_indices(images)
    assert out.shape == (2, 3, 96, 160)
    for i, (single, single_idx) in enumerate(singles):
        torch.testing.assert_close(idx[i : i + 1], single_idx, rtol=0, atol=0)
        torch.testing.assert_close(out[i : i + 1], single, rtol=0, atol=x4.atol("b_test"))


def test_nchw_equals_channels_last(
    x4: Case, small_runs: tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]
) -> None:
    images, singles = small_runs
    x4.desc.channels_last = False
    try:
        assert x4.desc.model.out_conv.weight.is_contiguous()
        out, idx = x4.desc.forward_with_indices(images[:1])
    finally:
        x4.desc.channels_last = True
    assert out.is_contiguous()
    torch.testing.assert_close(idx, singles[0][1], rtol=0, atol=0)
    torch.testing.assert_close(out, singles[0][0], rtol=0, atol=x4.atol("b_test"))


def test_bfloat16_runs(x4: Case, small_runs: tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
    images, singles = small_runs
    ref, ref_idx = singles[1]
    half = copy.deepcopy(x4.desc).to(dtype=torch.bfloat16)
    out, idx = half.forward_with_indices(images[1:].to(torch.bfloat16))
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    assert bool(torch.isfinite(out).all())
    agree = (idx == ref_idx).float().mean().item()  # the VQ search itself runs in float32
    assert agree >= 0.9, agree
    rel = ((out.float() - ref).abs().mean() / ref.abs().mean()).item()
    assert rel < 0.1, rel


def test_min_size(x4: Case, hrp_state_dict: dict[str, torch.Tensor]) -> None:
    assert x4.desc.min_size == 8
    with pytest.raises(InvalidInputError, match=r"8x8.*20x7"):
        x4.desc(torch.rand(1, 3, 7, 20))
    with pytest.raises(InvalidInputError):
        x4.desc(torch.rand(3, 16, 16))
    hrp = femasr.load(hrp_state_dict)
    assert hrp.min_size == 32
    with pytest.raises(InvalidInputError, match="32x32"):
        hrp(torch.rand(1, 3, 31, 64))
    x = torch.rand(2, 3, 32, 32)  # the smallest input works: mirror pad 32 -> 64
    out = hrp(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, hrp.forward_with_indices(x)[0], rtol=0, atol=0)


# ---------------------------------------------------------------------------------- building blocks
def test_symmetric_pad_matches_official_flip_concat() -> None:
    x = torch.arange(2 * 3 * 9 * 13, dtype=torch.float32).view(2, 3, 9, 13)
    ref = torch.cat([x, torch.flip(x, [2])], 2)[:, :, :16]
    ref = torch.cat([ref, torch.flip(ref, [3])], 3)[:, :, :, :16]
    torch.testing.assert_close(femasr.symmetric_pad(x, 8), ref, rtol=0, atol=0)
    assert femasr.symmetric_pad(torch.zeros(1, 1, 16, 16), 16).shape[-2:] == (32, 32)  # always pads


def test_nearest_up_conv_equals_upsample_then_conv() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 7, 6, generator=g, dtype=torch.float64)
    w = torch.randn(4, 5, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    ref = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), w, b, padding=1)
    out = F.conv_transpose2d(x, nearest_up_conv_weight(w), b, stride=2, padding=1)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", [(32, 32), (16, 24), (8, 8)])
def test_window_plan_reproduces_swinir_roll_partition_and_mask(size: tuple[int, int]) -> None:
    h, w = size
    ws, shift, batch = 8, 4, 2
    plan = window_plan(batch, h, w, ws, (0, shift), torch.device("cpu"))
    grid = torch.arange(batch * h * w).view(batch, h, w)
    full = shifted_window_mask(h, w, ws, shift)  # SwinIR's (nW, N, N) mask of one image
    for s in (0, shift):
        # SwinIR: roll by -shift, then row-major window partition, per batch item
        rolled = torch.roll(grid, shifts=(-s, -s), dims=(1, 2))
        windows = rolled.view(batch, h // ws, ws, w // ws, ws).permute(0, 1, 3, 2, 4).reshape(-1, ws * ws)
        torch.testing.assert_close(plan.perm[s].view(-1, ws * ws), windows, rtol=0, atol=0)
    masks = plan.patterns[shift][plan.mask_index[shift]]  # type: ignore[index]
    torch.testing.assert_close(masks, full.repeat(batch, 1, 1), rtol=0, atol=0)
    assert plan.patterns[0] is None
    with np.load(FIXTURES / "femasr_x4" / "buffers.npz") as f:
        stored = f["multiscale_encoder.blocks.1.swin_blks.0.residual_group.blocks.1.attn_mask"]
    np.testing.assert_array_equal(shifted_window_mask(32, 32, ws, shift).numpy(), stored)


def test_group_norm_channels_last_statistics_are_accurate() -> None:
    # PyTorch's channels_last CPU GroupNorm sums x and x^2 sequentially over H*W in float32; its error
    # grows with the map (~1e-4 here, ~1e-3 at 512x512) and flipped near-tie VQ codes at large inputs.
    g = torch.Generator().manual_seed(2)
    norm = nn.GroupNorm(32, 64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64, generator=g) + 0.5)
        norm.bias.copy_(torch.rand(64, generator=g) - 0.5)
    for shape in ((1, 64, 192, 160), (3, 64, 9, 7)):
        x = (torch.randn(shape, generator=g) * 3 + 10).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            ref = F.silu(F.group_norm(x.double(), 32, norm.weight.double(), norm.bias.double(), 1e-6))
            out = group_norm(x, norm, silu=True)
            assert out.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
            # NCHW and channels_last reduce in different orders: a few float32 ulp of values up to ~5, not bits.
            torch.testing.assert_close(group_norm(x.contiguous(), norm, silu=True), out, rtol=1e-6, atol=2e-6)
            y = x.clone()
            assert group_norm(y, norm, silu=True, inplace=True).data_ptr() == y.data_ptr()
            torch.testing.assert_close(y, out, rtol=0, atol=0)


def test_nearest_code_searches_in_float32_inside_autocast() -> None:
    # Mixed-precision LWay fine-tuning runs FeMaSR under autocast, which would turn the distance addmm into
    # bfloat16 and pick other codes (54 of 2,000 here); the search leaves autocast for float32.
    g = torch.Generator().manual_seed(1)
    codebook, z = torch.randn(1024, 256, generator=g), torch.randn(2000, 256, generator=g)
    ref = nearest_code(z, codebook)  # the same float32 kernels outside autocast: equal by construction
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = torch.addmm(codebook.square().sum(1), z, codebook.t(), beta=1.0, alpha=-2.0).argmin(1)
        found = nearest_code(z, codebook)
    assert (rounded != ref).sum() > 10
    torch.testing.assert_close(found, ref, rtol=0, atol=0)


def test_nearest_code_float32_search_and_chunking() -> None:
    g = torch.Generator().manual_seed(1)
    codebook = torch.randn(300, 16, generator=g) * 3
    z = codebook[torch.randint(0, 300, (1000,), generator=g)] + 0.1 * torch.randn(1000, 16, generator=g)
    ref = torch.cdist(z.double(), codebook.double()).argmin(1)
    torch.testing.assert_close(nearest_code(z, codebook), ref, rtol=0, atol=0)
    torch.testing.assert_close(nearest_code(z, codebook, chunk_elements=1000), ref, rtol=0, atol=0)
    zh = z.to(torch.bfloat16)
    torch.testing.assert_close(nearest_code(zh, codebook), nearest_code(zh.float(), codebook), rtol=0, atol=0)
    assert math.isfinite(float(nearest_code(zh, codebook.half()).float().mean()))
