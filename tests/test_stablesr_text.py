"""The SD 2.x text encoder (OpenCLIP ViT-H/14 text tower, penultimate layer) without a host.

* Oracle fixture ``stablesr_text``: the official OpenCLIP modules (open_clip 3.3.0) run in LDM's
  ``FrozenOpenCLIPEmbedder(layer="penultimate")`` order on a small tower (width 128, 2 heads, 3 blocks,
  context 77, vocabulary 49408), float64 reference; our float32 tower must land within the fixture's
  suggested atol (10x the official float32-vs-float64 difference, 2e-5 here; outputs have std ~1).
* The empty prompt's tokens are the fixed ``[SOT, EOT, 0...]`` and need no tokenizer.
* Configuration inference, and refusals naming the offending key (missing, wrong shape, a gap in the
  blocks, unknown tensors inside the blocks, NaN weights).
* ``tokenize`` of a real prompt without open-clip-torch: a clear InvalidInputError (CI has no open_clip); with
  it installed, the fixture's tokens are reproduced.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

import numpy as np
import pytest
import torch
from helpers import FIXTURES, fixture_meta, fixture_state_dict

from realsr_core.errors import CheckpointError, InvalidInputError, UnsupportedModelError
from realsr_core.models.stablesr.text import (
    EOT_TOKEN,
    SOT_TOKEN,
    TEXT_PREFIX,
    OpenCLIPTextTower,
    empty_prompt_tokens,
    infer_text_config,
    is_text_state_dict,
    tokenize,
)

NAME = "stablesr_text"
FIX = FIXTURES / NAME
META: dict[str, Any] = fixture_meta(NAME)
ATOL = META["suggested_tolerance"]["atol"]
HAS_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    """The fixture's weights under their SD checkpoint names (cond_stage_model.model.*), ~0.3 s to draw."""
    return fixture_state_dict(NAME)


@pytest.fixture(scope="module")
def tower(state_dict: dict[str, torch.Tensor]) -> OpenCLIPTextTower:
    return OpenCLIPTextTower.from_state_dict(state_dict)


def test_matches_official_penultimate_context(tower: OpenCLIPTextTower) -> None:
    tokens = torch.from_numpy(np.load(FIX / "tokens.npy"))
    ref = torch.from_numpy(np.load(FIX / "context.npy"))
    with torch.no_grad():
        out = tower(tokens[: len(ref)])
    assert out.shape == ref.shape == (2, 77, 128) and out.dtype == torch.float32
    err = float((out - ref).abs().max())
    assert err <= ATOL, f"max abs error {err:.3g} > atol {ATOL}"
    # The empty prompt's context needs no tokenizer: the fixed tokens give the same rows.
    with torch.no_grad():
        empty = tower(empty_prompt_tokens(3))
    assert torch.allclose(empty, ref[:1].expand(3, -1, -1), atol=ATOL, rtol=0)
    assert torch.equal(tower.encode(["", "  "]), tower(empty_prompt_tokens(2)))


def test_causal_padding_does_not_reach_earlier_tokens(tower: OpenCLIPTextTower) -> None:
    """Token t sees only tokens <= t: changing the padding after EOT leaves SOT..EOT unchanged."""
    tokens = empty_prompt_tokens(1)
    other = tokens.clone()
    other[0, 2:] = 123
    with torch.no_grad():
        a, b = tower(tokens), tower(other)
    assert torch.equal(a[:, :2], b[:, :2])
    assert not torch.allclose(a[:, 2:], b[:, 2:])


def test_empty_prompt_tokens_are_fixed() -> None:
    fixture = torch.from_numpy(np.load(FIX / "tokens.npy"))[0]  # open_clip.tokenize("")
    tokens = empty_prompt_tokens()
    assert tokens.dtype == torch.int64 and tokens.shape == (1, 77)
    assert tokens[0, :2].tolist() == [SOT_TOKEN, EOT_TOKEN] == [49406, 49407]
    assert not tokens[0, 2:].any()
    assert torch.equal(tokens[0], fixture)
    assert torch.equal(empty_prompt_tokens(4), tokens.expand(4, -1))
    assert empty_prompt_tokens(2, context_length=5).tolist() == [[49406, 49407, 0, 0, 0]] * 2
    # Empty and whitespace-only prompts need no tokenizer, installed or not.
    assert torch.equal(tokenize(["", " \t\n"]), empty_prompt_tokens(2))
    assert torch.equal(tokenize(""), tokens)


