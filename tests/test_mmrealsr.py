"""MM-RealSR x4 against the official oracle fixtures, plus config inference, scores and dtypes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import make_weights
from PIL import Image
from torch import Tensor

from realsr_core.errors import InvalidInputError, UnsupportedModelError
from realsr_core.models import mmrealsr
from realsr_core.models.blocks import rrdb
from realsr_core.models.mmrealsr import MMRealSRDescriptor, MMRealSRNet

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FIX = FIXTURES / "mmrealsr_x4"
META: dict[str, Any] = json.loads((FIX / "meta.json").read_text())
CASES = {name: tuple(case["custom_degrees"]) for name, case in META["outputs"].items()}

# A smaller network of our own (everything inferred back from its state dict).
SMALL = {
    "num_feat": 16,
    "num_block": 2,
    "num_grow_ch": 8,
    "embed_dim": 32,
    "de_num_feats": [16, 24],
    "de_num_blocks": [2, 1],
    "de_downscales": [2, 1],
    "de_hidden_dim": 16,
}




def _manifest(name: str) -> dict[str, Any]:
    return make_weights.load_manifest(str(FIXTURES / name / "manifest.json"))


def _meta_state_dict(manifest: dict[str, Any]) -> dict[str, Tensor]:
    """Key set of a manifest with shape-only tensors (enough for detection)."""
    return {name: torch.empty(shape, device="meta") for name, shape, _ in manifest["keys"]}


def _png(path: Path) -> Tensor:
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())[None]


def _small_state_dict(seed: int, **overrides: Any) -> dict[str, Tensor]:
    torch.manual_seed(seed)
    net = MMRealSRNet(**{**SMALL, **overrides})
    with torch.no_grad():  # non-trivial biases so every parameter matters
        for p in net.parameters():
            if p.dim() == 1:
                p.normal_(0.0, 0.05)
    return net.state_dict()


@pytest.fixture(scope="module")
def state_dict() -> dict[str, Tensor]:
    mw = make_weights
    man = _manifest("mmrealsr_x4")
    return mw.make_state_dict(man, man["seed"])


@pytest.fixture(scope="module")
def desc(state_dict: dict[str, Tensor]) -> MMRealSRDescriptor:
    return mmrealsr.load(state_dict)


@pytest.fixture(scope="module")
def lr() -> Tensor:
    return _png(FIX / "input_lr.png")


@pytest.fixture(scope="module")
def official(desc: MMRealSRDescriptor, lr: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    return {name: desc.official_forward(lr, degrees) for name, degrees in CASES.items()}


# ---------------------------------------------------------------------------------------- fixtures
@pytest.mark.parametrize("case", sorted(CASES))
def test_official_call_matches_fixture(official: dict[str, tuple[Tensor, Tensor]], case: str) -> None:
    out, degrees_est = official[case]
    tol = META["outputs"][case]["suggested_tolerance"]
    ref = np.load(FIX / f"{case}_out.npy")
    ref_deg = np.load(FIX / f"{case}_degrees_est.npy")
    assert out.shape == ref.shape == (1, 3, 192, 192)
    assert degrees_est.shape == ref_deg.shape == (2, 1)
    assert np.abs(out.numpy() - ref).max() <= tol["atol"]
    assert np.abs(degrees_est.numpy() - ref_deg).max() <= tol["degrees_atol"]


def test_plain_pytorch_path_matches_fixture(
    desc: MMRealSRDescriptor, lr: Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The portable path (no oneDNN fusion, NCHW) computes the same function."""
    monkeypatch.setattr(rrdb, "fused_conv_available", False)
    monkeypatch.setattr(mmrealsr.network, "_to_compute_layout", lambda x: x)
    case = "b_custom_0.2_0.8"
    out, degrees_est = desc.official_forward(lr, CASES[case])
    assert (
        np.abs(out.numpy() - np.load(FIX / f"{case}_out.npy")).max()
        <= META["outputs"][case]["suggested_tolerance"]["atol"]
    )
    assert np.abs(degrees_est.numpy() - np.load(FIX / f"{case}_degrees_est.npy")).max() <= 1e-6


@pytest.mark.parametrize("case", sorted(CASES))
def test_prepare_then_forward_equals_official(
    desc: MMRealSRDescriptor, lr: Tensor, official: dict[str, tuple[Tensor, Tensor]], case: str
) -> None:
    blur, noise = CASES[case]
    ctx = desc.prepare(lr, blur=blur, noise=noise)
    out = desc.forward(lr, **ctx)
    ref_out, ref_est = official[case]
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-5)
    assert ctx["degrees"].shape == (1, 2) and ctx["degrees"].dtype == torch.float32
    expected = [ref_est[i, 0].item() if v is None else v for i, v in enumerate((blur, noise))]
    torch.testing.assert_close(ctx["degrees"][0], torch.tensor(expected), rtol=0, atol=1e-7)
    if blur is not None and noise is not None:
        assert ctx["estimated"] is None
    else:
        torch.testing.assert_close(ctx["estimated"], ref_est.t(), rtol=0, atol=1e-7)


