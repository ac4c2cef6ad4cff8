"""Each node's execute, in process, through real ComfyUI model management, progress and interrupt."""

from __future__ import annotations

import pytest
import torch
from comfy_host import bhwc, cancel_on_first_tick
from helpers import FIXTURES as ROOT_FIXTURES
from helpers import load_png, skimage_photo

PREFIX = "RealSR_"


def _out(result):
    return result.result if hasattr(result, "result") else result


@pytest.fixture(scope="module")
def loaded(comfy):
    load = comfy.nodes[f"{PREFIX}LoadModel"]
    femasr = _out(load.execute(model_name="FeMaSR_SRX4_model_g.pth"))
    mmrealsr = _out(load.execute(model_name="MMRealSRGAN.pth"))
    return {"femasr": femasr[0], "mmrealsr": mmrealsr[1], "femasr_outputs": femasr, "mm_outputs": mmrealsr}


def test_pack_registered_with_prefixed_ids(comfy) -> None:
    ours = sorted(k for k in comfy.nodes if k.startswith(PREFIX))
    assert ours == sorted(f"{PREFIX}{n}" for n in ("LoadModel", "Upscale", "FeMaSRUpscale", "MMRealSRModulate", "ColorFix",
                                                   "StableSRSampler", "LWayFinetune", "LWayFinetuneUpscaleModel"))
    for name in ours:
        schema = comfy.nodes[name].define_schema()
        assert schema.category.startswith("image/upscaling/RealSR")
        for inp in schema.inputs:
            assert inp.tooltip, f"{name}.{inp.id} has no tooltip"
        for out in schema.outputs:
            assert out.tooltip, f"{name} output {out.display_name} has no tooltip"


def test_loader_lists_files_and_types_outputs(comfy, loaded) -> None:
    schema = comfy.nodes[f"{PREFIX}LoadModel"].define_schema()
    files = schema.inputs[0].options
    assert {"FeMaSR_SRX4_model_g.pth", "MMRealSRGAN.pth", "built-in/crlsr_x4.safetensors"} <= set(files)
    assert files[0] == "built-in/crlsr_x4.safetensors"  # the shipped model first: it needs no download
    assert [o.get_io_type() for o in schema.outputs] == ["REALSR_FEMASR_MODEL", "REALSR_MMREALSR_MODEL",
                                                          "REALSR_STABLESR_MODULE", "REALSR_CFW_VAE", "REALSR_MODEL",
                                                          "REALSR_LWAY_MODULE", "UPSCALE_MODEL"]
    assert loaded["femasr"].desc.name == "FeMaSR x4"
    assert type(loaded["femasr_outputs"][1]).__name__ == "NotThisModel"


def test_missing_model_file_names_the_folder_and_the_link(comfy, models_dir) -> None:
    from realsr_core.catalog import find

    load = comfy.nodes[f"{PREFIX}LoadModel"]
    assert load.validate_inputs(model_name="FeMaSR_SRX4_model_g.pth") is True
    assert load.validate_inputs(model_name="built-in/crlsr_x4.safetensors") is True
    # Instead of ComfyUI's "Value not in list": the folders searched, where the file goes, its link.
    msg = load.validate_inputs(model_name="MMRealSRNet.pth")
    assert str(models_dir) in msg and "models/realsr/ of ComfyUI" in msg and find("MMRealSRNet.pth").url in msg
    assert "python -m realsr_core models" in load.validate_inputs(model_name="my_own.pth")
    with pytest.raises(FileNotFoundError, match="MM-RealSR/releases/download.*models/realsr/ of ComfyUI"):
        load.execute(model_name="MMRealSRNet.pth")


def test_femasr_upscale_under_model_management(comfy, loaded) -> None:
    mm = comfy.model_management
    x = bhwc(load_png(ROOT_FIXTURES / "femasr_x4" / "input_b_test.png"))
    ticks: list[tuple[int, int]] = []
    comfy.utils.set_progress_bar_global_hook(lambda v, t, p, node_id=None: ticks.append((v, t)))
    node = comfy.nodes[f"{PREFIX}FeMaSRUpscale"]
    out = _out(node.execute(model=loaded["femasr"], image=x, tile_size="none", overlap=16))[0]
    assert out.shape == (1, 212, 280, 3) and out.device == mm.intermediate_device()
    assert 0.0 <= out.min().item() and out.max().item() <= 1.0
    # The official test() path, clamped: the node gives the fixture's result.
    ref = torch.from_numpy(__import__("numpy").load(ROOT_FIXTURES / "femasr_x4" / "b_test_out.npy"))
    assert (out.permute(0, 3, 1, 2) - ref.clamp(0, 1)).abs().max().item() < 2e-3
    assert ticks and ticks[-1][0] == ticks[-1][1]
    # Offloaded afterwards: no RealSR model stays registered as loaded.
    assert all(m.model is not loaded["femasr"].patcher for m in mm.current_loaded_models)
    tiled = _out(node.execute(model=loaded["femasr"], image=x, tile_size="128", overlap=16))[0]
    assert tiled.shape == out.shape