def test_config_is_read_from_shapes(state_dict: dict[str, torch.Tensor], tower: OpenCLIPTextTower) -> None:
    cfg = infer_text_config(state_dict)
    assert (cfg.width, cfg.layers, cfg.heads, cfg.context_length, cfg.vocab_size, cfg.mlp_width) == (
        128,
        3,
        2,
        77,
        49408,
        512,
    )
    assert cfg.used_layers == 2 and len(tower.transformer.resblocks) == 2  # the last block is never run
    assert infer_text_config(state_dict, heads=4).heads == 4
    assert is_text_state_dict(state_dict) and not is_text_state_dict(state_dict, prefix="model.")
    # A bare tower (prefix ""), its keys shared with the checkpoint: same module.
    bare = {k[len(TEXT_PREFIX) :]: v for k, v in state_dict.items()}
    assert infer_text_config(bare, prefix="") == cfg
    # The real ViT-H/14 text tower, read from meta tensors (shapes only).
    vit_h = _vit_h_shapes()
    cfg_h = infer_text_config(vit_h)
    assert (cfg_h.width, cfg_h.layers, cfg_h.heads, cfg_h.context_length, cfg_h.vocab_size, cfg_h.mlp_width) == (
        1024,
        24,
        16,
        77,
        49408,
        4096,
    )


def _vit_h_shapes() -> dict[str, torch.Tensor]:
    w, p = 1024, TEXT_PREFIX
    sd = {
        p + "token_embedding.weight": (49408, w),
        p + "positional_embedding": (77, w),
        p + "ln_final.weight": (w,),
        p + "text_projection": (w, w),
        p + "logit_scale": (),
    }
    for i in range(24):
        b = f"{p}transformer.resblocks.{i}."
        sd.update({b + "attn.in_proj_weight": (3 * w, w), b + "mlp.c_fc.weight": (4 * w, w)})
    return {k: torch.empty(s, device="meta") for k, s in sd.items()}


def test_ignores_what_sd_never_uses(state_dict: dict[str, torch.Tensor], tower: OpenCLIPTextTower) -> None:
    """A vision tower, the projection, the logit scale, other models' keys and the last block are not read."""
    sd = dict(state_dict)
    sd[TEXT_PREFIX + "visual.proj"] = torch.zeros(3, 3)
    sd["model.diffusion_model.out.2.weight"] = torch.zeros(4, 320, 3, 3)
    sd[TEXT_PREFIX + "text_projection"] = torch.full((128, 128), float("nan"))
    last = TEXT_PREFIX + "transformer.resblocks.2."
    sd[last + "mlp.c_fc.weight"] = torch.zeros(1)  # unused block: its values do not matter
    tokens = torch.from_numpy(np.load(FIX / "tokens.npy"))
    with torch.no_grad():
        assert torch.equal(OpenCLIPTextTower.from_state_dict(sd)(tokens), tower(tokens))


def test_half_checkpoint_loads_as_float32(state_dict: dict[str, torch.Tensor], tower: OpenCLIPTextTower) -> None:
    half = {k: v.half() for k, v in state_dict.items()}
    t = OpenCLIPTextTower.from_state_dict(half)
    assert t.positional_embedding.dtype == torch.float32 and not t.positional_embedding.requires_grad
    tokens = empty_prompt_tokens(1)
    with torch.no_grad():
        assert (t(tokens) - tower(tokens)).abs().max() < 0.05  # only the float16 rounding of the weights


