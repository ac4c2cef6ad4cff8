"""CRL-SR: network shapes, loader detection and config inference, the losses of Eqs. (2)-(8), training."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import make_weights, skimage_photo
from safetensors.torch import save_file
from torch import Tensor

from realsr_core import UnsupportedModelError, load_model
from realsr_core.models import crlsr
from realsr_core.models.crlsr import (
    CRLSR,
    INFERENCE_PREFIXES,
    TRAINING_PREFIXES,
    CRLSRLossConfig,
    bidirectional_contrastive_loss,
    conditional_contrastive_loss,
    sample_positions,
    srnce_penalty,
)
from realsr_core.registry import detect as registry_detect

FIXTURES = Path(__file__).resolve().parent / "fixtures"
# A non-default layout: every inferable size differs from the defaults.
SMALL = {"num_feat": 16, "enc_blocks": 3, "ref_blocks": 2, "proj_dim": 24, "ef_feat": 12, "ef_blocks": 1}


@pytest.fixture(scope="module")
def photo() -> Tensor:
    return _photo("astronaut")


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(scale: int, seed: int = 0, **overrides: int) -> CRLSR:
    torch.manual_seed(seed)
    net = CRLSR(scale=scale, **{**SMALL, **overrides})
    with torch.no_grad():  # non-trivial biases so every parameter matters
        for p in net.parameters():
            if p.dim() == 1:
                p.normal_(0.0, 0.05)
    return net


@functools.cache
def _photo(name: str) -> Tensor:
    return skimage_photo(name)


def _crops(size: int) -> Tensor:
    """Four real-photo crops (B, 3, size, size) in [0, 1]."""
    spots = {"astronaut": (60, 180), "coffee": (120, 220), "chelsea": (80, 150), "rocket": (200, 250)}
    return torch.cat([_photo(n)[..., y : y + size, x : x + size] for n, (y, x) in spots.items()])


def _degrade(hr: Tensor, scale: int, noise: float = 5.0, seed: int = 0) -> Tensor:
    """Bicubic (antialiased) downscale plus Gaussian noise of ``noise``/255, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    lr = F.interpolate(hr, scale_factor=1 / scale, mode="bicubic", antialias=True)
    return (lr + torch.randn(lr.shape, generator=g) * noise / 255).clamp(0, 1)


