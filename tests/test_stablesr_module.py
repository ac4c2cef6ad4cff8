"""StableSR SR module (time-aware encoder + SFT layers) against the official oracle fixtures, plus
configuration inference, loading from both released containers, detection and the ResBlock hook."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import make_weights
from torch import Tensor, nn

from realsr_core import registry
from realsr_core.errors import InvalidInputError, UnsupportedModelError
from realsr_core.models import stablesr
from realsr_core.models.stablesr import (
    EncoderConfig,
    LegacyAttentionBlock,
    SFTLayer,
    SFTLayers,
    StableSRDescriptor,
    TimeAwareEncoder,
    TimestepResBlock,
    bind_sft_forward,
    cond_by_shape,
    resblock_forward_with_sft,
    select_cond,
    timestep_embedding,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
STRUCT = FIXTURES / "stablesr_struct"
META: dict[str, Any] = json.loads((STRUCT / "meta.json").read_text())
ENC_CASES = {name: case for name, case in META["outputs"].items() if name.startswith("enc_")}
SPADE_CASES = {name: case for name, case in META["outputs"].items() if name.startswith("spade_")}
LATENTS = sorted({case["input"] for case in ENC_CASES.values()})
TIMESTEPS = sorted({case["timestep"] for case in ENC_CASES.values()}, reverse=True)
TINY_HEADS = 2  # stablesr_sampling's encoder config (the weights do not record it)




MW = make_weights


def _manifest(name: str) -> dict[str, Any]:
    return MW.load_manifest(str(FIXTURES / name / "manifest.json"))


def _meta_state_dict(name: str) -> dict[str, Tensor]:
    """Key set and shapes of a manifest without data (enough for detection and inference)."""
    return {k: torch.empty(shape, device="meta") for k, shape, _ in _manifest(name)["keys"]}


def _npy(path: Path) -> Tensor:
    return torch.from_numpy(np.load(path))


# ---------------------------------------------------------------------------- module-scoped models
@pytest.fixture(scope="module")
def struct_sd() -> dict[str, Tensor]:
    man = _manifest("stablesr_struct")
    return MW.make_state_dict(man, man["seed"])


@pytest.fixture(scope="module")
def desc(struct_sd: dict[str, Tensor]) -> StableSRDescriptor:
    return stablesr.load(struct_sd)


@pytest.fixture(scope="module")
def enc_outputs(desc: StableSRDescriptor) -> dict[str, dict[str, Tensor]]:
    """Encoder output per latent file, all fixture timesteps in one batch (B = 3)."""
    out: dict[str, dict[str, Tensor]] = {}
    with torch.inference_mode():
        for name in LATENTS:
            x = _npy(STRUCT / name).expand(len(TIMESTEPS), -1, -1, -1)
            out[name] = desc.encoder(x, torch.tensor(TIMESTEPS))
    return out


@pytest.fixture(scope="module")
def tiny_sd() -> dict[str, Tensor]:
    man = _manifest("stablesr_sampling")
    return MW.make_state_dict(man, man["seed"])


@pytest.fixture(scope="module")
def tiny(tiny_sd: dict[str, Tensor]) -> StableSRDescriptor:
    return stablesr.load(tiny_sd, num_heads=TINY_HEADS)


# ---------------------------------------------------------------------------- oracle fixtures
@pytest.mark.parametrize("case", sorted(ENC_CASES))
def test_encoder_matches_fixture(enc_outputs: dict[str, dict[str, Tensor]], case: str) -> None:
    spec = ENC_CASES[case]
    got = enc_outputs[spec["input"]]
    assert list(got) == spec["dict_keys"]  # official str(width) keys, finest first
    i = TIMESTEPS.index(spec["timestep"])
    atol = spec["suggested_tolerance"]["atol"]
    for key, ref_spec in spec["outputs"].items():
        ref = _npy(STRUCT / ref_spec["file"])
        out = got[key][i : i + 1]
        assert tuple(out.shape) == tuple(ref_spec["shape"])
        err = float((out - ref).abs().max())
        assert err <= atol, f"{case} key {key}: max abs error {err:.3g} > {atol}"


@pytest.mark.parametrize("case", sorted(SPADE_CASES))
def test_sft_layer_matches_fixture(desc: StableSRDescriptor, case: str) -> None:
    spec = SPADE_CASES[case]
    path = spec["layer_prefix"].removeprefix("model.diffusion_model.").removesuffix(".spade.")
    cond = {key: _npy(STRUCT / f["file"]) for key, f in ENC_CASES[spec["cond_from"]]["outputs"].items()}
    h = _npy(STRUCT / spec["h"]["file"])
    with torch.inference_mode():
        out = desc.sft_layers[path](h, cond)
    assert desc.sft_layers[path].channels == spec["channels"]
    err = float((out - _npy(STRUCT / spec["out"]["file"])).abs().max())
    assert err <= spec["suggested_tolerance"]["atol"], f"{case}: max abs error {err:.3g}"


def test_shape_keyed_lookup(
    desc: StableSRDescriptor, tiny: StableSRDescriptor, enc_outputs: dict[str, dict[str, Tensor]]
) -> None:
    by_width = {k: v[:1] for k, v in enc_outputs["latent_40x56.npy"].items()}
    by_shape = cond_by_shape(by_width.values())
    assert list(by_shape) == [(40, 56), (20, 28), (10, 14), (5, 7)]
    # a real SFT layer finds the same map through either key kind
    h = torch.randn(1, 640, 20, 28)
    with torch.inference_mode():
        torch.testing.assert_close(
            desc.sft_layers["input_blocks.4.0"](h, by_shape),
            desc.sft_layers["input_blocks.4.0"](h, by_width),
            atol=0,
            rtol=0,
        )
        x = torch.randn(1, 4, 12, 2)  # every level after the first is 1 wide: width keys collide
        levels = tiny.encoder.forward_levels(x, 500)  # scalar timestep broadcast
        shaped = tiny.encoder.forward_by_shape(x, torch.tensor([500]))
        widths = tiny.encoder(x, torch.tensor([500.0]))
    assert [tuple(f.shape[-2:]) for f in levels] == [(12, 2), (6, 1), (3, 1)]
    assert list(shaped) == [(12, 2), (6, 1), (3, 1)] and list(widths) == ["2", "1"]
    torch.testing.assert_close(widths["1"], levels[2], atol=0, rtol=0)  # official: the deepest map wins
    torch.testing.assert_close(shaped[(6, 1)], levels[1], atol=0, rtol=0)


# ---------------------------------------------------------------------------- configuration inference
def test_config_inferred_from_real_size_manifest() -> None:
    sd = _meta_state_dict("stablesr_struct")
    cfg = stablesr.infer_config(sd)
    args = _manifest("stablesr_struct")["constructor_args"]["structcond_stage_model (EncoderUNetModelWT)"]
    enc = cfg["encoder"]
    for name in ("in_channels", "model_channels", "out_channels", "num_res_blocks", "num_heads", "num_head_channels"):
        assert enc[name] == args[name], name
    assert enc["channel_mult"] == args["channel_mult"]
    assert sorted(enc["attention_resolutions"]) == sorted(args["attention_resolutions"])
    assert enc["use_scale_shift_norm"] is False and enc["time_embed_dim"] == 1024
    assert cfg["full_checkpoint"] is False
    assert cfg["sft"] == {"cond_channels": 256, "hidden_channels": 128, "num_layers": 22}
    unet = cfg["unet"]
    assert list(unet["resblock_channels"]) == META["spade_layers"]
    assert list(unet["resblock_channels"].values()) == [320, 320, 640, 640] + [1280] * 12 + [640] * 3 + [320] * 3
    assert (unet["model_channels"], unet["channel_mult"], unet["num_res_blocks"]) == (320, [1, 2, 4, 4], 2)


def test_config_inferred_from_tiny_manifest() -> None:
    sd = _meta_state_dict("stablesr_sampling")
    cfg = stablesr.infer_config(sd, num_heads=TINY_HEADS)
    args = _manifest("stablesr_sampling")["constructor_args"]["structcond_stage_config.params"]
    enc = cfg["encoder"]
    for name in ("in_channels", "model_channels", "out_channels", "num_res_blocks", "num_heads"):
        assert enc[name] == args[name], name
    assert enc["channel_mult"] == args["channel_mult"]
    assert sorted(enc["attention_resolutions"]) == sorted(args["attention_resolutions"])
    assert cfg["full_checkpoint"] is True  # the tiny manifest holds the whole UNet
    unet = cfg["unet"]
    assert list(unet["resblock_channels"]) == [
        "input_blocks.1.0",
        "input_blocks.3.0",
        "input_blocks.5.0",
        "middle_block.0",
        "middle_block.2",
    ] + [f"output_blocks.{i}.0" for i in range(6)]
    assert (unet["model_channels"], unet["channel_mult"], unet["num_res_blocks"], unet["in_channels"]) == (
        32,
        [1, 2, 2],
        1,
        4,
    )
    assert cfg["sft"]["cond_channels"] == 32


def test_real_size_parameter_counts(desc: StableSRDescriptor) -> None:
    enc = sum(p.numel() for p in desc.encoder.parameters())
    sft = sum(p.numel() for p in desc.sft_layers.parameters())
    assert abs(enc / 1e6 - 52.49) < 0.01 and sft == 53_020_160
    assert desc.purpose == "Module" and desc.scale == 1 and desc.arch == "stablesr"
    assert not any(p.requires_grad for p in desc.model.parameters())


def test_state_dict_round_trips_to_released_keys(tiny: StableSRDescriptor, tiny_sd: dict[str, Tensor]) -> None:
    official = tiny.model.official_state_dict()
    module_keys = [k for k in tiny_sd if k.startswith("structcond_stage_model.") or ".spade." in k]
    assert sorted(official) == sorted(module_keys)
    for k in module_keys:
        assert torch.equal(official[k], tiny_sd[k]), k


def test_inconsistent_state_dicts_are_refused(tiny_sd: dict[str, Tensor]) -> None:
    sd = dict(tiny_sd)
    del sd["structcond_stage_model.fea_tran.2.in_layers.2.weight"]
    with pytest.raises(UnsupportedModelError, match="fea_tran"):
        stablesr.load(sd)
    sd = dict(tiny_sd)
    sd["model.diffusion_model.output_blocks.5.0.spade.mlp_gamma.weight"] = torch.zeros(16, 128, 3, 3)
    with pytest.raises(UnsupportedModelError, match="mlp_gamma"):
        stablesr.load(sd)
    sd = {k: v for k, v in tiny_sd.items() if k.startswith("structcond_stage_model.")}
    with pytest.raises(UnsupportedModelError, match="not a StableSR SR module"):
        stablesr.infer_config(sd)


# ---------------------------------------------------------------------------- loading containers
def _module_only(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """What tools/extract_srmodule.py keeps: keys containing 'spade' or 'structcond'."""
    return {k: v for k, v in sd.items() if "spade" in k or "structcond" in k}


@pytest.mark.parametrize("ext", [".ckpt", ".safetensors"])
def test_load_extracted_module_file(tiny_sd: dict[str, Tensor], tmp_path: Path, ext: str) -> None:
    path = tmp_path / f"webui_module{ext}"
    MW.save_checkpoint(_module_only(tiny_sd), str(path), "flat")
    d = registry.load_model(path)
    assert isinstance(d, StableSRDescriptor) and d.arch == "stablesr" and d.purpose == "Module"
    assert d.config["full_checkpoint"] is False and d.ignored_keys == []
    assert d.config["encoder"]["num_heads"] == 4  # the released default when nothing says otherwise
    assert len(d.sft_layers) == 11
    torch.testing.assert_close(
        d.encoder.input_blocks[0][0].weight, tiny_sd["structcond_stage_model.input_blocks.0.0.weight"]
    )


def test_load_full_lightning_checkpoint(tiny_sd: dict[str, Tensor], tmp_path: Path) -> None:
    extra = {
        "first_stage_model.encoder.conv_in.weight": torch.randn(8, 3, 3, 3),
        "first_stage_model.decoder.conv_out.weight": torch.randn(3, 8, 3, 3),
        "cond_stage_model.model.token_embedding.weight": torch.randn(10, 8),
        "betas": torch.linspace(1e-4, 2e-2, 1000),
        "alphas_cumprod": torch.rand(1000),
    }
    full = {**tiny_sd, **extra}
    assert "model.diffusion_model.input_blocks.0.0.weight" in full
    path = tmp_path / "stablesr_000117.ckpt"
    MW.save_checkpoint(full, str(path), "state_dict")
    d = registry.load_model(path)
    assert isinstance(d, StableSRDescriptor)
    assert d.config["full_checkpoint"] is True and d.name.endswith("(from a full checkpoint)")
    unet_keys = [k for k in tiny_sd if k.startswith("model.diffusion_model.") and ".spade." not in k]
    assert sorted(d.ignored_keys) == sorted(unet_keys + list(extra))
    assert d.describe()["ignored_keys"] == len(unet_keys) + len(extra)
    official = d.model.official_state_dict()
    for k, v in _module_only(tiny_sd).items():
        assert torch.equal(official[k], v), k


def test_ignored_tensors_are_not_kept(tiny_sd: dict[str, Tensor]) -> None:
    big = torch.zeros(1000, 1000)
    ref = weakref.ref(big)
    sd = {**tiny_sd, "first_stage_model.decoder.conv_out.weight": big}
    d = registry.load_model({"state_dict": sd})
    del sd, big
    gc.collect()
    assert ref() is None
    assert "first_stage_model.decoder.conv_out.weight" in d.ignored_keys


def test_forward_refuses_with_a_clear_message(tiny: StableSRDescriptor) -> None:
    with pytest.raises(InvalidInputError, match="StableSR sampler"):
        tiny(torch.zeros(1, 3, 16, 16))


# ---------------------------------------------------------------------------- detection
@pytest.mark.parametrize("name", ["stablesr_struct", "stablesr_sampling"])
def test_detects_stablesr_module(name: str) -> None:
    sd = _meta_state_dict(name)
    assert stablesr.detect(sd)
    arch = registry.detect(sd)
    assert arch is not None and arch.id == "stablesr"


@pytest.mark.parametrize("name", ["femasr_x4", "femasr_x2", "femasr_hrp", "mmrealsr_x4", "stablesr_cfw"])
def test_does_not_claim_other_models(name: str) -> None:
    sd = _meta_state_dict(name)
    assert not stablesr.detect(sd)
    arch = registry.detect(sd)
    assert arch is None or arch.id != "stablesr"


def test_registered_first() -> None:
    assert registry.architectures()[0].id == "stablesr"


# ---------------------------------------------------------------------------- building blocks
def test_timestep_embedding_is_float32_cos_first() -> None:
    emb = timestep_embedding(torch.tensor([0, 999], dtype=torch.float64), 8)
    assert emb.dtype == torch.float32 and emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-np.log(10000.0) * torch.arange(4) / 4)
    torch.testing.assert_close(emb[1, :4], torch.cos(999 * freqs))
    assert timestep_embedding(torch.tensor([3.0]), 7)[0, -1] == 0


def test_legacy_attention_head_layout() -> None:
    torch.manual_seed(0)
    block = LegacyAttentionBlock(64, num_heads=2)
    with torch.no_grad():
        block.proj_out.weight.normal_(0, 0.1)
    x = torch.randn(2, 64, 5, 6)
    # explicit legacy QKV attention: per head [q | k | v] consecutive channels
    flat = x.reshape(2, 64, 30)
    qkv = block.qkv(block.norm(flat)).reshape(2 * 2, 3 * 32, 30)
    q, k, v = qkv.split(32, dim=1)
    w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / np.sqrt(32), dim=-1)
    a = torch.einsum("bts,bcs->bct", w, v).reshape(2, 64, 30)
    expected = (flat + block.proj_out(a)).reshape(x.shape)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)
    # the inputs qualify for the fused kernel (no N x N matrix): restricted to it, SDPA must not refuse
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.no_grad():
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_encoder_batch_and_dtypes(tiny: StableSRDescriptor) -> None:
    x = torch.randn(2, 4, 12, 10)
    with torch.inference_mode():
        both = tiny.encoder(x, torch.tensor([10, 700]))
        one = tiny.encoder(x[1:], torch.tensor([700]))
        enc16 = TimeAwareEncoder(tiny.encoder.config).to(torch.bfloat16)
        enc16.load_state_dict(tiny.encoder.state_dict())
        low = enc16(x[1:], 700)
    assert list(both) == ["10", "5", "3"]
    for k in both:
        torch.testing.assert_close(both[k][1:], one[k], atol=1e-5, rtol=1e-5)
        assert low[k].dtype == torch.bfloat16
        assert float((low[k].float() - one[k]).abs().max()) < 0.1 * float(one[k].abs().max())
    with pytest.raises(InvalidInputError, match="latent"):
        tiny.encoder(torch.randn(1, 3, 8, 8), 1)
    with pytest.raises(InvalidInputError, match="timesteps"):
        tiny.encoder(torch.randn(3, 4, 8, 8), torch.tensor([1, 2]))


def test_select_cond_lookup_rules() -> None:
    a, b, c = torch.randn(1, 8, 16, 2), torch.randn(1, 8, 8, 1), torch.randn(1, 8, 4, 1)
    by_shape = cond_by_shape([a, b, c])
    by_width = {str(t.shape[-1]): t for t in (a, b, c)}  # the official dict: '1' is the deepest map
    feat = torch.zeros(1, 4, 8, 1)
    assert select_cond(by_shape, feat) is b
    # width-keyed: the 4x1 map is resized to 8x1 (nearest)
    torch.testing.assert_close(select_cond(by_width, feat), c.repeat_interleave(2, dim=2))
    with pytest.raises(InvalidInputError, match="no StableSR condition map"):
        select_cond(by_width, torch.zeros(1, 4, 8, 3))


def test_sft_layers_addressing_and_batch_tiling() -> None:
    layers = SFTLayers({"output_blocks.2.0": 64, "input_blocks.1.0": 32, "middle_block.0": 64}, 16, 8)
    assert layers.paths == ["input_blocks.1.0", "middle_block.0", "output_blocks.2.0"]
    assert "middle_block.0" in layers and layers.get("middle_block.2") is None
    assert sorted(layers.state_dict())[0] == "input_blocks.1.0.mlp_beta.bias"
    with pytest.raises(KeyError, match="modulated ResBlocks"):
        layers["input_blocks.2.0"]
    with pytest.raises(UnsupportedModelError):
        SFTLayers({"input_blocks.1": 32})
    layer = layers["input_blocks.1.0"]
    cond = {"6": torch.randn(1, 16, 5, 6)}
    h = torch.randn(3, 32, 5, 6)
    out = layer(h, cond)
    torch.testing.assert_close(out, layer(h, {"6": cond["6"].expand(3, -1, -1, -1)}))
    cond2 = {"6": torch.randn(2, 16, 5, 6)}
    h4 = torch.randn(4, 32, 5, 6)
    # [cond chunk, uncond chunk] batching: the condition batch is tiled, not interleaved
    torch.testing.assert_close(layer(h4, cond2), layer(h4, {"6": torch.cat([cond2["6"]] * 2)}))
    with pytest.raises(InvalidInputError, match="does not divide"):
        layer(torch.randn(3, 32, 5, 6), cond2)
    # half-precision features keep their dtype; the norm is computed in float32
    assert layer(h.to(torch.bfloat16), cond).dtype == torch.bfloat16


# ---------------------------------------------------------------------------- ResBlock hook
class LdmResBlock(nn.Module):
    """A hand-built ldm/ComfyUI-style ResBlock (attribute names of the SD UNet), for the hook tests."""

    def __init__(
        self, cin: int, cout: int, emb: int, scale_shift: bool = False, updown: bool = False, flags: bool = True
    ) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(32, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, 2 * cout if scale_shift else cout))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(32, cout), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(cout, cout, 3, padding=1)
        )
        self.skip_connection = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        if flags:  # a host's block may lack the optional attributes altogether
            self.use_scale_shift_norm = scale_shift
            self.updown = updown
        if updown:
            self.h_upd = nn.AvgPool2d(2)
            self.x_upd = nn.AvgPool2d(2)


def _explicit_sft(layer: SFTLayer, h: Tensor, seg: Tensor) -> Tensor:
    actv = F.relu(F.conv2d(seg, layer.mlp_shared[0].weight, layer.mlp_shared[0].bias, padding=1))
    gamma = F.conv2d(actv, layer.mlp_gamma.weight, layer.mlp_gamma.bias, padding=1)
    beta = F.conv2d(actv, layer.mlp_beta.weight, layer.mlp_beta.bias, padding=1)
    n = layer.param_free_norm
    return F.group_norm(h, 32, n.weight, n.bias, 1e-5) * (1 + gamma) + beta


def _explicit_block(block: LdmResBlock, layer: SFTLayer | None, x: Tensor, emb: Tensor, seg: Tensor) -> Tensor:
    il, ol = block.in_layers, block.out_layers
    h = F.silu(il[0](x))
    skip_in = x
    if getattr(block, "updown", False):
        h, skip_in = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
    h = il[2](h)
    e = block.emb_layers[1](F.silu(emb))[:, :, None, None]
    if getattr(block, "use_scale_shift_norm", False):
        scale, shift = e.chunk(2, dim=1)
        h = ol[3](F.silu(ol[0](h) * (1 + scale) + shift))
    else:
        h = ol[3](F.silu(ol[0](h + e)))
    if layer is not None:
        h = _explicit_sft(layer, h, seg)
    return block.skip_connection(skip_in) + h


@pytest.mark.parametrize("variant", ["plain", "scale_shift", "updown", "no_optional_attrs"])
def test_resblock_forward_with_sft_matches_explicit(variant: str) -> None:
    torch.manual_seed(1)
    block = LdmResBlock(
        64,
        96,
        40,
        scale_shift=variant == "scale_shift",
        updown=variant == "updown",
        flags=variant != "no_optional_attrs",
    )
    assert hasattr(block, "updown") == (variant != "no_optional_attrs")
    layer = SFTLayer(96, cond_channels=16, hidden_channels=24)
    with torch.no_grad():
        for p in list(block.parameters()) + list(layer.parameters()):
            p.normal_(0, 0.2)
    x, emb = torch.randn(2, 64, 12, 10), torch.randn(2, 40)
    side = 5 if variant == "updown" else 10
    seg = torch.randn(2, 16, 6 if variant == "updown" else 12, side)
    cond = {str(side): seg}
    with torch.no_grad():
        got = resblock_forward_with_sft(block, x, emb, layer, cond)
        expected = _explicit_block(block, layer, x, emb, seg)
        plain = resblock_forward_with_sft(block, x, emb, None, cond)
        expected_plain = _explicit_block(block, None, x, emb, seg)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, expected_plain, atol=1e-5, rtol=1e-5)
    assert float((got - plain).abs().max()) > 1e-2  # the SFT really acts


def test_hook_on_encoder_resblock_and_bound_forward() -> None:
    torch.manual_seed(2)
    block = TimestepResBlock(32, 64, 64)
    layer = SFTLayer(64, cond_channels=8, hidden_channels=16)
    x, emb = torch.randn(1, 32, 6, 7), torch.randn(1, 64)
    with torch.no_grad():
        torch.testing.assert_close(resblock_forward_with_sft(block, x, emb, None, {}), block(x, emb))
        conds = [{"7": torch.randn(1, 8, 6, 7)}, {"7": torch.randn(1, 8, 6, 7)}]
        current = {"i": 0}
        fwd = bind_sft_forward(block, layer, lambda: conds[current["i"]])
        a = fwd(x, emb, {})  # hosts may pass transformer_options positionally
        current["i"] = 1
        b = fwd(x, emb, transformer_options={})
        torch.testing.assert_close(a, resblock_forward_with_sft(block, x, emb, layer, conds[0]))
        torch.testing.assert_close(b, resblock_forward_with_sft(block, x, emb, layer, conds[1]))
        calls: list[str] = []

        def gn_wrapper(norm: nn.Module, h: Tensor, opts: dict[str, Any]) -> Tensor:
            calls.append(type(norm).__name__)
            return norm(h)

        c = resblock_forward_with_sft(block, x, emb, layer, conds[1], {"group_norm_wrapper": gn_wrapper})
    torch.testing.assert_close(c, b)
    assert len(calls) == 2


def test_encoder_config_defaults_are_the_released_ones() -> None:
    cfg = EncoderConfig()
    assert (cfg.model_channels, cfg.channel_mult, cfg.num_res_blocks, cfg.num_heads, cfg.emb_channels) == (
        256,
        (1, 1, 2, 2),
        2,
        4,
        1024,
    )
