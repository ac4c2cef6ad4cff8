"""SD VAE, StableSR's CFW decoder and the tiled VAE.

* Oracle fixtures ``stablesr_cfw`` (official ``AutoencoderKLResi``, float64 reference): posterior mean / logvar,
  the CFW encoder features and the decoded images for w = 0, 0.5, 1, each within its ``meta.json`` atol.
* w = 0 is exactly the plain SD decoder, and the fusion branch is then not evaluated.
* Detection / loading / refusals against every manifest in tests/fixtures, containers and prefixes.
* Tiled encode / decode on a real photo with a small CFW VAE built from our classes (ch 32, one res block per
  level; the fixture-size one takes ~10 s per 128 px CFW decode on 2 CPU cores).  Its weights follow the
  fixtures' random rule with the residual branches' output convs scaled by 0.3: at gain 1 a random net is
  chaotic (a 1/255 input change moves the latent by ~10 %), a damped one behaves more like a trained VAE.
  256x256 astronaut crop, 2x2 tiles (encode: 136 px tiles, 16 px overlap, 32 px context; decode: 16 latent px
  tiles with hard borders, 4 latent px context; CFW w = 0.5).  ``TILED_BOUNDS`` holds the asserted bounds
  with the measured values; the module docstring of ``realsr_core.tiling.vae`` has the full table.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import FIXTURES, fixture_meta, fixture_state_dict, load_png, make_weights, skimage_photo
from torch import Tensor, nn

from realsr_core import registry
from realsr_core.errors import Cancelled, InvalidInputError, UnsupportedModelError
from realsr_core.models.stablesr.cfw import (
    CFWAutoencoder,
    VAEDescriptor,
    build_vae,
    detect_cfw,
    detect_sd_vae,
    infer_cfw_config,
    load_cfw,
    load_sd_vae,
    load_vae,
)
from realsr_core.models.stablesr.vae import AutoencoderKL, extract_vae_state_dict
from realsr_core.tiling import SharedGroupNorm, tiled_decode, tiled_encode, tiled_vae_decode, tiled_vae_encode

NAME = "stablesr_cfw"
FIX = FIXTURES / NAME
META: dict[str, Any] = fixture_meta(NAME)
ATOL = {k: v["suggested_tolerance"]["atol"] for k, v in META["outputs"].items()}
OTHER_MANIFESTS = ("femasr_x4", "femasr_x2", "femasr_hrp", "mmrealsr_x4", "stablesr_struct", "stablesr_sampling")



@pytest.fixture(autouse=True)
def _no_grad():
    """Inference only in this module (a module-level switch would leak into every other test file)."""
    with torch.no_grad():
        yield


def _ref(name: str) -> Tensor:
    return torch.from_numpy(np.load(FIX / f"{name}.npy"))


def _meta_sd(name: str) -> dict[str, Tensor]:
    """A manifest's key set with shape-only tensors (enough for detection)."""
    man = make_weights.load_manifest(str(FIXTURES / name / "manifest.json"))
    return {k: torch.empty(shape, device="meta") for k, shape, _ in man["keys"]}


# ---------------------------------------------------------------------------- oracle fixtures


@pytest.fixture(scope="module")
def sd() -> dict[str, Tensor]:
    return fixture_state_dict(NAME)


@pytest.fixture(scope="module")
def desc(sd: dict[str, Tensor]) -> VAEDescriptor:
    return load_vae({**sd, "loss.logvar": torch.zeros(())})


@pytest.fixture(scope="module")
def encoded(desc: VAEDescriptor) -> tuple[Tensor, ...]:
    x = load_png(FIX / "input_image.png") * 2 - 1
    return desc.encode(x)


@pytest.fixture(scope="module")
def decoded(desc: VAEDescriptor) -> dict[float, Tensor]:
    z, f0, f1 = _ref("posterior_mean"), _ref("enc_fea_0"), _ref("enc_fea_1")
    return {w: desc.decode(z, [f0, f1], w) for w in (0.0, 0.5, 1.0)}