def _unit(*shape: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


# ---------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_shapes_and_loss_terms(photo: Tensor, scale: int) -> None:
    net = _model(scale)
    lr = photo[..., 200:213, 230:247]  # odd sizes
    out = net(lr)
    assert out.shape == (1, 3, 13 * scale, 17 * scale) and out.is_contiguous()
    hr = photo[..., : 12 * scale, : 10 * scale].expand(2, -1, -1, -1)
    losses = net.training_losses(_degrade(hr, scale), hr)
    assert set(losses) == {"rec_sr", "bc", "srnce", "rec_hr", "total"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    total = losses["rec_sr"] + losses["bc"] + losses["srnce"] + losses["rec_hr"]
    torch.testing.assert_close(losses["total"], total)
    with pytest.raises(ValueError, match="expected lr"):
        net.training_losses(lr, hr)


def test_fresh_model_starts_near_bicubic(photo: Tensor) -> None:
    """D_ref predicts a residual over U_l and starts small, so training starts from bicubic."""
    net = CRLSR(scale=4, num_feat=16, enc_blocks=2, ref_blocks=2)
    lr = photo[..., 100:132, 100:132]
    bicubic = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False)
    with torch.no_grad():
        diff = (net(lr) - bicubic).abs().mean().item()
    assert 0 < diff < 0.02


def test_parameter_count_and_size() -> None:
    net = CRLSR(scale=4)  # the default configuration
    inference = sum(v.numel() for k, v in net.state_dict().items() if k.startswith(INFERENCE_PREFIXES))
    total = sum(p.numel() for p in net.parameters())
    print(f"CRL-SR x4 default: {inference:,} inference parameters, {total:,} with the training parts")
    assert 1_000_000 < inference < 2_000_000
    assert inference * 4 < 20 * 2**20  # the shipped float32 file stays well under 20 MB
    assert set(net.inference_state_dict()) == {k for k in net.state_dict() if k.startswith(INFERENCE_PREFIXES)}
    prefixes = {k.split(".")[0] + "." for k in net.state_dict()}
    assert prefixes == set(INFERENCE_PREFIXES) | set(TRAINING_PREFIXES)


# ---------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("scale", [2, 4])
def test_config_round_trip_through_safetensors(tmp_path: Path, photo: Tensor, scale: int) -> None:
    net = _model(scale, seed=scale).eval()
    path = tmp_path / "crlsr.safetensors"
    save_file(net.state_dict(), str(path))
    desc = load_model(path)
    assert desc.arch == "crlsr" and desc.name == f"CRL-SR x{scale}" and desc.purpose == "SR"
    assert desc.config == {"scale": scale, **SMALL}
    assert desc.scale == scale and desc.size_multiple == 1 and desc.min_size == 1 and desc.supports_half
    assert desc.bytes_per_px > 0
    # Inference-only model: the training parts were not loaded, and are reported.
    assert set(desc.model.state_dict()) == set(net.inference_state_dict())
    assert sorted(desc.ignored_keys) == sorted(k for k in net.state_dict() if k.startswith(TRAINING_PREFIXES))
    assert not desc.model.has_training_parts
    x = photo[..., 300:319, 40:63]
    with torch.no_grad():
        expected = net(x)
    torch.testing.assert_close(desc(x), expected, rtol=0, atol=1e-6)


def test_inference_only_file_and_pth_containers(tmp_path: Path, photo: Tensor) -> None:
    net = _model(4, seed=7).eval()
    x = photo[..., 10:26, 400:420]
    with torch.no_grad():
        expected = net(x)
    inference = net.inference_state_dict()
    from_dict = load_model(inference)  # a state dict held in memory, inference keys only
    assert from_dict.ignored_keys == []
    assert from_dict.config == {"scale": 4, "num_feat": 16, "enc_blocks": 3, "ref_blocks": 2}
    torch.testing.assert_close(from_dict(x), expected, rtol=0, atol=1e-6)
    for wrapper in ("params", "flat"):
        path = tmp_path / f"crlsr_{wrapper}.pth"
        make_weights.save_checkpoint(net.state_dict(), str(path), wrapper)
        desc = load_model(path)
        assert desc.arch == "crlsr" and len(desc.ignored_keys) == len(net.state_dict()) - len(inference)
        torch.testing.assert_close(desc(x), expected, rtol=0, atol=1e-6)


def test_detection_is_specific() -> None:
    sd = _model(2).state_dict()
    assert crlsr.detect(sd) and registry_detect(sd).id == "crlsr"
    assert crlsr.has_training_parts(sd) and not crlsr.has_training_parts(_model(2).inference_state_dict())
    for name in ("mmrealsr_x4", "femasr_x4", "femasr_hrp"):
        man = make_weights.load_manifest(str(FIXTURES / name / "manifest.json"))
        keys = {k: torch.empty(shape, device="meta") for k, shape, _ in man["keys"]}
        assert not crlsr.detect(keys), name
        assert registry_detect(keys).id != "crlsr"


def test_mismatched_layouts_are_refused() -> None:
    sd = _model(4).inference_state_dict()
    bad = dict(sd)
    bad["encoder_lr.head.weight"] = torch.zeros(16, 12, 3, 3)  # an x2 encoder with an x4 upsampler
    with pytest.raises(UnsupportedModelError, match="mixes layouts"):
        crlsr.load(bad)
    bad = dict(sd)
    bad["refine.upsample.1.weight"] = torch.zeros(20, 16, 3, 3)  # not 3 * r^2 outputs
    with pytest.raises(UnsupportedModelError, match="upsampler"):
        crlsr.load(bad)
    bad = dict(sd)
    del bad["refine.body.1.conv2.bias"]
    with pytest.raises(UnsupportedModelError, match="missing"):
        crlsr.load(bad)
    bad = dict(sd)
    bad["encoder_lr.body.0.conv1.weight"] = torch.zeros(16, 16, 5, 5)
    with pytest.raises(UnsupportedModelError, match="shape"):
        crlsr.load(bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_and_tiny_inputs(photo: Tensor, dtype: torch.dtype) -> None:
    desc = crlsr.load(_model(4, seed=3).state_dict())
    x = photo[..., 250:270, 250:266]
    ref = desc(x)
    out = desc.to(dtype=dtype)(x.to(dtype))
    assert out.dtype == dtype and out.shape == ref.shape
    assert (out.float() - ref).abs().max().item() < 0.05
    desc.to(dtype=torch.float32)
    for size in ((1, 1), (2, 3)):
        tiny = desc(photo[..., : size[0], : size[1]])
        assert tiny.shape == (1, 3, 4 * size[0], 4 * size[1]) and torch.isfinite(tiny).all()


# ---------------------------------------------------------------------------------------- losses
def test_bidirectional_loss_prefers_matched_pairs() -> None:
    """L_bc (Eq. 3) is low when f̄_h^m and f̄_l^m match position by position, high once shuffled."""
    f_h = _unit(2, 64, 32, seed=0)
    f_l = F.normalize(f_h + 0.3 * _unit(2, 64, 32, seed=1), dim=-1)  # a noisy copy
    matched = bidirectional_contrastive_loss(f_h, f_l).item()
    shuffled = bidirectional_contrastive_loss(f_h, f_l[:, torch.randperm(64, generator=torch.Generator().manual_seed(2))])
    assert matched < 0.5 * shuffled.item()
    # Embeddings without position information give 2 log M (each direction is log M).
    same = torch.ones(1, 64, 32) / 32**0.5
    torch.testing.assert_close(bidirectional_contrastive_loss(same, same), 2 * torch.log(torch.tensor(64.0)))
    # Symmetric in its arguments (each side is anchor once).
    torch.testing.assert_close(bidirectional_contrastive_loss(f_l, f_h), bidirectional_contrastive_loss(f_h, f_l))


def test_penalty_grows_with_distance_and_strengthens_the_loss() -> None:
    """p_m = 1 - f_h^m . f̄_l^m (Eq. 5): 0 / 1 / 2 for equal / orthogonal / opposite features; a larger
    penalty raises L_SRNCE and its gradient; with p_m = 0 Eq. (6) equals Eq. (4)."""
    f_h = _unit(1, 3, 8, seed=3)
    r = _unit(8, seed=8)
    ortho = F.normalize(r - (r @ f_h[0, 1]) * f_h[0, 1], dim=-1)  # Gram-Schmidt against f_h^1
    e = torch.stack([f_h[0, 0], ortho, -f_h[0, 2]])[None]
    p = srnce_penalty(f_h, e)
    torch.testing.assert_close(p, torch.tensor([[0.0, 1.0, 2.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(p, ((f_h - e) ** 2).sum(-1) / 2)

    f_h = _unit(2, 32, 16, seed=4)
    f_s = F.normalize(f_h + 0.5 * _unit(2, 32, 16, seed=5), dim=-1)
    near = F.normalize(f_h + 0.2 * _unit(2, 32, 16, seed=6), dim=-1)  # little detail lost
    far = F.normalize(f_h + 2.0 * _unit(2, 32, 16, seed=6), dim=-1)  # much detail lost
    assert srnce_penalty(f_h, near).mean() < srnce_penalty(f_h, far).mean()
    torch.testing.assert_close(
        conditional_contrastive_loss(f_h, f_s, f_h), conditional_contrastive_loss(f_h, f_s, f_h, penalty=False)
    )
    for cond in (near, far):
        assert conditional_contrastive_loss(f_h, f_s, cond) > conditional_contrastive_loss(
            f_h, f_s, cond, penalty=False
        )
    # A larger penalty, same pushing term: the loss and the pull on f_s grow.
    grads = []
    for penalty in (False, True):
        s = f_s.clone().requires_grad_(True)
        conditional_contrastive_loss(f_h, s, far, penalty=penalty).backward()
        grads.append(s.grad.norm().item())
    assert grads[1] > grads[0]
    # The loss pulls f_s^m to f_h^m: matched SR features score lower than shuffled ones (for a condition
    # unrelated to f_h; a condition equal to f_h makes the pull and the push cancel, as Eq. 4 says).
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(7))
    cond = _unit(2, 32, 16, seed=9)
    assert conditional_contrastive_loss(f_h, f_s, cond) < conditional_contrastive_loss(f_h, f_s[:, perm], cond)
    # The pushing term of Eq. (4): the farther f_s is from the condition, the lower the loss.
    at, away = (conditional_contrastive_loss(f_h, f_s, c, penalty=False) for c in (f_s, -f_s))
    assert at > away


def test_srnce_is_lowest_when_sr_embeddings_are_antipodal() -> None:
    """Eq. (6) as written (tau 1) scores the degenerate embedding where every HR and U_l vector is one v and
    every SR vector -v below the ideal one (SR = HR, positions orthonormal): the push term is worth e^2 there.
    This is the state our step-7,500 run sits in (bench/crlsr_gradients.py, BENCHMARKS.md), at the analytic
    value log(1 + (M - 1) / (1 + e^3)) = 2.572 for M = 256."""
    m = 256
    ideal = torch.eye(m)[None]  # f_h = f_s = condition, orthonormal positions
    v = torch.zeros(1, m, m)
    v[..., 0] = 1.0
    collapsed = conditional_contrastive_loss(v, -v, v)
    assert collapsed.item() == pytest.approx(math.log(1 + (m - 1) / (1 + math.e**3)), abs=1e-5)
    assert collapsed < conditional_contrastive_loss(ideal, ideal, ideal)


def test_positions_are_drawn_from_the_generator() -> None:
    a = sample_positions(3, 20, 20, 50, generator=torch.Generator().manual_seed(0))
    b = sample_positions(3, 20, 20, 50, generator=torch.Generator().manual_seed(0))
    c = sample_positions(3, 20, 20, 50, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 50) and torch.equal(a, b) and not torch.equal(a, c)
    assert all(len(set(row.tolist())) == 50 for row in a) and int(a.max()) < 400 and int(a.min()) >= 0
    assert not torch.equal(a[0], a[1])  # independent per image
    assert torch.equal(sample_positions(2, 4, 4, 256), torch.arange(16).expand(2, -1))


def test_gradients_reach_every_trainable_part() -> None:
    net = _model(2, seed=1)
    hr = _crops(24)[:2]
    net.training_losses(_degrade(hr, 2), hr)["total"].backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_ablation_uses_only_the_sr_l1() -> None:
    """contrastive=False is Table 1 model (a): Ē_l + D_ref with L1 only; it runs without training parts."""
    net = _model(4, seed=2)
    hr = _crops(32)[:2]
    lr = _degrade(hr, 4)
    losses = net.training_losses(lr, hr, contrastive=False)
    assert set(losses) == {"rec_sr", "total"}
    torch.testing.assert_close(losses["total"], losses["rec_sr"])
    with torch.no_grad():
        torch.testing.assert_close(losses["rec_sr"], (net(lr) - hr).abs().mean())
    losses["total"].backward()
    for name, p in net.named_parameters():
        assert (p.grad is not None) == name.startswith(INFERENCE_PREFIXES), name
    inference_only = CRLSR(scale=4, **{k: SMALL[k] for k in ("num_feat", "enc_blocks", "ref_blocks")}, training_parts=False)
    inference_only.load_state_dict(net.inference_state_dict())
    torch.testing.assert_close(inference_only.training_losses(lr, hr, contrastive=False)["total"], losses["total"])
    with pytest.raises(RuntimeError, match="training parts"):
        inference_only.training_losses(lr, hr)


# Eq. (8)'s unit weights, and weights that keep L_bc and L_SRNCE from starving the SR L1 in the first
# steps (see CRLSRLossConfig): with unit weights the SR L1 is held back, so only the other terms are
# required to fall.
WEIGHTS = {
    "paper": (CRLSRLossConfig(), ("total", "bc", "srnce", "rec_hr")),
    "balanced": (CRLSRLossConfig(weight_bc=0.01, weight_srnce=0.01), ("total", "rec_sr", "bc", "srnce", "rec_hr")),
}


@pytest.mark.parametrize("weights", sorted(WEIGHTS))
def test_training_steps_decrease_the_losses(weights: str) -> None:
    """Adam on 4 real 64x64 crops (x4, bicubic + noise): mean of the first 4 steps against the last 4."""
    config, falling = WEIGHTS[weights]
    hr = _crops(64)
    lr = _degrade(hr, 4)
    torch.manual_seed(0)
    net = CRLSR(scale=4, num_feat=32, enc_blocks=2, ref_blocks=2, proj_dim=64, ef_feat=32, ef_blocks=1, losses=config)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    history: list[dict[str, float]] = []
    for step in range(40):
        losses = net.training_losses(lr, hr, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
    first = {k: sum(h[k] for h in history[:4]) / 4 for k in history[0]}
    last = {k: sum(h[k] for h in history[-4:]) / 4 for k in history[0]}
    print(weights, json.dumps({"first": first, "last": last}))
    for key in falling:
        assert last[key] < first[key], (key, first[key], last[key])
    assert last["bc"] < 0.8 * first["bc"] and last["rec_hr"] < 0.5 * first["rec_hr"]
    if "rec_sr" in falling:
        assert last["rec_sr"] < 0.97 * first["rec_sr"]


def test_loss_config_weights_the_total() -> None:
    hr = _crops(32)[:2]
    lr = _degrade(hr, 4)
    weights = CRLSRLossConfig(weight_bc=0.5, weight_srnce=2.0, weight_rec_sr=3.0, weight_rec_hr=0.0, num_samples=16)
    net = _model(4, seed=4)
    net.loss_config = weights
    losses = net.training_losses(lr, hr, generator=torch.Generator().manual_seed(0))
    expected = 0.5 * losses["bc"] + 2.0 * losses["srnce"] + 3.0 * losses["rec_sr"]
    torch.testing.assert_close(losses["total"], expected)
    # 16 of the 64 positions: a different draw gives different contrastive terms, the same L1.
    other = net.training_losses(lr, hr, generator=torch.Generator().manual_seed(1))
    assert other["bc"] != losses["bc"] and torch.equal(other["rec_sr"], losses["rec_sr"])


def test_infonce_variant_replaces_only_the_srnce_term() -> None:
    """Table 1 model e: InfoNCE between f_h and f_s instead of Eq. (6); every other term is unchanged."""
    hr = _crops(32)[:2]
    lr = _degrade(hr, 4)
    net = _model(4, seed=4)
    out = {}
    for variant in ("conditional", "infonce"):
        net.loss_config = CRLSRLossConfig(srnce=variant, num_samples=16)
        out[variant] = net.training_losses(lr, hr, generator=torch.Generator().manual_seed(0))
    for key in ("rec_sr", "bc", "rec_hr"):
        torch.testing.assert_close(out["infonce"][key], out["conditional"][key])
    assert out["infonce"]["srnce"] != out["conditional"]["srnce"]
    # Near a fresh network's embedding every position looks alike: InfoNCE is close to log M.
    assert abs(out["infonce"]["srnce"].item() - math.log(16)) < 0.5
    with pytest.raises(ValueError, match="srnce must be"):
        CRLSRLossConfig(srnce="push")
