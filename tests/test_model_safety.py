"""Models that cannot lie: a checkpoint whose weights are NaN/inf or integers, whose configuration tensors
have the wrong rank, or whose pickle asks for code is refused at load with a message naming the file and
the tensor (or the code asked for), and the file on disk is left untouched."""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import ROOT, drop_root_override, fixture_state_dict
from safetensors.torch import load_file, save_file
from torch import Tensor

import realsr_core.registry as registry
from realsr_core import CheckpointError, UnsupportedModelError, load_model
from realsr_core.descriptor import Architecture
from realsr_core.models.femasr.network import FeMaSRConfig, FeMaSRNet, SwinConfig
from realsr_core.models.mmrealsr import MMRealSRNet
from realsr_core.models.stablesr.cfw import build_vae
from realsr_core.weights import builtin_path

StateDict = dict[str, Tensor]


# ---------------------------------------------------------------------------------------- small real models
def _crlsr() -> StateDict:
    return load_file(str(builtin_path("crlsr_x4.safetensors")))


def _lway() -> StateDict:
    return load_file(str(builtin_path("lway_rec.safetensors")))


def _mmrealsr() -> StateDict:
    torch.manual_seed(0)
    net = MMRealSRNet(num_feat=16, num_block=1, num_grow_ch=8, embed_dim=32,
                      de_num_feats=(16, 32), de_num_blocks=(1, 1), de_downscales=(2, 1), de_hidden_dim=32)
    return net.state_dict()


def _femasr() -> StateDict:
    """A small FeMaSR x2 in the official layout, with its int64 ``relative_position_index`` buffers."""
    cfg = FeMaSRConfig(stem_channels=32, down_channels=(32,), codebook_size=16, codebook_dim=32,
                       decoder_channels=(32, 32), swin=SwinConfig(1, (0, 2), 2, 4, 64, 8), up_channels=(32,))
    torch.manual_seed(0)
    return FeMaSRNet(cfg).state_dict()


def _stablesr() -> StateDict:
    """The SR module (encoder + SFT keys, released names) of the tiny StableSR fixture."""
    sd = fixture_state_dict("stablesr_sampling")
    return {k: v for k, v in sd.items() if k.startswith("structcond_stage_model.") or ".spade." in k}


def _cfw() -> StateDict:
    """A small CFW VAE (LDM layout plus ``decoder.fusion_layer_*``)."""
    config = {"in_channels": 3, "out_channels": 3, "ch": 32, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1,
              "z_channels": 4, "double_z": True, "embed_dim": 4, "enc_attn_levels": [], "dec_attn_levels": [],
              "mid_attn": True, "shortcut": "nin_shortcut", "feature_levels": [1, 2], "fusion_levels": [1, 2],
              "num_rrdb": 1, "grow_channels": 16}
    torch.manual_seed(0)
    return build_vae(config).state_dict()


# family: (builder, arch id, a weight the model uses, a tensor the configuration inference reads, .pth wrapper)
FAMILIES: dict[str, tuple[Callable[[], StateDict], str, str, str, str]] = {
    "crlsr": (_crlsr, "crlsr", "refine.body.0.conv1.weight", "encoder_lr.head.weight", "params"),
    "mmrealsr": (_mmrealsr, "mmrealsr", "body.0.rdb1.conv3.weight", "conv_first.weight", "params"),
    "femasr": (_femasr, "femasr", "decoder_group.0.block.2.conv.2.weight", "multiscale_encoder.in_conv.weight",
               "params"),
    "stablesr": (_stablesr, "stablesr", "model.diffusion_model.input_blocks.1.0.spade.mlp_gamma.weight",
                 "structcond_stage_model.input_blocks.0.0.weight", "state_dict"),
    "cfw": (_cfw, "stablesr_cfw", "decoder.mid.block_1.conv1.weight", "encoder.conv_in.weight", "state_dict"),
    "lway": (_lway, "lway", "reconstructor.conv_hr.weight", "encoder.conv_first.weight", "params"),
}