def test_config_inferred(desc: VAEDescriptor) -> None:
    c = desc.config
    assert (c["ch"], c["ch_mult"], c["num_res_blocks"], c["z_channels"], c["embed_dim"]) == (128, [1, 2, 4, 4], 2, 4, 4)
    assert c["fusion_levels"] == [1, 2] and c["num_rrdb"] == 2 and c["grow_channels"] == 32
    assert c["enc_attn_levels"] == [] and c["mid_attn"]
    assert desc.arch == "stablesr_cfw" and desc.purpose == "Module" and desc.scale == 1 and desc.has_cfw
    assert desc.ignored_keys == ["loss.logvar"]
    assert set(desc.model.state_dict()) == {
        k for k, _, _ in make_weights.load_manifest(str(FIX / "manifest.json"))["keys"]
    }


@pytest.mark.parametrize(
    ("output", "index"),
    [("posterior_mean", 0), ("posterior_logvar", 1), ("enc_fea_0", (2, 0)), ("enc_fea_1", (2, 1))],
)
def test_encode_matches_fixture(encoded: tuple[Tensor, ...], output: str, index: int | tuple[int, int]) -> None:
    got = encoded[index] if isinstance(index, int) else encoded[index[0]][index[1]]  # type: ignore[index]
    ref = _ref(output)
    assert got.shape == ref.shape
    err = (got - ref).abs().max().item()
    assert err <= ATOL[output], f"{output}: max abs error {err:.3g} > atol {ATOL[output]}"


@pytest.mark.parametrize("w", [0.0, 0.5, 1.0])
def test_decode_matches_fixture(decoded: dict[float, Tensor], w: float) -> None:
    name = f"decoded_w{w}"
    ref = _ref(name)
    err = (decoded[w] - ref).abs().max().item()
    assert err <= ATOL[name], f"{name}: max abs error {err:.3g} > atol {ATOL[name]}"


def test_w0_is_plain_decoder_and_skips_fusion(sd: dict[str, Tensor], desc: VAEDescriptor) -> None:
    plain = load_sd_vae({k: v for k, v in sd.items() if ".fusion_layer_" not in k})
    assert plain.arch == "sd_vae" and not plain.has_cfw and type(plain.model) is AutoencoderKL
    # Same code path, bit-identical (on a crop of the latent, to save a full decode).
    z = _ref("posterior_mean")[..., :6, :6]
    ref = plain.decode(z)
    assert ref.shape == (1, 3, 48, 48)
    assert torch.equal(desc.decode(z, None, 0.0), ref)

    # w = 0 never evaluates the fusion layers (nor needs features).
    model = desc.model
    assert isinstance(model, CFWAutoencoder)

    def boom(*args: Any, **kwargs: Any) -> Tensor:
        raise AssertionError("fusion branch evaluated with w = 0")

    try:
        for lv in model.decoder.fusion_levels:
            model.decoder.fusion(lv).forward = boom  # type: ignore[method-assign]
        assert torch.equal(model.decode(z, None, 0.0), ref)
    finally:
        for lv in model.decoder.fusion_levels:
            del model.decoder.fusion(lv).forward


# ---------------------------------------------------------------------------- detection, loading, refusals


def test_detection_against_every_manifest() -> None:
    cfw_keys = _meta_sd(NAME)
    assert detect_cfw(cfw_keys) and not detect_sd_vae(cfw_keys)
    arch = registry.detect(cfw_keys)
    assert arch is not None and arch.id == "stablesr_cfw"

    plain = {k: v for k, v in cfw_keys.items() if ".fusion_layer_" not in k}
    assert detect_sd_vae(plain) and not detect_cfw(plain)
    arch = registry.detect(plain)
    assert arch is not None and arch.id == "sd_vae"

    # SD checkpoint layout: the VAE under first_stage_model.; a full diffusion checkpoint is not a VAE file.
    prefixed = {"first_stage_model." + k: v for k, v in plain.items()}
    assert detect_sd_vae(prefixed)
    assert not detect_sd_vae({**prefixed, "model.diffusion_model.input_blocks.0.0.weight": torch.empty(1)})
    assert detect_cfw({"first_stage_model." + k: v for k, v in cfw_keys.items()})

    for name in OTHER_MANIFESTS:
        keys = _meta_sd(name)
        assert not detect_cfw(keys) and not detect_sd_vae(keys), name
        arch = registry.detect(keys)
        assert arch is None or arch.id not in ("stablesr_cfw", "sd_vae"), name