@pytest.mark.parametrize(
    ("edit", "key", "error", "words"),
    [
        ("drop", "transformer.resblocks.1.ln_2.bias", UnsupportedModelError, "missing"),
        ("drop", "ln_final.weight", UnsupportedModelError, "missing"),
        ("drop", "token_embedding.weight", UnsupportedModelError, "lacks"),
        ("drop", "transformer.resblocks.1.attn.in_proj_weight", UnsupportedModelError, "lacks"),
        ("shape", "transformer.resblocks.1.attn.in_proj_weight", UnsupportedModelError, "(384, 127)"),
        ("shape", "transformer.resblocks.0.mlp.c_proj.weight", UnsupportedModelError, "shape"),
        ("shape", "ln_final.bias", UnsupportedModelError, "shape"),
        ("rank", "positional_embedding", UnsupportedModelError, "2-D"),
        ("rank", "token_embedding.weight", UnsupportedModelError, "2-D"),
        ("extra", "transformer.resblocks.0.ls_1.gamma", UnsupportedModelError, "unexpected"),
        ("nan", "transformer.resblocks.0.mlp.c_fc.bias", CheckpointError, "NaN"),
        ("int", "transformer.resblocks.1.ln_1.weight", CheckpointError, "floating"),
    ],
)
def test_refuses_bad_tensors_naming_the_key(
    state_dict: dict[str, torch.Tensor], edit: str, key: str, error: type[Exception], words: str
) -> None:
    sd = dict(state_dict)
    name = TEXT_PREFIX + key
    if edit == "drop":
        del sd[name]
    elif edit == "shape":
        sd[name] = torch.zeros(sd[name].shape[0], sd[name].shape[-1] - 1) if sd[name].ndim == 2 else torch.zeros(3)
    elif edit == "rank":
        sd[name] = sd[name].flatten()
    elif edit == "extra":
        sd[name] = torch.ones(128)
    elif edit == "nan":
        sd[name] = sd[name].clone()
        sd[name][0] = float("nan")
    elif edit == "int":
        sd[name] = sd[name].to(torch.int64)
    with pytest.raises(error) as info:
        OpenCLIPTextTower.from_state_dict(sd)
    msg = str(info.value)
    assert name in msg and words in msg, msg


def test_refuses_bad_configurations(state_dict: dict[str, torch.Tensor]) -> None:
    one_block = {k: v for k, v in state_dict.items() if ".resblocks.1." not in k and ".resblocks.2." not in k}
    with pytest.raises(UnsupportedModelError, match="at least 2 residual blocks"):
        infer_text_config(one_block)
    with pytest.raises(UnsupportedModelError, match="3 attention heads"):
        infer_text_config(state_dict, heads=3)
    odd = dict(state_dict)
    odd[TEXT_PREFIX + "positional_embedding"] = torch.zeros(77, 64)
    with pytest.raises(UnsupportedModelError, match="positional_embedding"):
        infer_text_config(odd)


def test_refuses_bad_tokens(tower: OpenCLIPTextTower) -> None:
    with pytest.raises(InvalidInputError, match=r"\(B, 77\)"):
        tower(torch.zeros(1, 76, dtype=torch.int64))
    with pytest.raises(InvalidInputError, match="int64"):
        tower(torch.zeros(1, 77))
    bad = empty_prompt_tokens(1)
    bad[0, 3] = 49408
    with pytest.raises(InvalidInputError, match="49408"):
        tower(bad)
    with pytest.raises(InvalidInputError, match="strings"):
        tokenize(["a cat", 3])  # type: ignore[list-item]


def test_prompt_without_open_clip_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    if HAS_OPEN_CLIP:
        pytest.skip("open_clip is installed here: the missing-tokenizer error cannot be seen")
    with pytest.raises(InvalidInputError, match="pip install open-clip-torch"):
        tokenize("a photo of a cat")
    with pytest.raises(InvalidInputError, match="pip install open-clip-torch"):
        tokenize(["", "a photo of a cat"])


@pytest.mark.skipif(not HAS_OPEN_CLIP, reason="open-clip-torch is an optional extra")
def test_prompt_tokens_match_open_clip_without_importing_torchvision() -> None:
    fixture = torch.from_numpy(np.load(FIX / "tokens.npy"))
    fresh = "open_clip" not in sys.modules
    assert torch.equal(tokenize(META["prompts"]), fixture)
    if fresh:  # the tokenizer is loaded on its own: open_clip's package (and torchvision) stay unimported
        assert "open_clip" not in sys.modules and "torchvision" not in sys.modules