def test_generic_upscale_runs_the_shipped_model_and_any_feed_forward_family(comfy, loaded) -> None:
    mm = comfy.model_management
    outs = _out(comfy.nodes[f"{PREFIX}LoadModel"].execute(model_name="built-in/crlsr_x4.safetensors"))
    assert [type(o).__name__ for o in outs] == ["NotThisModel"] * 4 + ["RealSRModel", "NotThisModel",
                                                   "NoUpscaleModel"]
    assert outs[4].arch == "crlsr" and outs[4].desc.scale == 4
    node = comfy.nodes[f"{PREFIX}Upscale"]
    x = bhwc(skimage_photo("chelsea")[:, :, 40:88, 100:164])
    ticks: list[tuple[int, int]] = []
    comfy.utils.set_progress_bar_global_hook(lambda v, t, p, node_id=None: ticks.append((v, t)))
    try:
        out = _out(node.execute(model=outs[4], image=x, tile_size="auto", overlap=16))[0]
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert out.shape == (1, 192, 256, 3) and out.device == mm.intermediate_device()
    assert ticks and ticks[-1][0] == ticks[-1][1]
    assert all(m.model is not outs[4].patcher for m in mm.current_loaded_models)
    # The generic output of a FeMaSR file runs in the same node, and gives what the FeMaSR node gives.
    fem = _out(comfy.nodes[f"{PREFIX}LoadModel"].execute(model_name="FeMaSR_SRX4_model_g.pth"))[4]
    a = _out(node.execute(model=fem, image=x, tile_size="none", overlap=16))[0]
    b = _out(comfy.nodes[f"{PREFIX}FeMaSRUpscale"].execute(model=fem, image=x, tile_size="none", overlap=16))[0]
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="is a CRL-SR x4 model, not FeMaSR"):
        node.execute(model=outs[0], image=x, tile_size="auto", overlap=16)


def test_wrong_family_is_a_clear_error(comfy, loaded) -> None:
    node = comfy.nodes[f"{PREFIX}FeMaSRUpscale"]
    x = bhwc(skimage_photo("chelsea")[:, :, :32, :32])
    with pytest.raises(ValueError, match="MMRealSRGAN.pth' is a MM-RealSR"):
        node.execute(model=loaded["mm_outputs"][0], image=x, tile_size="auto", overlap=16)


def test_mmrealsr_scores_and_sweep(comfy, loaded) -> None:
    node = comfy.nodes[f"{PREFIX}MMRealSRModulate"]
    x = bhwc(load_png(ROOT_FIXTURES / "mmrealsr_x4" / "input_lr.png"))
    img, blur, noise = _out(node.execute(model=loaded["mmrealsr"], image=x, blur_mode="auto", blur=0.5,
                                         noise_mode="manual", noise=0.8, sweep="off", sweep_steps=5,
                                         tile_size="none", overlap=16))
    assert img.shape == (1, 192, 192, 3)
    assert blur == pytest.approx(0.52035191, abs=1e-5) and noise == pytest.approx(0.8)
    sweep, _, _ = _out(node.execute(model=loaded["mmrealsr"], image=x, blur_mode="auto", blur=0.5,
                                    noise_mode="auto", noise=0.5, sweep="noise", sweep_steps=3,
                                    tile_size="auto", overlap=16))
    assert sweep.shape == (3, 192, 192, 3)
    assert (sweep[0] - sweep[2]).abs().mean().item() > 1e-3  # the score changes the result


def test_rgba_gray_and_batch(comfy, loaded) -> None:
    node = comfy.nodes[f"{PREFIX}MMRealSRModulate"]
    photo = skimage_photo("coffee")[:, :, :24, :32]
    rgba = bhwc(torch.cat([photo, torch.ones(1, 1, 24, 32)], 1))
    args = dict(blur_mode="manual", blur=0.2, noise_mode="manual", noise=0.2, sweep="off", sweep_steps=2,
                tile_size="none", overlap=16)
    out = _out(node.execute(model=loaded["mmrealsr"], image=torch.cat([rgba, rgba]), **args))[0]
    assert out.shape == (2, 96, 128, 4) and torch.allclose(out[..., 3], torch.ones(()))


def test_color_fix_node(comfy) -> None:
    node = comfy.nodes[f"{PREFIX}ColorFix"]
    content = bhwc(skimage_photo("astronaut")[:, :, :96, :128])
    style = bhwc(skimage_photo("coffee")[:, :, :48, :64])
    out = _out(node.execute(image=content, reference=style, method="wavelet", strength=1.0))[0]
    assert out.shape == content.shape
    assert (out.mean((1, 2)) - style.mean((1, 2))).abs().max() < (content.mean((1, 2)) - style.mean((1, 2))).abs().max()
    same = _out(node.execute(image=content, reference=style, method="adain", strength=0.0))[0]
    assert torch.equal(same, content)


def test_interrupt_stops_within_one_tile_then_next_run_works(comfy, loaded) -> None:
    mm = comfy.model_management
    node = comfy.nodes[f"{PREFIX}FeMaSRUpscale"]
    x = bhwc(skimage_photo("astronaut")[:, :, 100:228, 150:278])  # 128x128 -> 16 tiles of 32
    ticks: list[int] = []
    comfy.utils.set_progress_bar_global_hook(cancel_on_first_tick(mm, ticks))
    with pytest.raises(mm.InterruptProcessingException):
        node.execute(model=loaded["femasr"], image=x, tile_size="32", overlap=8)
    assert len(ticks) == 1  # stopped before the second tile
    assert all(m.model is not loaded["femasr"].patcher for m in mm.current_loaded_models)
    comfy.utils.set_progress_bar_global_hook(None)
    out = _out(node.execute(model=loaded["femasr"], image=x[:, :64, :64], tile_size="none", overlap=8))[0]
    assert out.shape == (1, 256, 256, 3)


def test_image_too_small_is_a_clear_error(comfy, loaded) -> None:
    node = comfy.nodes[f"{PREFIX}FeMaSRUpscale"]
    with pytest.raises(ValueError, match="needs at least"):
        node.execute(model=loaded["femasr"], image=torch.rand(1, 4, 4, 3), tile_size="auto", overlap=16)
