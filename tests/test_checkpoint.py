"""Checkpoint containers, safe loading and refusals."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import fixture_state_dict, make_weights

from realsr_core import CheckpointError, UnsupportedModelError, load_checkpoint, load_model


@pytest.fixture(scope="module")
def hrp_sd() -> dict[str, torch.Tensor]:
    return fixture_state_dict("femasr_hrp")


@pytest.mark.parametrize(
    "filename, wrapper",
    [
        ("FeMaSR_HRP_model_g.pth", "params"),
        ("model.ckpt", "state_dict"),
        ("model.pt", "flat"),
        ("pytorch_model.bin", "flat"),
        ("model.safetensors", "flat"),
    ],
)
def test_every_container_loads_the_same_tensors(tmp_path: Path, hrp_sd, filename: str, wrapper: str) -> None:
    path = tmp_path / filename
    make_weights.save_checkpoint(hrp_sd, str(path), wrapper)
    ckpt = load_checkpoint(path)
    assert set(ckpt.state_dict) == set(hrp_sd)
    for k, v in hrp_sd.items():
        assert torch.equal(ckpt.state_dict[k], v), k
    desc = load_model(path)
    assert desc.arch == "femasr" and desc.scale == 1


def test_data_parallel_prefix_is_stripped(tmp_path: Path, hrp_sd) -> None:
    path = tmp_path / "dp.pth"
    torch.save({"params": {f"module.{k}": v for k, v in hrp_sd.items()}}, path)
    assert set(load_checkpoint(path).state_dict) == set(hrp_sd)


def test_mmrealsr_prefers_params_over_ema(tmp_path: Path) -> None:
    sd = fixture_state_dict("mmrealsr_x4")
    ema = {k: v + 1.0 if v.is_floating_point() else v for k, v in sd.items()}
    path = tmp_path / "MMRealSRGAN.pth"
    # The EMA set comes first in the file: the official script still takes 'params'.
    torch.save({"params_ema": ema, "params": sd}, path)
    desc = load_model(path)
    got = desc.model.state_dict()
    assert torch.equal(got["conv_first.weight"], sd["conv_first.weight"])
    forced = load_model(path, param_key="params_ema")
    assert torch.equal(forced.model.state_dict()["conv_first.weight"], ema["conv_first.weight"])


class _Payload:
    """Unpickling this would create a file: the loader must refuse before anything runs."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickle_that_would_create_a_file_is_refused(tmp_path: Path, hrp_sd) -> None:
    target = tmp_path / "created_by_pickle.txt"
    path = tmp_path / "evil.pth"
    torch.save({"params": hrp_sd, "extra": _Payload(str(target))}, path)
    with pytest.raises(CheckpointError, match=r"not loaded: this file contains Python code \(it asks for io\.open\)"):
        load_model(path)
    assert not target.exists()
    # The same payload under the unsafe loader would have created it: the test can fail.
    torch.load(path, weights_only=False)
    assert target.exists()


@pytest.mark.parametrize("filename", ["cut.pth", "cut.safetensors"])
def test_truncated_file_is_refused(tmp_path: Path, hrp_sd, filename: str) -> None:
    full = tmp_path / ("full" + Path(filename).suffix)
    make_weights.save_checkpoint(hrp_sd, str(full), "params")
    data = full.read_bytes()
    cut = tmp_path / filename
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=filename.replace(".", r"\.")):
        load_model(cut)


def test_missing_empty_and_wrong_type(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.pth")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_model(empty)
    odd = tmp_path / "model.onnx"
    odd.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unsupported file type"):
        load_model(odd)


def test_unknown_architecture_error_names_file_and_guess(tmp_path: Path) -> None:
    esrgan_like = {
        "conv_first.weight": torch.zeros(64, 3, 3, 3),
        "body.0.rdb1.conv1.weight": torch.zeros(32, 64, 3, 3),
        "conv_last.weight": torch.zeros(3, 64, 3, 3),
    }
    path = tmp_path / "RealESRGAN_x4plus.pth"
    torch.save({"params_ema": esrgan_like}, path)
    with pytest.raises(UnsupportedModelError) as err:
        load_model(path)
    msg = str(err.value)
    assert "RealESRGAN_x4plus.pth" in msg and "ESRGAN" in msg and "FeMaSR" in msg and "MM-RealSR" in msg


def test_non_tensor_container_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(CheckpointError, match="no tensors"):
        load_model(path)
    assert os.path.exists(path)