def test_forward_without_degrees_estimates_like_official(
    desc: MMRealSRDescriptor, lr: Tensor, official: dict[str, tuple[Tensor, Tensor]]
) -> None:
    torch.testing.assert_close(desc.forward(lr), official["a_auto"][0], rtol=0, atol=1e-5)


def test_partial_scores_keep_the_estimate_of_the_other(desc: MMRealSRDescriptor, lr: Tensor) -> None:
    ctx = desc.prepare(lr, noise=0.25)
    est = ctx["estimated"]
    assert est is not None
    torch.testing.assert_close(ctx["degrees"], torch.stack([est[:, 0], torch.full_like(est[:, 0], 0.25)], 1))


def test_estimation_on_large_images_is_downscaled(desc: MMRealSRDescriptor, lr: Tensor) -> None:
    full = desc.prepare(lr)["estimated"]
    small = desc.prepare(lr, estimate_max_pixels=24 * 24)["estimated"]
    direct = desc.model.estimate(torch.nn.functional.interpolate(lr, size=(24, 24), mode="area"))
    assert small is not None and full is not None
    torch.testing.assert_close(small, direct, rtol=0, atol=1e-6)
    assert not torch.allclose(small, full)


# ---------------------------------------------------------------------------------------- scores
@pytest.mark.parametrize("bad", [1.5, -0.01, math.nan, math.inf, "0.5", True, [0.5], torch.tensor(0.5)])
@pytest.mark.parametrize("name", ["blur", "noise"])
def test_scores_outside_range_or_not_numbers_are_refused(desc: MMRealSRDescriptor, name: str, bad: object) -> None:
    img = torch.rand(1, 3, 4, 4)
    with pytest.raises(InvalidInputError, match=r"\[0, 1\]") as info:
        desc.prepare(img, **{name: bad})
    assert name in str(info.value)
    with pytest.raises(InvalidInputError, match=r"\[0, 1\]"):
        desc.official_forward(img, (bad, None) if name == "blur" else (None, bad))


def test_bad_images_are_refused(desc: MMRealSRDescriptor) -> None:
    with pytest.raises(InvalidInputError, match="expects"):
        desc.prepare(torch.rand(3, 8, 8))
    with pytest.raises(InvalidInputError, match="expects"):
        desc.forward(torch.rand(1, 4, 8, 8))


