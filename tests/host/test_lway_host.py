"""LWay fine-tuning nodes inside real ComfyUI: our SR models and ComfyUI's own UPSCALE_MODEL (spandrel)."""

from __future__ import annotations

import pytest
import torch
from comfy_host import bhwc, cancel_on_first_tick, esrgan_state_dict
from helpers import skimage_photo
from safetensors.torch import save_file

PREFIX = "RealSR_"
OPTIONS = dict(iterations=3, learning_rate=1e-4, patch_size=32, batch_size=2, params="all", seed=0)


def _out(result):
    return result.result if hasattr(result, "result") else result


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def models(comfy):
    load = comfy.nodes[f"{PREFIX}LoadModel"]
    sr = _out(load.execute(model_name="built-in/crlsr_x4.safetensors"))[4]
    lway = _out(load.execute(model_name="built-in/lway_rec.safetensors"))
    return sr, lway


@pytest.fixture(scope="module")
def esrgan_file(comfy, tmp_path_factory) -> str:
    """A small x4 ESRGAN (BasicSR RRDBNet keys, random weights) in a models/upscale_models folder, loaded by
    ComfyUI's own 'Load Upscale Model' through spandrel."""
    folder = tmp_path_factory.mktemp("upscale_models")
    # spandrel reads the width from the shapes; its ESRGAN growth is always 32
    sd = esrgan_state_dict(nf=16, gc=32, blocks=2)
    save_file(sd, str(folder / "tiny_esrgan_x4.safetensors"))
    import folder_paths

    folder_paths.add_model_folder_path("upscale_models", str(folder))
    return "tiny_esrgan_x4.safetensors"


def test_lway_nodes_registered_with_tooltips(comfy) -> None:
    for name in ("LWayFinetune", "LWayFinetuneUpscaleModel"):
        schema = comfy.nodes[f"{PREFIX}{name}"].define_schema()
        assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs)
    loader = comfy.nodes[f"{PREFIX}LoadModel"].define_schema()
    assert "built-in/lway_rec.safetensors" in loader.inputs[0].options
    assert [o.get_io_type() for o in loader.outputs[5:]] == ["REALSR_LWAY_MODULE", "UPSCALE_MODEL"]


def test_finetune_our_model_under_inference_mode(comfy, models) -> None:
    mm = comfy.model_management
    sr, lway_outputs = models
    assert [type(o).__name__ for o in lway_outputs] == ["NotThisModel"] * 5 + ["RealSRModel", "NoUpscaleModel"]
    before = _snapshot(sr.desc.model)
    x = bhwc(skimage_photo("chelsea")[:, :, 40:88, 100:164])
    ticks: list[tuple[int, int]] = []
    comfy.utils.set_progress_bar_global_hook(lambda v, t, p, node_id=None: ticks.append((v, t)))
    try:
        with torch.inference_mode():  # as ComfyUI's executor runs every node
            adapted, plot = _out(comfy.nodes[f"{PREFIX}LWayFinetune"].execute(
                model=sr, images=x, lway=lway_outputs[5], **OPTIONS))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert ticks[-1] == (3, 3)
    assert _same(before, _snapshot(sr.desc.model)), "the input model was changed"
    assert adapted is not sr and adapted.arch == "crlsr" and adapted.patcher is not sr.patcher
    after = _snapshot(adapted.desc.model)
    assert any(not torch.equal(before[k], after[k]) for k in before), "fine-tuning changed no weight"
    assert plot.shape == (1, 360, 640, 3) and 0.0 <= plot.min().item() and plot.max().item() <= 1.0
    assert all(m.model is not adapted.patcher for m in mm.current_loaded_models)
    # The adapted model runs in the upscale node like a loaded one.
    out = _out(comfy.nodes[f"{PREFIX}Upscale"].execute(model=adapted, image=x, tile_size="auto", overlap=16))[0]
    assert out.shape == (1, 192, 256, 3)
    ref = _out(comfy.nodes[f"{PREFIX}Upscale"].execute(model=sr, image=x, tile_size="auto", overlap=16))[0]
    assert not torch.equal(out, ref)


def test_finetune_comfy_upscale_model_and_run_it_in_comfys_node(comfy, models, esrgan_file) -> None:
    # ComfyUI's own upscale-model nodes (comfy_extras; the in-process host loads only our pack).
    from comfy_extras.nodes_upscale_model import ImageUpscaleWithModel, UpscaleModelLoader

    _, lway_outputs = models
    spandrel_model = _out(UpscaleModelLoader.execute(model_name=esrgan_file))[0]
    before = _snapshot(spandrel_model.model)
    x = bhwc(skimage_photo("coffee")[:, :, 100:140, 200:248])
    with torch.inference_mode():
        adapted, plot = _out(comfy.nodes[f"{PREFIX}LWayFinetuneUpscaleModel"].execute(
            upscale_model=spandrel_model, images=x, lway=lway_outputs[5], **OPTIONS))
    assert type(adapted) is type(spandrel_model) and adapted is not spandrel_model
    assert _same(before, _snapshot(spandrel_model.model))
    assert plot.shape[0] == 1
    up = _out(ImageUpscaleWithModel.execute(upscale_model=adapted, image=x))[0]
    assert up.shape == (1, 160, 192, 3)
    orig = _out(ImageUpscaleWithModel.execute(upscale_model=spandrel_model, image=x))[0]
    assert not torch.equal(up, orig)