def _small_config(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "in_channels": 3,
        "out_channels": 3,
        "ch": 32,
        "ch_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "z_channels": 4,
        "double_z": True,
        "embed_dim": 4,
        "enc_attn_levels": [],
        "dec_attn_levels": [],
        "mid_attn": True,
        "shortcut": "nin_shortcut",
        "feature_levels": [1, 2],
        "fusion_levels": [1, 2],
        "num_rrdb": 1,
        "grow_channels": 16,
    }
    config.update(overrides)
    return config


def plain_decode(model: AutoencoderKL, z: Tensor) -> Tensor:
    """The SD decode of a (possibly CFW) autoencoder: w = 0."""
    return model.decode(z, None, 0.0) if isinstance(model, CFWAutoencoder) else model.decode(z)


@functools.lru_cache(maxsize=4)
def _small_state_dict(seed: int, damping: float, attn: bool, res_blocks: int) -> dict[str, Tensor]:
    levels = [3] if attn else []
    with torch.device("meta"):
        model = build_vae(_small_config(enc_attn_levels=levels, dec_attn_levels=levels, num_res_blocks=res_blocks))
    new = {}
    for i, (k, v) in enumerate(model.state_dict().items()):
        a = torch.from_numpy(make_weights.init_value(k, tuple(v.shape), i, seed))
        if k.endswith(("conv2.weight", "proj_out.weight")):
            a = a * damping
        new[k] = a
    return new


def _small_vae(seed: int = 7, damping: float = 0.3, attn: bool = False, res_blocks: int = 1) -> AutoencoderKL:
    """A small CFW VAE from our classes with the fixtures' weight rule; residual output convs scaled by ``damping``."""
    sd = _small_state_dict(seed, damping, attn, res_blocks)
    model = load_vae(sd).model
    assert isinstance(model, CFWAutoencoder)
    return model


def test_small_config_roundtrip_and_file(tmp_path: Any) -> None:
    model = _small_vae(attn=True, res_blocks=2)
    sd = model.state_dict()
    cfg = infer_cfw_config(sd)
    assert cfg == _small_config(enc_attn_levels=[3], dec_attn_levels=[3], num_res_blocks=2)
    path = tmp_path / "vqgan_cfw_small.ckpt"
    make_weights.save_checkpoint(
        {**sd, "loss.discriminator.main.0.weight": torch.zeros(2, 3, 4, 4)}, str(path), "state_dict"
    )
    desc = registry.load_model(path)
    assert isinstance(desc, VAEDescriptor) and desc.arch == "stablesr_cfw"
    assert desc.ignored_keys == ["loss.discriminator.main.0.weight"]
    x = torch.rand(1, 3, 32, 40) * 2 - 1
    assert torch.equal(desc.encode(x)[0], model.encode(x)[0])
    # A plain VAE file as safetensors (flat, bare keys).
    plain = {k: v for k, v in sd.items() if ".fusion_layer_" not in k}
    st = tmp_path / "vae.safetensors"
    make_weights.save_checkpoint(plain, str(st), "flat")
    assert registry.load_model(st).arch == "sd_vae"


