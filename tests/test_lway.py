"""LWay: the LR-reconstruction branch (E, R), its loader and trainer builder, and test-time fine-tuning
(realsr_core.adapt.lway) on real photos shipped in scikit-image."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import skimage_photo
from safetensors.torch import save_file

from realsr_core import Cancelled, load_model
from realsr_core.adapt import finetune, haar_dwt2, hf_weight_map, lway_loss, select_parameters, self_supervised_loss
from realsr_core.errors import InvalidInputError
from realsr_core.models.crlsr import CRLSR
from realsr_core.models.femasr.network import FeMaSRConfig, FeMaSRNet, SwinConfig
from realsr_core.models.lway import LWayReconstruction, detect, infer_config
from realsr_core.models.mmrealsr.network import MMRealSRNet
from realsr_core.registry import detect as registry_detect
from realsr_core.training.trainer import load_config, read_metadata, train

SMALL_REC = {"enc_feat": 16, "enc_blocks": 1, "enc_channels": (32, 64), "rec_feat": 16, "rec_blocks": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lr_photo() -> torch.Tensor:
    """coffee() area-downscaled x4: a real LR image (1, 3, 100, 150) in [0, 1]."""
    return F.interpolate(skimage_photo("coffee"), scale_factor=0.25, mode="area").clamp(0, 1)


@pytest.fixture(scope="module")
def rec() -> LWayReconstruction:
    torch.manual_seed(1)
    return LWayReconstruction(**SMALL_REC).eval()


def _crlsr_descriptor():
    torch.manual_seed(0)
    net = CRLSR(scale=4, num_feat=16, enc_blocks=2, ref_blocks=2, training_parts=False)
    return load_model(net.state_dict())  # the loaded form: frozen, channels_last weights


def _params(desc) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in desc.model.state_dict().items()}


# ------------------------------------------------------------------------------------------------ E and R
def test_encoder_and_reconstructor_shapes() -> None:
    m = LWayReconstruction().eval()
    e_params = sum(p.numel() for p in m.encoder.parameters())
    r_params = sum(p.numel() for p in m.reconstructor.parameters())
    assert 1_000_000 < e_params + r_params < 3_000_000
    img = skimage_photo("astronaut")[..., 100:161, 200:258]  # odd sizes
    with torch.no_grad():
        for x in (img, img[..., :1, :1], torch.cat([img, img.flip(-1)])):
            assert m.encoder(x).shape == (x.shape[0], 512, 1, 1)
        e = m.embed(img)
        out = m.reconstructor(img, e)
        assert out.shape == img.shape
        # A fresh R is close to the identity (global skip, small last conv), and deterministic in eval mode.
        assert (out - img).abs().mean() < 0.02
        assert torch.equal(out, m(img, img))
        m.reconstructor.blocks[0].noise_strength.fill_(0.5)
        assert torch.equal(m(img, img), m(img, img))
        m.train()
        assert not torch.equal(m(img, img), m(img, img))  # noise injection in training mode only


def test_modulation_depends_on_the_embedding() -> None:
    torch.manual_seed(0)
    m = LWayReconstruction(**SMALL_REC).eval()
    with torch.no_grad():
        for block in m.reconstructor.blocks:
            block.modconv.style.weight.normal_(0, 0.5)
        m.reconstructor.conv_last.weight.normal_(0, 0.1)
        img = skimage_photo("coffee")[..., :64, :64]
        a = m.reconstructor(img, torch.randn(1, 512, 1, 1))
        b = m.reconstructor(img, torch.randn(1, 512, 1, 1))
    assert (a - b).abs().mean() > 1e-3


@pytest.mark.parametrize("config", [{}, {**SMALL_REC, "noise": False, "unshuffle": 1, "mlp_layers": 2, "embed_dim": 64},
                                    {**SMALL_REC, "kernel_size": 7, "scale": 4}])
def test_round_trip_through_load_model(tmp_path: Path, config: dict) -> None:
    torch.manual_seed(2)
    m = LWayReconstruction(**config).eval()
    path = tmp_path / "lway.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    desc = load_model(path)
    assert desc.arch == "lway" and desc.purpose == "Module" and desc.scale == 1
    assert desc.config == {**m.config.to_dict(), "enc_channels": list(m.config.enc_channels)}
    assert infer_config(m.state_dict()) == desc.config
    img = skimage_photo("chelsea")[..., :48, :40]
    up = F.interpolate(F.interpolate(img, scale_factor=0.25, mode="area"), size=(48, 40), mode="bicubic")
    with torch.no_grad():
        assert torch.equal(desc(img, lr_up=up), m(img, up))
    assert not any(p.requires_grad for p in desc.model.parameters())


def test_predicted_kernel_base_path() -> None:
    """R's base path (kernel_size > 0): a positive kernel summing to 1 from the embedding, then down x scale and
    back up: a constant stays constant, detail above the LR grid's Nyquist is removed, the embedding matters."""
    torch.manual_seed(0)
    m = LWayReconstruction(**SMALL_REC, kernel_size=9, scale=4).eval()
    rec = m.reconstructor
    img = skimage_photo("astronaut")[..., 100:164, 200:264]
    with torch.no_grad():
        e = m.embed(img)
        flat = rec.base(torch.full_like(img, 0.3), e)
        assert torch.allclose(flat, torch.full_like(img, 0.3), atol=1e-5)
        base = rec.base(img, e)
        # Band-limited: it barely changes when resampled through the LR grid again.
        again = F.interpolate(F.interpolate(base, size=(16, 16), mode="bicubic"), size=(64, 64), mode="bicubic")
        assert (again - base).abs().mean() < 0.35 * (img - base).abs().mean()
        rec.kernel_head.weight.normal_(0, 0.5)
        assert (rec.base(img, e) - rec.base(img, torch.randn_like(e))).abs().mean() > 1e-3
        assert (rec(img, e) - rec.base(img, e)).abs().mean() < 0.02  # the residual network starts small
    assert infer_config(m.state_dict())["kernel_size"] == 9 and infer_config(m.state_dict())["scale"] == 4