# ---------------------------------------------------------------------------------------- config
def test_small_config_round_trips() -> None:
    sd = _small_state_dict(0)
    desc = mmrealsr.load(sd)
    assert desc.config == {"in_channels": 3, "out_channels": 3, "num_degradation": 2, "am_hidden_dim": 32, **SMALL}
    assert desc.scale == 4 and desc.purpose == "SR" and desc.name == "MM-RealSR x4"
    reloaded = mmrealsr.load(desc.model.state_dict())
    assert reloaded.config == desc.config
    x = torch.rand(1, 3, 13, 10)
    ref = MMRealSRNet(**SMALL)
    ref.load_state_dict(sd)
    with torch.inference_mode():
        expected = ref.eval()(x)
    torch.testing.assert_close(desc.forward(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(reloaded.forward(x), expected, rtol=0, atol=0)


def test_equivalent_estimator_layout_is_inferred() -> None:
    """An official-style stage list maps to the same layers (the released [64,64,64,128] case)."""
    layout = {"de_num_feats": [16, 16, 16, 24], "de_num_blocks": [1, 1, 1, 1], "de_downscales": [1, 1, 2, 1]}
    sd = _small_state_dict(1, **layout)
    desc = mmrealsr.load(sd)
    assert desc.config["de_num_feats"] == [16, 24]
    assert desc.config["de_num_blocks"] == [3, 1]
    assert desc.config["de_downscales"] == [2, 1]
    x = torch.rand(1, 3, 9, 11)
    ref = MMRealSRNet(**{**SMALL, **layout}).eval()
    ref.load_state_dict(sd)
    with torch.inference_mode():
        torch.testing.assert_close(desc.model.estimate(x), ref.estimate(x), rtol=0, atol=0)


def test_fixture_config_is_inferred(desc: MMRealSRDescriptor) -> None:
    args = _manifest("mmrealsr_x4")["constructor_args"]
    assert desc.config["num_feat"] == args["num_feat"]
    assert desc.config["num_block"] == args["num_block"]
    assert desc.config["num_grow_ch"] == args["num_grow_ch"]
    assert desc.config["num_degradation"] == args["num_degradation"]
    # [64,64,64,128] x [2,2,2,2] x [1,1,2,1] is the same layer list as [64,128] x [6,2] x [2,1].
    assert (desc.config["de_num_feats"], desc.config["de_num_blocks"], desc.config["de_downscales"]) == (
        [64, 128],
        [6, 2],
        [2, 1],
    )
    assert desc.num_params == 26_134_149  # 26.13 M, as the official model
    assert desc.supports_half and desc.size_multiple == 1 and desc.bytes_per_px > 0


def test_detection() -> None:
    assert mmrealsr.ARCHITECTURE.id == "mmrealsr" and mmrealsr.ARCHITECTURE.wrapper_preference == "params"
    assert mmrealsr.detect(_meta_state_dict(_manifest("mmrealsr_x4")))
    assert not mmrealsr.detect(_meta_state_dict(_manifest("femasr_x4")))


def test_scale2_state_dict_is_refused(state_dict: dict[str, Tensor]) -> None:
    sd = dict(state_dict)
    for key in ("conv_first.weight", "de_net.conv_first.0.weight", "de_net.conv_first.1.weight"):
        sd[key] = torch.zeros(64, 12, 3, 3)
    assert mmrealsr.detect(sd)
    with pytest.raises(UnsupportedModelError, match=r"x2 .*only the x4"):
        mmrealsr.load(sd)


def test_mismatched_layout_is_refused() -> None:
    sd = _small_state_dict(2)
    sd["body.1.rdb2.conv3.weight"] = torch.zeros(8, 30, 3, 3)
    with pytest.raises(UnsupportedModelError, match="shapes"):
        mmrealsr.load(sd)
    sd = _small_state_dict(2)
    del sd["am_list.1.fc.2.bias"]
    with pytest.raises(UnsupportedModelError, match="missing"):
        mmrealsr.load(sd)


# ---------------------------------------------------------------------------------------- running
def test_batch_of_two_equals_single_runs(desc: MMRealSRDescriptor, lr: Tensor) -> None:
    a, b = lr[..., :24, :32], lr[..., 24:, 16:].flip(-1)
    batch = torch.cat([a, b])
    ctx = desc.prepare(batch)
    out = desc.forward(batch, **ctx)
    for i, img in enumerate((a, b)):
        single = desc.prepare(img)
        torch.testing.assert_close(ctx["estimated"][i : i + 1], single["estimated"], rtol=0, atol=1e-6)
        torch.testing.assert_close(out[i : i + 1], desc.forward(img, **single), rtol=0, atol=1e-4)


@pytest.mark.parametrize("shape", [(1, 3, 13, 10), (2, 3, 9, 7), (1, 3, 1, 5)])
def test_banded_upsampling_tail_is_exact(shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    """Computing the 4x tail in bands of a few rows gives the one-band result (to float32 rounding), on both paths.

    A band that used a zero-padded edge instead of its halo rows is off by ~3e-2 (outputs are ~0.1).
    """
    desc = mmrealsr.load(_small_state_dict(4))
    x, degrees = torch.rand(*shape), torch.tensor([0.3, 0.7])
    whole = desc.forward(x, degrees)
    for band_pixels in (1, 40, 300):
        monkeypatch.setattr(mmrealsr.network, "TAIL_BAND_PIXELS", band_pixels)
        # Bands are other conv shapes, for which oneDNN may pick other kernels (AVX-512: 2 ulp seen): not bits.
        torch.testing.assert_close(desc.forward(x, degrees), whole, rtol=0, atol=1e-6)
    monkeypatch.setattr(rrdb, "fused_conv_available", False)
    torch.testing.assert_close(desc.forward(x, degrees), whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (5, 4)])
def test_tiny_inputs_run(desc: MMRealSRDescriptor, size: tuple[int, int]) -> None:
    x = torch.rand(1, 3, *size)
    out = desc.forward(x, **desc.prepare(x))
    assert out.shape == (1, 3, 4 * size[0], 4 * size[1]) and torch.isfinite(out).all()
    assert desc.min_size <= min(size)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs(dtype: torch.dtype) -> None:
    sd = _small_state_dict(3)
    ref = mmrealsr.load(sd)
    half = mmrealsr.load(sd).to(dtype=dtype)
    x = torch.rand(1, 3, 12, 12)
    expected = ref.forward(x, torch.tensor([0.3, 0.6]))
    out = half.forward(x.to(dtype), torch.tensor([0.3, 0.6]))
    assert out.dtype == dtype and out.shape == expected.shape
    err = (out.float() - expected).abs().max().item()
    assert err <= 0.05 * expected.abs().max().item()
    ctx = half.prepare(x.to(dtype))
    assert ctx["degrees"].dtype == torch.float32 and torch.isfinite(ctx["degrees"]).all()