def test_refusals() -> None:
    sd = _small_vae().state_dict()
    plain = {k: v for k, v in sd.items() if ".fusion_layer_" not in k}
    with pytest.raises(UnsupportedModelError, match="fusion_layer"):
        load_cfw(plain)
    with pytest.raises(UnsupportedModelError):
        load_sd_vae(sd)
    with pytest.raises(UnsupportedModelError, match="no Stable Diffusion"):
        extract_vae_state_dict(_meta_sd("mmrealsr_x4"))
    broken = dict(sd)
    del broken["decoder.fusion_layer_1.encode_enc_3.conv2.bias"]
    with pytest.raises(UnsupportedModelError, match="missing"):
        load_vae(broken)
    broken = dict(sd)
    broken["decoder.fusion_layer_2.encode_enc_1.conv1.weight"] = torch.zeros(128, 128, 3, 3)
    with pytest.raises(UnsupportedModelError, match="fusion_layer_2"):
        load_vae(broken)

    desc, pdesc = load_vae(sd), load_vae(plain)
    x = torch.zeros(1, 3, 16, 16)
    with pytest.raises(InvalidInputError, match="not an image-to-image model"):
        desc(x)
    with pytest.raises(InvalidInputError, match="multiples of 8"):
        desc.encode(torch.zeros(1, 3, 12, 16))
    z = torch.zeros(1, 4, 2, 2)
    with pytest.raises(InvalidInputError, match="no CFW"):
        pdesc.decode(z, None, 0.5)
    assert pdesc.decode(z).shape == (1, 3, 16, 16)  # default w: 0 for a plain VAE
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(InvalidInputError, match=r"\[0, 1\]"):
            desc.decode(z, None, bad)
    with pytest.raises(InvalidInputError, match="needs 2 encoder features"):
        desc.decode(z, None, 0.5)
    with pytest.raises(InvalidInputError, match="level 1"):
        desc.decode(z, [torch.zeros(1, 64, 4, 4), torch.zeros(1, 128, 4, 4)], 0.5)


# ---------------------------------------------------------------------------- GroupNorm override