def test_detection_is_specific() -> None:
    sd = LWayReconstruction(**SMALL_REC).state_dict()
    assert detect(sd) and registry_detect(sd).id == "lway"
    assert registry_detect(CRLSR(scale=4, num_feat=8, enc_blocks=1, ref_blocks=1).state_dict()).id == "crlsr"
    assert not detect({k: v for k, v in sd.items() if not k.startswith("reconstructor.")})


# ------------------------------------------------------------------------------------------------ weight map
def _analytic_haar_dwt2(x: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """The orthonormal 2-D Haar DWT by hand, in pywt.dwt2's conventions (mode "symmetric", cH, cV, cD).

    On each 2x2 block [[a, b], [c, d]]: cA = (a+b+c+d)/2, cH = (a+b-c-d)/2 (detail down the rows),
    cV = (a-b+c-d)/2 (detail across the columns), cD = (a-b-c+d)/2; an odd size repeats its last row / column.
    """
    h, w = x.shape[-2:]
    x = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, h % 2), (0, w % 2)], mode="edge")
    a, b, c, d = x[..., 0::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    return (a + b + c + d) / 2, ((a + b - c - d) / 2, (a - b + c - d) / 2, (a - b - c + d) / 2)


@pytest.mark.parametrize("size", [(64, 96), (63, 61)])
def test_haar_dwt_equals_the_analytic_transform(size: tuple[int, int]) -> None:
    x = skimage_photo("astronaut")[..., 200 : 200 + size[0], 150 : 150 + size[1]]
    ca, (ch, cv, cd) = haar_dwt2(x)
    ref_a, (ref_h, ref_v, ref_d) = _analytic_haar_dwt2(x.double().numpy())
    assert ca.shape[-2:] == ((size[0] + 1) // 2, (size[1] + 1) // 2)
    for ours, ref in ((ca, ref_a), (ch, ref_h), (cv, ref_v), (cd, ref_d)):
        np.testing.assert_allclose(ours.numpy(), ref, atol=1e-6)
    # The filters are the orthonormal Haar pair: an impulse gives 1/sqrt(2)^2 = 1/2 in every band.
    one = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    one[..., 0, 0] = 1
    bands = torch.cat([haar_dwt2(one)[0], *haar_dwt2(one)[1]]).flatten()
    torch.testing.assert_close(bands, torch.full((4,), 0.5, dtype=torch.float64), rtol=0, atol=1e-15)


def test_weight_map_is_in_unit_range_and_larger_on_edges() -> None:
    img = skimage_photo("camera")  # the cameraman: flat sky above, tripod and coat edges below
    w = hf_weight_map(img)
    assert w.shape == (1, 1, 512, 512) and not w.requires_grad
    assert float(w.min()) == 0.0 and float(w.max()) == 1.0
    sky = w[..., 0:64, 0:160].mean()
    edges = w[..., 288:448, 256:352].mean()
    assert edges > 10 * sky
    # Nearest-neighbour upsampling: every 2x2 block (one DWT coefficient) has one weight.
    blocks = w[0, 0].reshape(256, 2, 256, 2)
    assert torch.equal(blocks.amax(dim=(1, 3)), blocks.amin(dim=(1, 3)))
    # Odd sizes and batches: per-image normalisation, cropped to the input size.
    odd = torch.cat([img[..., :101, :99], img[..., 300:401, 200:299] * 0.5])
    wo = hf_weight_map(odd)
    assert wo.shape == (2, 1, 101, 99)
    assert torch.allclose(wo.amax(dim=(-2, -1)), torch.ones(2, 1))
    assert hf_weight_map(torch.full((1, 3, 8, 8), 0.3)).abs().max() == 0  # flat: no detail, no weight


def test_lway_loss_is_the_weighted_l1() -> None:
    a, b = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    w = torch.rand(2, 1, 8, 8)
    assert torch.allclose(lway_loss(a, b, w), F.l1_loss(w * a, w * b))
    assert lway_loss(a, b, torch.zeros_like(w)) == 0


# ------------------------------------------------------------------------------------------------ fine-tuning
def test_finetune_lowers_the_loss_and_leaves_the_model_alone(lr_photo: torch.Tensor, rec: LWayReconstruction) -> None:
    desc = _crlsr_descriptor()
    before = _params(desc)
    rec_before = {k: v.clone() for k, v in rec.state_dict().items()}
    kw = {"patch_size": 32, "batch_size": 4}
    loss0 = self_supervised_loss(desc, lr_photo, rec, batches=2, **kw)
    seen: list[tuple[int, int, float]] = []
    res = finetune(desc, lr_photo, rec, iterations=15, lr=1e-3, params="all", seed=3,
                   progress=lambda i, n, v: seen.append((i, n, v)), **kw)
    loss1 = self_supervised_loss(res.model, lr_photo, rec, batches=2, **kw)
    assert loss1 < 0.8 * loss0
    assert len(res.losses) == 15 and all(math.isfinite(v) for v in res.losses)
    assert [s[:2] for s in seen] == [(i, 15) for i in range(1, 16)] and seen[-1][2] == res.losses[-1]
    assert res.trained_params == desc.num_params
    # The input model and the reconstruction are bit-identical; the result is a separate, adapted copy.
    assert all(torch.equal(before[k], v) for k, v in desc.model.state_dict().items())
    assert all(torch.equal(rec_before[k], v) for k, v in rec.state_dict().items())
    assert all(p.grad is None for p in list(desc.model.parameters()) + list(rec.parameters()))
    assert res.model is not desc and res.model.model is not desc.model
    assert not res.model.model.training and not any(p.requires_grad for p in res.model.model.parameters())
    assert any(not torch.equal(before[k], v) for k, v in res.model.model.state_dict().items())
    # Same seed, same result.
    again = finetune(desc, lr_photo, rec, iterations=3, lr=1e-3, seed=3, **kw)
    assert again.losses == res.losses[:3]


def test_last_fraction_trains_exactly_that_suffix_inside_inference_mode(
    lr_photo: torch.Tensor, rec: LWayReconstruction
) -> None:
    # ComfyUI loads models and runs nodes under torch.inference_mode(): weights and images are inference
    # tensors there, and autograd is off.
    with torch.inference_mode():
        desc = _crlsr_descriptor()
        image = lr_photo.clone()
        assert next(desc.model.parameters()).is_inference() and image.is_inference()
        res = finetune(desc, image, rec, iterations=3, lr=1e-3, patch_size=32, batch_size=2, params="last:0.35")
    named = list(desc.model.named_parameters())
    expected = select_parameters(named, "last:0.35")
    assert res.trained_names == expected
    total = desc.num_params
    sizes = dict((n, p.numel()) for n, p in named)
    assert res.trained_params == sum(sizes[n] for n in expected)
    assert 0.35 * total <= res.trained_params < 0.35 * total + sizes[expected[0]]
    assert [n for n, _ in named][-len(expected):] == expected
    # Every chosen tensor moved (gradients reached it, even behind frozen layers whose fused CPU path has no
    # autograd), every other one is bit-identical.
    original = dict(desc.model.state_dict())
    for k, v in res.model.model.state_dict().items():
        assert torch.equal(v, original[k]) == (k not in expected), k
    with torch.inference_mode():
        out = res.model(image[..., :24, :24])
    assert out.shape == (1, 3, 96, 96)


def test_parameter_selection_specs() -> None:
    named = list(CRLSR(scale=2, num_feat=8, enc_blocks=1, ref_blocks=1, training_parts=False).named_parameters())
    assert select_parameters(named, "all") == [n for n, _ in named]
    assert select_parameters(named, "last:1") == [n for n, _ in named]
    assert select_parameters(named, r"^refine\.upsample") == ["refine.upsample.0.weight", "refine.upsample.0.bias"]
    for bad in ("last:0", "last:1.5", "last:x", "^nothing$", "("):
        with pytest.raises(InvalidInputError):
            select_parameters(named, bad)


def test_cancel_stops_early_and_keeps_the_model(lr_photo: torch.Tensor, rec: LWayReconstruction) -> None:
    desc = _crlsr_descriptor()
    before = _params(desc)
    done: list[int] = []
    with pytest.raises(Cancelled, match="cancelled after 2 of 50 iterations"):
        finetune(desc, lr_photo, rec, iterations=50, patch_size=24, batch_size=1,
                 progress=lambda i, n, v: done.append(i), cancel=lambda: len(done) >= 2)
    assert done == [1, 2]
    assert all(torch.equal(before[k], v) for k, v in desc.model.state_dict().items())


def test_plain_module_and_mmrealsr_scores(lr_photo: torch.Tensor, rec: LWayReconstruction) -> None:
    # A plain nn.Module: the scale is measured; the result is a module of the same class.
    torch.manual_seed(0)
    net = CRLSR(scale=2, num_feat=8, enc_blocks=1, ref_blocks=1, training_parts=False).eval()
    res = finetune(net, [lr_photo[0], lr_photo[0, :, 10:60, 20:90]], rec, iterations=2, patch_size=24, batch_size=2)
    assert type(res.model) is CRLSR and res.model is not net and len(res.losses) == 2
    with torch.no_grad():
        assert res.model(lr_photo[..., :8, :8]).shape == (1, 3, 16, 16)

    # MM-RealSR: the degradation scores are estimated once per image and fixed, so its estimator is unused
    # and never trained; "last:0.5" counts only the parameters the SR path uses.
    torch.manual_seed(0)
    mm = MMRealSRNet(num_feat=8, num_block=2, num_grow_ch=8, embed_dim=16, de_num_feats=(8, 8, 8, 16),
                     de_num_blocks=(1, 1, 1, 1), de_downscales=(2, 2, 2, 1), de_hidden_dim=16)
    desc = load_model(mm.state_dict())
    before = _params(desc)
    res = finetune(desc, lr_photo, rec, iterations=2, lr=1e-3, patch_size=24, batch_size=2, params="last:0.5")
    assert res.trained_names and not any(n.startswith("de_net.") for n in res.trained_names)
    used = sum(p.numel() for n, p in desc.model.named_parameters() if not n.startswith("de_net."))
    assert 0.5 * used <= res.trained_params < used
    assert all(torch.equal(before[k], v) for k, v in desc.model.state_dict().items())
    ctx = res.model.prepare(lr_photo)
    assert res.model(lr_photo[..., :16, :16], **{"degrees": ctx["degrees"]}).shape == (1, 3, 64, 64)


def test_femasr_descriptor_finetunes_through_its_own_padding_path(lr_photo: torch.Tensor, rec: LWayReconstruction) -> None:
    # FeMaSR's descriptor runs under inference_mode and pads to its window multiple; the fine-tuning must
    # follow the same path with gradients.
    cfg = FeMaSRConfig(stem_channels=32, down_channels=(32,), codebook_size=16, codebook_dim=16,
                       decoder_channels=(32, 32, 32), up_channels=(32, 32), num_groups=8,
                       swin=SwinConfig(num_layers=1, shifts=(0, 4), num_heads=2, window_size=8, mlp_hidden=64,
                                       mask_resolution=8))
    torch.manual_seed(0)
    desc = load_model(FeMaSRNet(cfg).state_dict())
    assert desc.arch == "femasr" and desc.size_multiple == 16
    before = _params(desc)
    kw = {"patch_size": 20, "batch_size": 2}  # 20 is not a multiple of 16: the descriptor pads and crops
    loss0 = self_supervised_loss(desc, lr_photo, rec, **kw)
    res = finetune(desc, lr_photo, rec, iterations=4, lr=1e-3, params="last:0.5", **kw)
    assert self_supervised_loss(res.model, lr_photo, rec, **kw) < loss0
    assert all(torch.equal(before[k], v) for k, v in desc.model.state_dict().items())
    assert res.model(lr_photo[..., :20, :20]).shape == (1, 3, 80, 80)


def test_mixed_precision_takes_the_float32_steps(lr_photo: torch.Tensor, rec: LWayReconstruction) -> None:
    # bfloat16 / float16 passes (autocast) with float32 weights and Adam state: the same patches give losses
    # within rounding of float32's and weight updates pointing the same way with the same size (Adam
    # normalises the step, so passes rounded to 8 / 11 mantissa bits move the weights almost identically).
    desc = _crlsr_descriptor()
    before = _params(desc)
    kw = {"iterations": 6, "lr": 1e-3, "patch_size": 32, "batch_size": 4, "seed": 3}

    def update(res) -> torch.Tensor:
        return torch.cat([(v - before[k]).flatten() for k, v in res.model.model.state_dict().items()])

    ref = finetune(desc, lr_photo, rec, **kw)
    for dtype in (torch.bfloat16, torch.float16):
        res = finetune(desc, lr_photo, rec, compute_dtype=dtype, **kw)
        assert res.losses != ref.losses  # the passes did run in the reduced precision
        assert np.allclose(res.losses, ref.losses, rtol=0.05, atol=0), (dtype, res.losses, ref.losses)
        assert F.cosine_similarity(update(res), update(ref), dim=0) > 0.99
        assert abs(float(update(res).norm() / update(ref).norm()) - 1) < 0.02
        assert all(p.dtype == torch.float32 for p in res.model.model.parameters())
    assert all(torch.equal(before[k], v) for k, v in desc.model.state_dict().items())
    with pytest.raises(InvalidInputError, match="compute_dtype"):
        finetune(desc, lr_photo, rec, iterations=1, compute_dtype=torch.float64)


def test_finetune_refuses_bad_input(lr_photo: torch.Tensor, rec: LWayReconstruction) -> None:
    desc = _crlsr_descriptor()
    with pytest.raises(InvalidInputError):
        finetune(desc, lr_photo[0, 0], rec, iterations=1)
    with pytest.raises(InvalidInputError):
        finetune(desc, lr_photo, rec, iterations=1, lr=0)
    with pytest.raises(InvalidInputError, match="LWayReconstruction"):
        finetune(desc, lr_photo, desc.model, iterations=1)


# ------------------------------------------------------------------------------------------------ training
def test_trainer_builds_trains_and_saves_a_loadable_reconstruction(tmp_path: Path) -> None:
    cfg = load_config("lway_rec")
    assert {"bsrgan", "realesrgan", "classical_iso", "classical_aniso"} <= cfg["data"]["degradation"].keys()
    assert cfg["data"]["split"] == "train"
    cfg["model"].update(SMALL_REC, enc_channels=list(SMALL_REC["enc_channels"]), embed_dim=32)
    cfg["data"].update(patch_size=32, photos=["camera", "rocket"])
    cfg["train"].update(steps=3, batch_size=2, warmup_steps=1, log_every=1, eval_every=3, save_every=100)
    cfg["eval"].update(crop=48, max_photos=1, degradations=["classical", "bsrgan"])
    result = train(cfg, tmp_path / "run", device="cpu")
    assert result.step == 3
    assert set(result.last_eval) == {f"{k}/{s}" for k in ("psnr_rec", "psnr_identity") for s in ("classical", "bsrgan")}
    assert all(math.isfinite(v) for v in result.last_eval.values())
    assert read_metadata(result.model_path)["arch"] == "lway_rec"
    desc = load_model(result.model_path)
    assert desc.arch == "lway" and desc.config["embed_dim"] == 32 and desc.config["enc_channels"] == [32, 64]


# ------------------------------------------------------------------------------------------------ spandrel
def test_spandrel_model_finetunes_and_still_runs_in_spandrel(lr_photo: torch.Tensor, rec: LWayReconstruction) -> None:
    spandrel = pytest.importorskip("spandrel", reason="spandrel is not installed here (ComfyUI's venv has it)")
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(0)
    state = ESRGAN(num_filters=16, num_blocks=1, scale=4).state_dict()
    loaded = spandrel.ModelLoader().load_from_state_dict(state)
    assert loaded.architecture.id == "ESRGAN" and loaded.scale == 4
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    kw = {"patch_size": 24, "batch_size": 2}
    loss0 = self_supervised_loss(loaded.model, lr_photo, rec, **kw)

    # Its network (what ComfyUI's UPSCALE_MODEL holds as .model) ...
    res = finetune(loaded.model, lr_photo, rec, iterations=8, lr=2e-4, **kw)
    assert type(res.model) is type(loaded.model)
    assert self_supervised_loss(res.model, lr_photo, rec, **kw) < loss0
    again = spandrel.ModelLoader().load_from_state_dict(res.model.state_dict())
    out = again(lr_photo[..., :20, :20])
    assert out.shape == (1, 3, 80, 80) and torch.isfinite(out).all()

    # ... or the spandrel descriptor itself, returned as a spandrel descriptor.
    res_d = finetune(loaded, lr_photo, rec, iterations=2, lr=2e-4, **kw)
    assert type(res_d.model) is type(loaded) and res_d.model.model is not loaded.model
    assert res_d.model(lr_photo[..., :20, :20]).shape == (1, 3, 80, 80)
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())


def test_loss_curve_image_draws_the_curve_and_its_trend() -> None:
    from realsr_core.adapt.plot import loss_curve_image, moving_average

    vals = [1.0, 3.0, 2.0, 6.0, 5.0]
    assert moving_average(vals, 2) == pytest.approx([1.0, 2.0, 2.5, 4.0, 5.5])
    assert moving_average(vals, 1) == pytest.approx(vals)
    falling = [math.exp(-i / 20) for i in range(200)]
    img = loss_curve_image(falling, width=320, height=200)
    assert img.shape == (200, 320, 3) and img.dtype == torch.float32
    assert 0.0 <= img.min().item() and img.max().item() <= 1.0
    # The dark smoothed line: high on the left of the plot area, low on the right.
    dark = (img[..., 2] > 0.5) & (img[..., 0] < 0.2)
    left_rows = dark[:, 70:90].nonzero()[:, 0].float().mean()
    right_rows = dark[:, 280:300].nonzero()[:, 0].float().mean()
    assert left_rows < right_rows - 50
    assert loss_curve_image([]).shape == (360, 640, 3)  # no iterations: an empty plot that says so
    with pytest.raises(ValueError, match="at least 160x120"):
        loss_curve_image(falling, width=100, height=100)


def test_module_trained_for_another_scale_warns(lr_photo: torch.Tensor) -> None:
    torch.manual_seed(0)
    rec4 = LWayReconstruction(**SMALL_REC, kernel_size=3, scale=4).eval()
    x2 = torch.nn.Sequential(torch.nn.Conv2d(3, 12, 3, 1, 1), torch.nn.PixelShuffle(2))
    with pytest.warns(UserWarning, match="trained for x4 and the SR model is x2"):
        finetune(x2, lr_photo[..., :32, :32], rec4, iterations=1, patch_size=16, batch_size=1)
    rec2 = LWayReconstruction(**SMALL_REC, kernel_size=3, scale=2).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        finetune(x2, lr_photo[..., :32, :32], rec2, iterations=1, patch_size=16, batch_size=1)