@functools.cache
def _state_dict(family: str) -> StateDict:
    return FAMILIES[family][0]()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save(sd: StateDict, path: Path, wrapper: str) -> None:
    sd = {k: v.contiguous() for k, v in sd.items()}
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save({wrapper: sd}, path)


def _with_nan(t: Tensor) -> Tensor:
    t = t.clone()
    t.view(-1)[:3] = float("nan")
    return t


def _with_inf(t: Tensor) -> Tensor:
    t = t.clone()
    t.view(-1)[-1] = float("inf")
    return t


# corruption: (which tensor, how, error type, what the message must also say)
CORRUPTIONS = {
    "nan": ("weight", _with_nan, CheckpointError, "3 NaN"),
    "inf": ("weight", _with_inf, CheckpointError, "1 inf"),
    "int64": ("weight", lambda t: (t * 100).round().to(torch.int64), CheckpointError, "torch.int64"),
    "scalar_0d": ("config", lambda t: torch.tensor(1.0), UnsupportedModelError, "shape ()"),
    "vector_1d": ("config", lambda t: torch.ones(8), UnsupportedModelError, "shape (8,)"),
}


# ---------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_intact_small_models_load(family: str) -> None:
    """The corrupted files below differ from a loadable one by one tensor only."""
    assert load_model(_state_dict(family)).arch == FAMILIES[family][1]


@pytest.mark.parametrize("ext", [".safetensors", ".pth"])
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_corrupted_checkpoint_is_refused_naming_the_tensor(tmp_path: Path, family: str, corruption: str,
                                                           ext: str) -> None:
    _, _, weight_key, config_key, wrapper = FAMILIES[family]
    which, corrupt, error, detail = CORRUPTIONS[corruption]
    key = weight_key if which == "weight" else config_key
    sd = dict(_state_dict(family))
    sd[key] = corrupt(sd[key])
    path = tmp_path / f"{family}_{corruption}{ext}"
    _save(sd, path, wrapper)
    before = _sha256(path)
    with pytest.raises(error) as info:
        load_model(path)
    msg = str(info.value)
    assert path.name in msg and repr(key) in msg and detail in msg, msg
    if corruption in ("nan", "inf"):
        assert "diverged training" in msg and "download it again" in msg
    assert _sha256(path) == before


def test_value_messages(tmp_path: Path) -> None:
    sd = dict(_state_dict("crlsr"))
    sd["refine.body.0.conv1.weight"] = _with_nan(sd["refine.body.0.conv1.weight"])
    sd["refine.body.1.conv1.weight"] = _with_inf(sd["refine.body.1.conv1.weight"])
    path = tmp_path / "diverged.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    assert str(info.value).startswith(
        "diverged.safetensors: CRL-SR weights are not usable: 2 tensor(s) contain NaN or infinite values: "
        "'refine.body.0.conv1.weight' (3 NaN of 36864 values), "
        "'refine.body.1.conv1.weight' (1 inf of 36864 values). "
    ), str(info.value)
    sd = {k: v.to(torch.int64) if k.startswith("refine.body.") else v for k, v in _state_dict("crlsr").items()}
    with pytest.raises(CheckpointError, match=r"tensor\(s\) that must hold floating-point weights .* and \d+ more"):
        load_model(sd)


def test_renamed_keys_are_named_as_in_the_file() -> None:
    """StableSR loads its SFT tensors under other names: the message gives the file's."""
    key = "model.diffusion_model.middle_block.0.spade.mlp_shared.0.bias"
    sd = dict(_state_dict("stablesr"))
    sd[key] = _with_inf(sd[key])
    with pytest.raises(CheckpointError, match=repr(key).replace(".", r"\.")):
        load_model(sd)


def test_float64_beyond_float32_range_is_refused() -> None:
    sd = dict(_state_dict("mmrealsr"))
    sd["conv_last.weight"] = sd["conv_last.weight"].double() * 1e300
    with pytest.raises(CheckpointError, match="'conv_last.weight'.* inf"):
        load_model(sd)


