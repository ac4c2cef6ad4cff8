"""The trainer on real photos with a tiny CRL-SR: loadable output, bit-exact resume, atomic saves, config errors."""

from __future__ import annotations

import io
import json
import math
import signal
from pathlib import Path

import pytest
import torch
from helpers import skimage_photo
from safetensors.torch import load_file

from realsr_core import load_model
from realsr_core.__main__ import main
from realsr_core.files import atomic_write
from realsr_core.training.trainer import (
    ConfigError,
    TrainingError,
    load_config,
    lr_factor,
    read_metadata,
    save_weights,
    train,
)

# A CRL-SR small enough for a few CPU steps per second, trained on two non-held-out photos.
TINY = """
[model]
arch = "crlsr"
num_feat = 8
enc_blocks = 1
ref_blocks = 1
proj_dim = 16
ef_feat = 8
ef_blocks = 1
[model.losses]
num_samples = 32

[data]
patch_size = 32
degradation = { classical_iso = 0.5, spatially_variant = 0.5 }
photos = ["camera", "rocket"]

[train]
steps = 4
batch_size = 2
lr = 5e-4
warmup_steps = 1
grad_clip = 1.0
seed = 3
ema_decay = 0.9
log_every = 1
save_every = 100
eval_every = 2
num_threads = 1

[eval]
crop = 64
max_photos = 1
degradations = ["classical", "spatially_variant"]
"""