class CastingGroupNorm(nn.GroupNorm):
    """Like ComfyUI's ops GroupNorm: weights stored in another dtype, cast in its own forward."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.group_norm(x, self.num_groups, w, b, self.eps)


def test_shared_groupnorm_exact_for_subclasses_and_restored() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1),
        CastingGroupNorm(32, 64, eps=1e-6),
        nn.SiLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.GroupNorm(8, 64, affine=False),
        nn.GroupNorm(4, 64),
    )
    net[1].to(torch.float64)  # weights in another dtype than the activations
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 3, 16, 24)
    ref = net(x)
    with SharedGroupNorm(net) as gn:
        assert len(gn.layers) == 3
        gn.record()
        net(x)
        gn.freeze()
        gn.begin_call()
        got = net(x)  # same input: shared statistics are its own, so exactly GroupNorm
        gn.begin_call()
        other = net(x[:, :, :8])  # a crop is normalised with the whole input's statistics
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
    assert not torch.allclose(other, net(x[:, :, :8]), atol=1e-3)
    assert all("forward" not in m.__dict__ for m in net.modules())
    torch.testing.assert_close(net(x), ref, atol=0, rtol=0)


def test_override_removed_when_a_tile_raises() -> None:
    model = _small_vae()
    sentinel_layer = model.decoder.norm_out
    marker = sentinel_layer.forward
    sentinel_layer.forward = marker  # a pre-existing instance attribute must come back as it was
    calls = {"n": 0}

    def fn(z: Tensor) -> Tensor:
        calls["n"] += 1
        assert "forward" in model.decoder.mid.block_1.norm1.__dict__  # overridden while tiles run
        if calls["n"] == 3:  # stats pass, tile 1, then fail in tile 2
            raise ValueError("tile failed")
        return plain_decode(model, z)

    with pytest.raises(ValueError, match="tile failed"):
        tiled_decode(fn, model.decoder, torch.randn(1, 4, 16, 16), 8, 0, context=2)
    assert calls["n"] == 3
    gns = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert all("forward" not in m.__dict__ for m in gns if m is not sentinel_layer)
    assert sentinel_layer.__dict__["forward"] is marker
    del sentinel_layer.forward

    # Cancelling restores them too; cancel is polled before every network call.
    polls: list[int] = []

    def cancel() -> bool:
        polls.append(1)
        return len(polls) == 3

    with pytest.raises(Cancelled, match="after 2 of 5"):
        tiled_decode(
            lambda z: plain_decode(model, z), model.decoder, torch.randn(1, 4, 16, 16), 8, 0, context=2, cancel=cancel
        )
    assert all("forward" not in m.__dict__ for m in gns)


# ---------------------------------------------------------------------------- tiled VAE on a real photo


@pytest.fixture(scope="module")
def small() -> AutoencoderKL:
    return _small_vae()


@pytest.fixture(scope="module")
def photo() -> Tensor:
    return (skimage_photo("astronaut")[:, :, 0:256, 128:384] * 2 - 1).contiguous()


@pytest.fixture(scope="module")
def whole(small: AutoencoderKL, photo: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
    mean, logvar, feats = small.encode(photo, return_features=True)
    return mean, logvar, feats


# 2x2 tiles each: encode 136 px tiles (window 200 px) of the 256 px photo; decode 16 latent px tiles with hard
# borders (no overlap, so any seam would show) and a 4 latent px context (window 24 of 32).
ENC = {"tile": 136, "overlap": 16, "context": 32}
DEC = {"tile": 16, "overlap": 0, "context": 4}
W = 0.5
# Asserted bounds; the measured values are in the report / module docstring of realsr_core.tiling.vae.
TILED_BOUNDS = {
    # mean |tiled - whole| / mean |whole| of the posterior mean; measured 0.090 (per-tile GroupNorm: 0.270,
    # whole-image statistics with the same tiles: 0.067)
    "enc_latent_rel_mad": 0.15,
    # PSNR of the tiled CFW decode against the whole decode, peak 2 ([-1, 1]); measured 25.4 dB, mean abs diff
    # 0.075 (per-tile GroupNorm: 18.4 dB; whole-image statistics with the same tiles: 26.8 dB)
    "dec_psnr_db": 22.0,
    # mean |gradient| across the tile borders / elsewhere; measured 1.06 (per-tile GroupNorm: 1.98; the whole
    # decode at the same place: 0.94)
    "seam_ratio": 1.3,
}


def _rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().mean() / b.abs().mean()).item()


def _psnr(a: Tensor, b: Tensor) -> float:
    return 10 * math.log10(4.0 / ((a - b) ** 2).mean().item())


def _border_gradient_ratio(img: Tensor, borders: list[int]) -> float:
    """Mean |difference| between the pixel pairs straddling the tile borders (both axes) over the mean elsewhere."""
    gx = (img[..., 1:] - img[..., :-1]).abs().mean(dim=(0, 1, 2))  # one value per column pair
    gy = (img[..., 1:, :] - img[..., :-1, :]).abs().mean(dim=(0, 1, 3))
    at = torch.tensor([b - 1 for b in borders])
    mask = torch.ones_like(gx, dtype=torch.bool)
    mask[at] = False
    return (torch.cat([gx[at], gy[at]]).mean() / torch.cat([gx[mask], gy[mask]]).mean()).item()


def _encode_fn(model: AutoencoderKL, sizes: list[tuple[int, ...]] | None = None) -> Any:
    def fn(x: Tensor) -> list[Tensor]:
        if sizes is not None:
            sizes.append(tuple(x.shape))
        mean, logvar, feats = model.encode(x, return_features=True)
        return [mean, logvar, *feats]

    return fn


def test_tiled_encode_close_to_whole(small: AutoencoderKL, photo: Tensor, whole: Any) -> None:
    sizes: list[tuple[int, ...]] = []
    ticks: list[tuple[int, int]] = []
    outs = tiled_encode(
        _encode_fn(small, sizes),
        small.encoder,
        photo,
        ENC["tile"],
        ENC["overlap"],
        context=ENC["context"],
        progress=lambda d, t: ticks.append((d, t)),
    )
    assert isinstance(outs, list) and len(outs) == 4
    mean, logvar, f0, f1 = outs
    assert mean.shape == (1, 4, 32, 32) and f0.shape == (1, 64, 128, 128) and f1.shape == (1, 128, 64, 64)
    window = ENC["tile"] + 2 * ENC["context"]
    assert len(sizes) == 1 + 4 and all(s[-2] <= window and s[-1] <= window for s in sizes)
    assert ticks == [(i, 5) for i in range(1, 6)]  # statistics pass + 2x2 tiles
    shared = _rel(mean, whole[0])
    assert shared < TILED_BOUNDS["enc_latent_rel_mad"]
    # Per-tile GroupNorm (what a naive tiled encode does) is further off.
    per_tile = tiled_encode(
        _encode_fn(small), small.encoder, photo, ENC["tile"], ENC["overlap"], context=ENC["context"], stats="none"
    )
    assert shared < _rel(per_tile[0], whole[0])


def test_tiled_cfw_decode_close_to_whole_bounded_and_seamless(small: AutoencoderKL, whole: Any) -> None:
    mean, _, feats = whole
    assert isinstance(small, CFWAutoencoder)
    ref = small.decode(mean, feats, W)
    sizes: list[tuple[tuple[int, ...], ...]] = []

    def fn(z: Tensor, fs: list[Tensor]) -> Tensor:
        sizes.append((tuple(z.shape), *(tuple(f.shape) for f in fs)))
        return small.decode(z, fs, W)

    out = tiled_decode(fn, small.decoder, mean, DEC["tile"], DEC["overlap"], context=DEC["context"], features=feats)
    assert out.shape == ref.shape == (1, 3, 256, 256) and out.device.type == "cpu"
    # Bounded memory: every call (the statistics pass included) sees at most tile + 2*context latent pixels,
    # with the features cropped at their own resolution (4x and 2x the latent).
    window = DEC["tile"] + 2 * DEC["context"]
    assert len(sizes) == 1 + 4
    for z, f0, f1 in sizes:
        assert z[-2] <= window and z[-1] <= window
        assert f0[-2:] == (4 * z[-2], 4 * z[-1]) and f1[-2:] == (2 * z[-2], 2 * z[-1])

    assert _psnr(out, ref) > TILED_BOUNDS["dec_psnr_db"]
    # Hard tile borders at 128 px: the gradient across them looks like the gradient elsewhere.
    ratio = _border_gradient_ratio(out, [128])
    assert ratio < TILED_BOUNDS["seam_ratio"], f"tile borders stand out: gradient ratio {ratio:.2f}"
    # ... and the measure does see a tone step of 0.3 (half the image's std) in one tile (ratio 1.48).
    stepped = ref.clone()
    stepped[..., :128, :128] += 0.3
    assert _border_gradient_ratio(stepped, [128]) > TILED_BOUNDS["seam_ratio"]


def test_single_window_is_exact_and_w0_needs_no_features(small: AutoencoderKL, whole: Any) -> None:
    mean, _, feats = whole
    z = mean[..., :16, :16]
    ref = plain_decode(small, z)
    out = tiled_decode(lambda t: plain_decode(small, t), small.decoder, z, 16, 4, context=4)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    desc = load_vae(small.state_dict())
    torch.testing.assert_close(tiled_vae_decode(desc, z, None, 0.0, tile=16), ref, atol=1e-5, rtol=0)


def test_oom_halves_the_tile(small: AutoencoderKL) -> None:
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    seen: list[int] = []

    def fn(x: Tensor) -> Tensor:
        seen.append(x.shape[-1])
        if x.shape[-1] > 12:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return plain_decode(small, x)

    out = tiled_decode(fn, small.decoder, z, 16, 0, context=2, min_tile=4)
    ref = tiled_decode(lambda t: plain_decode(small, t), small.decoder, z, 8, 0, context=2)
    assert seen[0] == 16 and max(seen[1:]) <= 12
    torch.testing.assert_close(out, ref, atol=0, rtol=0)

    def always_oom(x: Tensor) -> Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(torch.OutOfMemoryError, match="min_tile"):
        tiled_decode(always_oom, small.decoder, z, 16, 2, context=2, min_tile=8)


def test_descriptor_tiled_methods(small: AutoencoderKL, photo: Tensor) -> None:
    desc = load_vae(small.state_dict())
    crop = photo[..., :96, :128]
    mean, logvar, feats = tiled_vae_encode(desc, crop, tile=64, overlap=0, context=16)
    assert mean.shape == (1, 4, 12, 16) and [tuple(f.shape) for f in feats] == [(1, 64, 48, 64), (1, 128, 24, 32)]
    out = tiled_vae_decode(desc, mean, feats, 0.5, tile=8, overlap=0, context=2)
    assert out.shape == (1, 3, 96, 128) and torch.isfinite(out).all()
    with pytest.raises(InvalidInputError, match="needs 2 encoder features"):
        tiled_vae_decode(desc, mean, None, 0.5)