def test_lway_nan_scale_is_refused() -> None:
    sd = dict(_state_dict("lway"))
    if "reconstructor.base_scale" not in sd:
        pytest.skip("the shipped LWay file has no kernel path")
    sd["reconstructor.base_scale"] = torch.tensor(float("nan"))
    with pytest.raises(CheckpointError, match="'reconstructor.base_scale' \\(1 NaN"):
        load_model(sd)


def test_official_layout_with_integer_buffers_loads() -> None:
    """FeMaSR's released files hold int64 ``relative_position_index`` buffers: they still load, as integers."""
    sd = fixture_state_dict("femasr_x4")
    ints = [k for k, v in sd.items() if not v.is_floating_point()]
    assert ints and all(k.endswith("relative_position_index") for k in ints)
    desc = load_model(sd)
    got = desc.model.state_dict()
    for k in ints:
        assert got[k].dtype == torch.int64 and torch.equal(got[k], sd[k]), k


def test_half_precision_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "crlsr_fp16.safetensors"
    save_file({k: v.half() for k, v in _state_dict("crlsr").items()}, str(path))
    assert load_model(path).arch == "crlsr"


def test_unexpected_arch_error_becomes_unsupported_model(tmp_path: Path, monkeypatch) -> None:
    """Safety net: an error an architecture did not turn into a message still names the file."""
    def load(sd):
        raise IndexError("tuple index out of range")

    boom = Architecture(id="boom", name="Boom", detect=lambda sd: True, load=load)
    monkeypatch.setattr(registry, "architectures", lambda: [boom])
    path = tmp_path / "boom.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(UnsupportedModelError, match=r"boom\.safetensors: looks like Boom.*IndexError"):
        load_model(path)


# ---------------------------------------------------------------------------------------- code in pickles
class _System:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def _assert_code_refusal(msg: str, name: str, wanted: str) -> None:
    assert msg.startswith(f"{name}: not loaded: this file contains Python code (it asks for {wanted})"), msg
    for advice in ("add_safe_globals", "trust", "weights_only=False", "safe_globals"):
        assert advice not in msg, msg


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["torch.save", "torch.save legacy", "pickle.dump"])
def test_pickle_asking_for_os_system_is_not_run(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    obj = {"params": {"w": torch.zeros(2)}, "x": _System(marker)}
    if how == "pickle.dump":
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=4)
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=how == "torch.save")
    before = _sha256(path)
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    _assert_code_refusal(str(info.value), "evil.pth", "os.system")
    assert info.value.__cause__ is None and info.value.__suppress_context__  # torch's advice is not chained
    assert not marker.exists()
    assert _sha256(path) == before


def test_pickle_asking_for_eval_is_named(tmp_path: Path) -> None:
    path = tmp_path / "eval.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": _Eval()}, path)
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    _assert_code_refusal(str(info.value), "eval.ckpt", "builtins.eval")


# ---------------------------------------------------------------------------------------- paths
def test_folder_named_like_a_checkpoint(tmp_path: Path) -> None:
    folder = tmp_path / "x.ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        load_model(folder)
    msg = str(info.value)
    assert "is a folder, not a checkpoint file" in msg and "model.safetensors" in msg and "not found" not in msg
    with pytest.raises(CheckpointError, match="not found: .*missing\\.pth"):
        load_model(tmp_path / "missing.pth")


def test_unreadable_file_is_a_clean_error(tmp_path: Path) -> None:
    """A file this process may not read (root loses its override in the child, so the mode is real)."""
    path = tmp_path / "locked.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    path.chmod(0)
    try:
        proc = subprocess.run([sys.executable, "-m", "realsr_core", "info", str(path)], cwd=ROOT, capture_output=True,
                              text=True, timeout=120, preexec_fn=drop_root_override)
    finally:
        path.chmod(0o600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"error: locked.safetensors: permission denied: this process may not read {path}; "
                                   "check the file's permissions")