def test_interrupt_leaves_the_model_and_the_next_run_works(comfy, models) -> None:
    mm = comfy.model_management
    sr, lway_outputs = models
    before = _snapshot(sr.desc.model)
    x = bhwc(skimage_photo("astronaut")[:, :, 100:164, 150:214])
    ticks: list[int] = []
    comfy.utils.set_progress_bar_global_hook(cancel_on_first_tick(mm, ticks))
    try:
        with pytest.raises(mm.InterruptProcessingException), torch.inference_mode():
            comfy.nodes[f"{PREFIX}LWayFinetune"].execute(model=sr, images=x, lway=lway_outputs[5],
                                                         **{**OPTIONS, "iterations": 50})
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert ticks == [1]  # stopped before the second iteration
    assert _same(before, _snapshot(sr.desc.model))
    with torch.inference_mode():
        adapted, _ = _out(comfy.nodes[f"{PREFIX}LWayFinetune"].execute(
            model=sr, images=x, lway=lway_outputs[5], **{**OPTIONS, "iterations": 1}))
    assert adapted.arch == "crlsr"


def test_wrong_sockets_and_bad_options_are_clear_errors(comfy, models) -> None:
    sr, lway_outputs = models
    node = comfy.nodes[f"{PREFIX}LWayFinetune"]
    x = bhwc(skimage_photo("chelsea")[:, :, :48, :48])
    with pytest.raises(ValueError, match="is a CRL-SR x4 model, not LWay module"):
        node.execute(model=sr, images=x, lway=_out(comfy.nodes[f"{PREFIX}LoadModel"].execute(
            model_name="built-in/crlsr_x4.safetensors"))[5], **OPTIONS)
    with pytest.raises(ValueError, match="LWay Fine-tune needs a"):
        node.execute(model=lway_outputs[5], images=x, lway=lway_outputs[5], **OPTIONS)
    with pytest.raises(Exception, match="matches no parameter name"):
        node.execute(model=sr, images=x, lway=lway_outputs[5], **{**OPTIONS, "params": "no_such_layer"})


def test_a_model_comfy_loaded_in_half_trains_in_mixed_precision(comfy, models) -> None:
    """On a GPU ComfyUI loads our models in float16 / bfloat16; LWay then trains in mixed precision (the SR model's
    passes in that dtype, float32 weights, Adam state, R and loss).  Here the CPU stands in: the model is put in
    bfloat16 as the loader does on a bfloat16 GPU, and compared with the same rounded weights in float32."""
    import sys

    host = sys.modules[comfy.nodes[f"{PREFIX}LWayFinetune"].__module__].host
    _, lway_outputs = models
    half, full = (_out(comfy.nodes[f"{PREFIX}LoadModel"].execute(model_name="built-in/crlsr_x4.safetensors"))[4]
                  for _ in range(2))
    half.desc.to(dtype=torch.bfloat16)
    full.desc.to(dtype=torch.bfloat16).to(dtype=torch.float32)  # the same (rounded) weights, in float32
    before = _snapshot(half.desc.model)
    x = bhwc(skimage_photo("chelsea")[:, :, 40:88, 100:164])
    opts = {"lr": 1e-4, "patch_size": 32, "batch_size": 2, "seed": 0}
    with torch.inference_mode():
        ref = host.run_finetune(full.desc, x, lway_outputs[5], iterations=3, **opts)
        res = host.run_finetune(half.desc, x, lway_outputs[5], iterations=3, **opts)
    # The first step sees the same weights and patches: its loss differs only by the passes' rounding (the later
    # steps also differ by Adam's first, sign-like updates of near-zero gradients).
    assert res.losses[0] != ref.losses[0] and abs(res.losses[0] / ref.losses[0] - 1) < 0.01
    assert next(res.model.model.parameters()).dtype == torch.bfloat16  # handed back in the loaded precision
    assert _same(before, _snapshot(half.desc.model))

    def run(desc) -> torch.Tensor:
        return _out(comfy.nodes[f"{PREFIX}Upscale"].execute(model=host.wrap(desc, "m"), image=x, tile_size="none",
                                                            overlap=16))[0]

    start, mixed, full_out = run(full.desc), run(res.model), run(ref.model)
    assert mixed.shape == (1, 192, 256, 3)
    # Where fine-tuning moved the image, mixed precision moved it the same way.
    apart, moved = (mixed - full_out).abs().mean().item(), (full_out - start).abs().mean().item()
    print(f"mixed vs float32 fine-tuning: {apart:.2e} apart, fine-tuning moved the image {moved:.2e}")
    assert apart < 0.5 * moved