@pytest.fixture()
def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def _records(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_cli_trains_and_writes_a_model_the_loader_runs(tmp_path: Path, tiny_config: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", str(tiny_config), "--out", str(run), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "step 4/4" in err and "total" in err and "psnr_y/classical" in err

    meta = read_metadata(run / "model.safetensors")
    assert meta["arch"] == "crlsr" and meta["step"] == "4" and meta["ema"] == "true"
    assert json.loads(meta["config"]) == load_config(tiny_config)

    # The file holds the EMA weights (not the raw ones), and state.pt holds both.
    weights = load_file(run / "model.safetensors")
    state = torch.load(run / "state.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 4
    assert all(torch.equal(weights[k], state["ema"][k]) for k in weights)
    assert any(not torch.equal(weights[k], state["model"][k]) for k in weights if weights[k].is_floating_point())

    desc = load_model(run / "model.safetensors")
    assert desc.arch == "crlsr" and desc.scale == 4
    lr = skimage_photo("chelsea")[:, :, 40:72, 100:140]
    with torch.no_grad():
        sr = desc(lr)
    assert sr.shape == (1, 3, 128, 160) and torch.isfinite(sr).all()

    recs = _records(run)
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4]
    assert all(math.isfinite(r["total"]) and {"rec_sr", "bc", "srnce", "rec_hr"} <= r.keys() for r in train_recs)
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    bicubic = next(r for r in recs if r["kind"] == "bicubic")
    for r in evals:
        for setting in ("classical", "spatially_variant"):
            # A barely trained residual network stays within a few dB of its bicubic starting point.
            assert abs(r[f"psnr_y/{setting}"] - bicubic[f"psnr_y/{setting}"]) < 3.0
            assert 0.0 < r[f"ssim_y/{setting}"] < 1.0
    assert "eval step 4" in (run / "train.log").read_text()

    # A second run into the same folder must not silently replace it.
    assert main(["train", str(tiny_config), "--out", str(run)]) == 2
    assert "--resume" in capsys.readouterr().err


class _InterruptAt(io.StringIO):
    """A log stream that presses Ctrl-C (a real SIGINT) when the trainer reports a given step."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker, self.fired = marker, False

    def write(self, s: str) -> int:
        if not self.fired and self.marker in s:
            self.fired = True
            signal.raise_signal(signal.SIGINT)
        return super().write(s)


def test_interrupt_then_resume_equals_an_uninterrupted_run(tmp_path: Path, tiny_config: Path) -> None:
    whole = train(tiny_config, tmp_path / "whole", device="cpu", stream=io.StringIO())
    assert whole.stopped == "done" and whole.step == 4

    stream = _InterruptAt("step 1/4")
    cut = train(tiny_config, tmp_path / "cut", device="cpu", stream=stream)
    assert stream.fired and cut.stopped == "interrupted" and cut.step == 1
    assert read_metadata(tmp_path / "cut" / "model.safetensors")["step"] == "1"

    log = io.StringIO()
    resumed = train(tiny_config, tmp_path / "cut", device="cpu", resume=True, stream=log)
    assert resumed.stopped == "done" and resumed.step == 4
    assert "resuming at step 1/4" in log.getvalue()

    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    sa = torch.load(tmp_path / "whole" / "state.pt", weights_only=True)
    sb = torch.load(tmp_path / "cut" / "state.pt", weights_only=True)
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    # Each step is logged once even though the first process was cut off.
    steps = [r["step"] for r in _records(tmp_path / "cut") if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4]
    assert resumed.last_eval == pytest.approx(whole.last_eval)


def test_a_failed_save_leaves_the_previous_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    torch.save({"w": torch.arange(4)}, path)
    before = path.read_bytes()
    # torch.save streams the big tensor out, then fails on the lambda: a half-written file is on disk.
    with pytest.raises(Exception, match="lambda|pickle"):
        atomic_write(path, lambda f: torch.save({"w": torch.zeros(100_000), "bad": lambda: 0}, f))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]

    model = tmp_path / "model.safetensors"
    save_weights(model, {"w": torch.ones(3)}, {"step": "1"})
    before = model.read_bytes()
    with pytest.raises(Exception, match="Tensor|tensor|bool"):
        save_weights(model, {"w": torch.zeros(3), "bad": True}, {"step": "2"})  # type: ignore[dict-item]
    assert model.read_bytes() == before and read_metadata(model)["step"] == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "state.pt"]


@pytest.mark.parametrize(
    ("section", "value", "expected"),
    [
        ("train", {"stpes": 10}, ["'stpes'", "steps", "batch_size", "ema_decay"]),
        ("model", {"arch": "crlsr", "num_fet": 8}, ["'num_fet'", "num_feat", "enc_blocks"]),
        ("model", {"arch": "crlsr", "losses": {"temperature": 0.1}}, ["'temperature'", "tau", "num_samples"]),
        ("model", {"arch": "esrgan"}, ["'esrgan'", "crlsr"]),
        ("optim", {"lr": 1.0}, ["[optim]", "model", "train"]),
        ("data", {"degradation": "gaussian"}, ["'gaussian'", "classical_iso", "spatially_variant", "bsrgan"]),
        ("data", {"photos": ["astronaut"]}, ["'astronaut'", "held-out"]),
        ("train", {"lr": "fast"}, ["train.lr", "number", "'fast'"]),
        ("train", {"lr_schedule": "linear"}, ["'linear'", "cosine", "step"]),
    ],
)
def test_bad_config_names_the_key_and_what_is_allowed(section: str, value: dict, expected: list[str]) -> None:
    raw = {"model": {"arch": "crlsr"}, section: value}
    with pytest.raises(ConfigError) as e:
        load_config(raw)
    for text in expected:
        assert text in str(e.value), str(e.value)


def test_cli_reports_config_errors(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\narch = "crlsr"\n[train]\nbatchsize = 4\n')
    assert main(["train", str(bad), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "'batchsize'" in err and "batch_size" in err
    assert not (tmp_path / "run").exists()


def test_shipped_configs() -> None:
    full, ablation = load_config("crlsr_x4"), load_config("crlsr_x4_ablation")
    assert full["train"]["contrastive"] is True and ablation["train"]["contrastive"] is False
    # Same network size, data and schedule: the only difference the comparison may see is the losses.
    strip = {"training_parts"}
    assert {k: v for k, v in full["model"].items() if k not in strip} == \
        {k: v for k, v in ablation["model"].items() if k not in strip}
    assert full["data"] == ablation["data"]
    assert {k: v for k, v in full["train"].items() if k != "contrastive"} == \
        {k: v for k, v in ablation["train"].items() if k != "contrastive"}
    assert full["data"]["scale"] == 4 and full["model"]["scale"] == 4
    assert {"classical_iso", "classical_aniso", "spatially_variant"} <= full["data"]["degradation"].keys()
    assert sum(full["data"]["degradation"].values()) == pytest.approx(1.0)
    assert "spatially_variant" in full["eval"]["degradations"] and full["eval"]["sigma"] == 2.0


def test_lway_benchmark_sr_config() -> None:
    # LWay's benchmark model: the ablation's network, trained on the bicubic family only (never the camera
    # family it is tested on), on a schedule that ends annealed.
    cfg, ablation = load_config("lway_bench_sr_bicubic"), load_config("crlsr_x4_ablation")
    same = {k: v for k, v in ablation["model"].items() if k != "losses"}  # losses: unused without contrastive
    assert cfg["model"] == same and cfg["train"]["contrastive"] is False
    assert cfg["data"]["degradation"] == {"bicubic": 1.0} and cfg["data"]["split"] == "train"
    assert cfg["train"]["lr_schedule"] == "cosine" and cfg["train"]["steps"] <= 5000
    assert "camera" not in cfg["eval"]["degradations"]


def test_lr_schedules() -> None:
    cfg = load_config({"model": {"arch": "crlsr"}, "train": {"steps": 100, "lr": 1e-3, "lr_min": 1e-5,
                                                              "warmup_steps": 10}})["train"]
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0) and lr_factor(100, cfg) == pytest.approx(0.01)
    mids = [lr_factor(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(mids, mids[1:], strict=False))
    step = dict(cfg, lr_schedule="step", lr_step=30, lr_gamma=0.5, warmup_steps=0)
    assert [lr_factor(s, step) for s in (0, 29, 30, 60)] == [1.0, 1.0, 0.5, 0.25]
    with pytest.raises(ConfigError, match="--steps"):
        train({"model": {"arch": "crlsr"}}, "unused", steps=0)


def test_resume_refuses_a_different_network(tmp_path: Path, tiny_config: Path) -> None:
    run = tmp_path / "run"
    train(tiny_config, run, device="cpu", stop_at=1, stream=io.StringIO())
    other = tmp_path / "other.toml"
    other.write_text(TINY.replace("num_feat = 8", "num_feat = 12"))
    with pytest.raises(TrainingError, match="num_feat"):
        train(other, run, device="cpu", resume=True, stream=io.StringIO())
