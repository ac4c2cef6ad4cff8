"""StableSR Sampler inside real ComfyUI: SD2-structured UNet built by ComfyUI, our StableSR module, ComfyUI's VAE.

The UNet and the module are the official ``stablesr_sampling`` fixture's tiny models (same layout as
SD 2.1, 32 channels), so the ComfyUI path can be checked against the official 4-step run.
"""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any

import numpy as np
import pytest
import torch
from comfy_host import bhwc
from helpers import FIXTURES, ROOT, fixture_state_dict, skimage_photo

PREFIX = "RealSR_"
UNET_PREFIX = "model.diffusion_model."


def _out(result):
    return result.result if hasattr(result, "result") else result


@pytest.fixture(scope="module")
def pack(comfy) -> Any:
    """The pack's modules as ComfyUI loaded them (so isinstance checks see the same classes)."""
    node = comfy.nodes[f"{PREFIX}StableSRSampler"]
    pkg = node.__module__.rsplit(".", 1)[0]  # <pack>.nodes
    root = pkg.rsplit(".", 1)[0]

    class Pack:
        host = sys.modules[f"{pkg}.host"]
        shost = sys.modules[f"{pkg}.stablesr_host"]
        sr_core = sys.modules.get(f"{root}.realsr_core.models.stablesr") or __import__(
            f"{root}.realsr_core.models.stablesr", fromlist=["load"])
        sampler = node
        engine = sys.modules.get(f"{root}.realsr_core.diffusion.engine")

    return Pack


@pytest.fixture(scope="module")
def models(comfy, pack) -> dict[str, Any]:
    import comfy.ldm.models.autoencoder as ae
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models

    mm = comfy.model_management
    sd = fixture_state_dict("stablesr_sampling")
    unet_sd = {k: v for k, v in sd.items() if k.startswith(UNET_PREFIX) and ".spade." not in k}
    cfg = comfy.model_detection.detect_unet_config(unet_sd, UNET_PREFIX)
    model_config = comfy.supported_models.SD20(cfg)
    model_config.unet_config["num_head_channels"] = 16  # the tiny fixture's attention split
    base = model_config.get_model(unet_sd, UNET_PREFIX)
    base.diffusion_model.load_state_dict({k[len(UNET_PREFIX):]: v for k, v in unet_sd.items()}, strict=True)
    base.eval()
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())

    desc = pack.sr_core.load(sd, num_heads=2)  # the fixture encoder's 2 heads
    desc.model.eval()
    sr = pack.host.RealSRModel(desc, "fixture", comfy.model_patcher.ModelPatcher(
        desc.model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()))

    ddconfig = _VAE_DDCONFIG
    vae_sd = _random_weights(ae.AutoencoderKL(ddconfig=ddconfig, embed_dim=4).state_dict(), seed=0)
    vae = comfy.sd.VAE(sd=vae_sd, config={"params": {"ddconfig": ddconfig, "embed_dim": 4}})
    return {"model": patcher, "sr": sr, "vae": vae, "context_dim": cfg["context_dim"]}


_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                 "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


def _random_weights(sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Deterministic weights for a key set (ComfyUI's ops skip initialisation): unit norms, scaled convs."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if "norm" in k:
            out[k] = torch.ones_like(v) if k.endswith("weight") else torch.zeros_like(v)
        elif v.ndim > 1:
            out[k] = torch.randn(v.shape, generator=g) / (v[0].numel() ** 0.5)
        else:
            out[k] = torch.zeros_like(v)
    return out


def _cond(dim: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 7, dim, generator=g), {}]]


def _probe(model) -> tuple[torch.Tensor, ...]:
    """Bit-exact fingerprint of the host MODEL: a direct apply_model and a 2-step euler run."""
    import comfy.sample

    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 7, 32, generator=g)
    with torch.no_grad():
        direct = model.model.apply_model(x, torch.tensor([3.0]), c_crossattn=ctx)
        run = comfy.sample.sample(model, x, 2, 1.0, "euler", "normal", [[ctx, {}]], [[ctx, {}]],
                                  torch.zeros_like(x), disable_pbar=True, seed=1)
    return direct, run


def _no_instance_forward(model) -> bool:
    return all("_forward" not in m.__dict__ for m in model.model.diffusion_model.modules())


def _args(**kw) -> dict:
    args = dict(upscale=4.0, seed=3, steps=4, sampler_name="stablesr_ddpm", scheduler="normal", cfg=1.0,
                start="lr_latent", tile_size=4, tile_overlap=2, color_fix="wavelet", cfw_weight=0.5)
    args.update(kw)
    return args


def test_schema_and_loader_outputs(comfy) -> None:
    schema = comfy.nodes[f"{PREFIX}StableSRSampler"].define_schema()
    assert schema.category.startswith("image/upscaling/RealSR")
    for inp in schema.inputs:
        assert inp.tooltip, inp.id
    for out in schema.outputs:
        assert out.tooltip
    names = [i.id for i in schema.inputs]
    assert names[:4] == ["model", "stablesr", "vae", "image"] and "cfw_vae" in names
    loader = comfy.nodes[f"{PREFIX}LoadModel"].define_schema()
    types = [o.get_io_type() for o in loader.outputs]
    assert types[:2] == ["REALSR_FEMASR_MODEL", "REALSR_MMREALSR_MODEL"]  # old links keep their slots
    assert types[2:] == ["REALSR_STABLESR_MODULE", "REALSR_CFW_VAE", "REALSR_MODEL", "REALSR_LWAY_MODULE",
                         "UPSCALE_MODEL"]


def test_ddpm_through_comfyui_matches_official_run(comfy, pack, models) -> None:
    """The whole ComfyUI path (conds, CALC_COND_BATCH tiling, SFT injection, KSAMPLER) vs the official run."""
    meta = json.loads((FIXTURES / "stablesr_sampling" / "meta.json").read_text())["e_run_eps"]
    p = FIXTURES / "stablesr_sampling"
    lr, ctx, noise_xT, noises = (torch.from_numpy(np.load(p / f"e_run_eps_in_{k}.npy"))
                                 for k in ("lr_latent", "context", "noise_xT", "step_noises"))
    model = models["model"]
    m = pack.shost.patch_model(model, models["sr"], meta["tile_size"], meta["tile_overlap"])
    try:
        with torch.no_grad():
            out = pack.shost.sample(m, model.model.process_latent_out(lr), [[ctx, {}]], [[ctx, {}]], seed=0,
                                    steps=meta["respaced_steps"], cfg=1.0, sampler_name="stablesr_ddpm",
                                    scheduler="normal", start="lr_latent", start_noise=noise_xT, step_noises=noises)
    finally:
        m.eject_model()
    ref = torch.from_numpy(np.load(p / "e_run_eps_samples.npy"))
    err = (model.model.process_latent_in(out) - ref).abs().max().item()
    assert err < 5e-3, err  # float32 x0-space blending vs the official eps-space blending


def test_node_samples_tiles_and_keeps_the_host_model(comfy, pack, models) -> None:
    import comfy.patcher_extension as pe

    mm = comfy.model_management
    before = _probe(models["model"])
    calls: list[tuple[tuple[int, ...], bool]] = []

    def spy(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        calls.append((tuple(x.shape), pack.shost.LR_COND in kwargs))
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)

    other = models["model"].clone()  # someone else's wrapper on the same clone chain
    other.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "someone.else", spy)
    node = comfy.nodes[f"{PREFIX}StableSRSampler"]
    image = bhwc(skimage_photo("astronaut")[:, :, 100:116, 150:166])
    image = torch.cat([image, image.flip(2)])  # batch of 2, 16x16 -> 64x64 -> latent 8x8 = 3x3 tiles of 4
    ticks: list[int] = []
    comfy.utils.set_progress_bar_global_hook(lambda v, t, p, node_id=None: ticks.append(v))
    try:
        img, lat = _out(node.execute(model=other, stablesr=models["sr"], vae=models["vae"], image=image, **_args()))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert img.shape == (2, 64, 64, 3) and img.device == mm.intermediate_device()
    assert 0 <= img.min().item() and img.max().item() <= 1 and torch.isfinite(img).all()
    assert lat["samples"].shape == (2, 4, 8, 8)
    assert ticks[-1] == 4
    # Tiled per step: every UNet call sees 4x4 tiles carrying the LR crop; 9 tiles x 2 images per step.
    assert calls and all(s[-2:] == (4, 4) and has_lr for s, has_lr in calls)
    assert sum(s[0] for s, _ in calls) == 4 * 9 * 2
    assert _no_instance_forward(models["model"])

    # A host sampler with CFG and prompts: 3 steps, cond + uncond for each of the 9 tiles.
    calls.clear()
    pos, neg = _cond(models["context_dim"], 1), _cond(models["context_dim"], 2)
    img2, _ = _out(node.execute(model=other, stablesr=models["sr"], vae=models["vae"], image=image, positive=pos,
                                negative=neg, **_args(sampler_name="euler", steps=3, cfg=2.0, start="noise",
                                                      color_fix="adain")))
    assert img2.shape == (2, 64, 64, 3) and torch.isfinite(img2).all()
    assert sum(s[0] for s, _ in calls) == 3 * 9 * 2 * 2
    assert not torch.equal(img, img2)

    after = _probe(models["model"])
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert _no_instance_forward(models["model"])


def test_interrupt_mid_sampling_leaves_the_host_model_intact(comfy, pack, models) -> None:
    mm = comfy.model_management
    before = _probe(models["model"])
    node = comfy.nodes[f"{PREFIX}StableSRSampler"]
    image = bhwc(skimage_photo("coffee")[:, :, :16, :16])
    ticks: list[int] = []

    def hook(value, total, preview, node_id=None):
        ticks.append(value)
        if len(ticks) == 1:
            mm.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            node.execute(model=models["model"], stablesr=models["sr"], vae=models["vae"], image=image,
                         **_args(steps=6))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    assert len(ticks) == 1  # stopped at the first UNet call after the cancel
    assert _no_instance_forward(models["model"])
    after = _probe(models["model"])
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_tiled_vae_and_cfw_decode_through_the_node(comfy, pack, models, monkeypatch) -> None:
    """tiled_vae="on" runs ComfyUI's VAE window by window with shared GroupNorm statistics; the CFW VAE
    decodes with the LR image's features, whole or tiled."""
    from comfy.model_patcher import ModelPatcher

    mm, shost, vae = comfy.model_management, pack.shost, models["vae"]
    node = comfy.nodes[f"{PREFIX}StableSRSampler"]
    image = bhwc(skimage_photo("astronaut")[:, :, 100:124, 150:174])  # 24 px -> 96 px, latent 12x12
    up, padded = pack.engine.prepare_image(image.movedim(-1, 1), 4.0)
    z = shost.encode(vae, padded, tiled=False)
    # One window covers the image: the tiled path is the whole-image computation (ComfyUI's own VAE).
    assert torch.allclose(shost.encode(vae, padded, tiled=True), z, rtol=1e-4, atol=1e-3)  # latents ~100
    x = shost.decode_vae(vae, z, tiled=False)
    assert (shost.decode_vae(vae, z, tiled=True) - x).abs().max().item() < 1e-4
    # Small windows: 3x3 encode and decode windows, shared statistics keep the tone.
    for name, value in (("ENCODE_TILE", 32), ("ENCODE_OVERLAP", 8), ("ENCODE_CONTEXT", 16), ("DECODE_TILE", 4),
                        ("DECODE_OVERLAP", 2), ("DECODE_CONTEXT", 2)):
        monkeypatch.setattr(shost, f"VAE_{name}", value)
    zt = shost.encode(vae, padded, tiled=True)
    # A random-weight VAE is chaotic, so per-pixel agreement is loose; the per-channel level must hold.
    assert zt.shape == z.shape and torch.isfinite(zt).all()
    assert (zt.mean((2, 3)) - z.mean((2, 3))).abs().max().item() < 0.25 * z.std().item()
    xt = shost.decode_vae(vae, z, tiled=True)
    assert xt.shape == x.shape and torch.isfinite(xt).all()
    assert (xt.mean((2, 3)) - x.mean((2, 3))).abs().max().item() < 0.08  # random VAE, 4 px tiles: loose
    ticks: list[tuple[int, int]] = []
    comfy.utils.set_progress_bar_global_hook(lambda v, t, p, node_id=None: ticks.append((v, t)))
    try:
        img, lat = _out(node.execute(model=models["model"], stablesr=models["sr"], vae=vae, image=image,
                                     tiled_vae="on", **_args(steps=2)))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert img.shape == (1, 96, 96, 3) and torch.isfinite(img).all()
    # Several windows + the statistics pass, reported to ComfyUI's progress bar up to the end.
    assert any(v == t > 4 for v, t in ticks), ticks
    monkeypatch.undo()

    # CFW: the official-layout CFW VAE (fixture weights, full size) decodes; w = 0 / 1, whole and tiled.
    desc = importlib.import_module(f"{pack.sr_core.__name__}.cfw").load_cfw(fixture_state_dict("stablesr_cfw"))
    cfw = pack.host.RealSRModel(desc, "vqgan_cfw_00011.ckpt", ModelPatcher(
        desc.model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()))
    small = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref0 = (desc.decode(small, None, 0.0) + 1) / 2
        feats = desc.encode(padded * 2 - 1, return_features=True)[2]
        ref1 = (desc.decode(small, feats, 1.0) + 1) / 2
    assert (shost.decode_cfw(cfw, small, padded, 0.0) - ref0).abs().max().item() < 1e-4
    assert (shost.decode_cfw(cfw, small, padded, 1.0) - ref1).abs().max().item() < 1e-4
    assert (ref1 - ref0).abs().mean().item() > 1e-3  # the fusion layers act
    assert (shost.decode_cfw(cfw, small, padded, 1.0, tiled=True) - ref1).abs().max().item() < 1e-3
    assert not any(loaded.model is cfw.patcher for loaded in mm.current_loaded_models)  # offloaded after
    img_cfw, lat_cfw = _out(node.execute(model=models["model"], stablesr=models["sr"], vae=vae, image=image,
                                         cfw_vae=cfw, **_args(steps=2, cfw_weight=1.0)))
    img_sd, lat_sd = _out(node.execute(model=models["model"], stablesr=models["sr"], vae=vae, image=image,
                                       **_args(steps=2)))
    assert torch.equal(lat_cfw["samples"], lat_sd["samples"])  # CFW changes only the decoding
    assert img_cfw.shape == img_sd.shape and not torch.equal(img_cfw, img_sd)


def _x0_once(comfy, pack, models, x: torch.Tensor, lr: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    """One denoiser evaluation of the patched clone at a fixed x, through ComfyUI's sampling path."""
    import comfy.sample
    import comfy.samplers

    seen: dict[str, torch.Tensor] = {}

    def once(model, xs, sigmas, extra_args=None, callback=None, disable=None):
        seen["x0"] = model(x.to(xs), sigmas[0] * xs.new_ones(xs.shape[0]), **extra_args)
        return xs

    model = models["model"]
    m = pack.shost.patch_model(model, models["sr"], tile, overlap)
    scaled = model.model.process_latent_in(lr)
    ctx = _cond(models["context_dim"], 5)
    try:
        with torch.no_grad():
            comfy.sample.sample_custom(m, torch.zeros_like(lr), 1.0, comfy.samplers.KSAMPLER(once),
                                       torch.tensor([2.0, 0.0]), pack.shost.with_lr_latent(ctx, scaled),
                                       pack.shost.with_lr_latent(ctx, scaled), lr, disable_pbar=True, seed=0)
    finally:
        m.eject_model()
    return seen["x0"].cpu()


def test_aggregated_x0_has_no_tile_seams(comfy, pack, models) -> None:
    sys.path.insert(0, str(FIXTURES.parent))
    from test_stablesr_ve import border_ratio

    shost = pack.shost
    g = torch.Generator().manual_seed(4)
    smooth = lambda: torch.nn.functional.interpolate(torch.randn(1, 4, 6, 6, generator=g), size=(24, 24),  # noqa: E731
                                                     mode="bicubic")
    x, lr = smooth() * 2, smooth()
    whole = _x0_once(comfy, pack, models, x, lr, 24, 12)  # one tile = the plain (untiled) model
    tiled = _x0_once(comfy, pack, models, x, lr, 12, 6)
    plan = sys.modules[shost.plan_latent_tiles.__module__].plan_latent_tiles(24, 24, 12, 6)
    assert len(plan) == 9
    assert not torch.allclose(whole, tiled, atol=1e-4)  # the tiles really ran separately
    r_whole, r_tiled = border_ratio(whole, plan), border_ratio(tiled, plan)
    assert r_tiled < 1.15 * r_whole, (r_whole, r_tiled)


@pytest.mark.parametrize("name", ["stablesr_sd21_512", "stablesr_sd21_768v", "stablesr_turbo", "stablesr_sd21_512_cfw"])
def test_shipped_workflow_matches_the_node(comfy, name: str) -> None:
    """Each StableSR workflow converts to a prompt whose sampler inputs all fit the schema, with the official
    settings of its setup (the server test runs them on real-size random SD 2.1 files)."""
    from workflow_api import to_api

    def info(name: str) -> dict:
        cls = comfy.nodes[name]
        return cls.GET_NODE_INFO_V1() if hasattr(cls, "GET_NODE_INFO_V1") else {"input": cls.INPUT_TYPES()}

    ui = json.loads((FIXTURES.parents[1] / "workflows" / f"{name}.json").read_text())
    object_info = {n["type"]: info(n["type"]) for n in ui["nodes"]}
    prompt = to_api(ui, object_info)
    sampler = next(v for v in prompt.values() if v["class_type"] == f"{PREFIX}StableSRSampler")
    spec = object_info[f"{PREFIX}StableSRSampler"]["input"]
    wanted = set(spec["required"]) | {"positive", "negative"}
    assert wanted <= set(sampler["inputs"]), wanted - set(sampler["inputs"])
    ins = sampler["inputs"]
    assert ins["sampler_name"] == "stablesr_ddpm" and ins["upscale"] == 4.0
    assert ins["steps"] == (4 if "turbo" in name else 200) and ins["tiled_vae"] == "auto"
    assert ("cfw_vae" in ins) == name.endswith("_cfw")
    assert ins["start"] == "lr_latent" and ins["color_fix"] == "wavelet" and ins["cfw_weight"] == 0.5
    for name, value in ins.items():
        entry = spec["required"].get(name, spec.get("optional", {}).get(name))
        options = entry[0] if isinstance(entry[0], list) else entry[1].get("options") if entry[0] == "COMBO" else None
        if options is not None:
            assert value in options, (name, value)
    loader = next(v for v in prompt.values() if v["class_type"] == f"{PREFIX}LoadModel")
    assert ins["stablesr"] == [next(k for k, v in prompt.items() if v is loader), 2]


REFACTOR_FIXTURE = FIXTURES / "stablesr_node" / "before_engine.npz"


def test_node_output_unchanged_by_the_core_engine(comfy, pack, models) -> None:
    """The node's images on the fixture models, saved before StableSR moved into the core engine
    (``REALSR_WRITE_NODE_FIXTURE=1`` wrote them on that code): the same files, seed and settings give the
    same pixels now, to 1e-5 (float32 rounding of the same operations on the same machine kind)."""
    import os

    node = comfy.nodes[f"{PREFIX}StableSRSampler"]
    photo = skimage_photo("astronaut")[:, :, 100:116, 200:216]
    image = bhwc(torch.cat([photo, photo.flip(2)]))
    cases = {
        "ddpm_wavelet": _args(),
        "euler_noise_adain_tiledvae": _args(sampler_name="euler", steps=3, start="noise", color_fix="adain",
                                            tiled_vae="on", seed=5),
    }
    got = {}
    for name, args in cases.items():
        img, lat = _out(node.execute(model=models["model"], stablesr=models["sr"], vae=models["vae"], image=image, **args))
        got[name + "_image"], got[name + "_latent"] = img.float().cpu().numpy(), lat["samples"].float().cpu().numpy()
    if os.environ.get("REALSR_WRITE_NODE_FIXTURE"):
        REFACTOR_FIXTURE.parent.mkdir(exist_ok=True)
        np.savez_compressed(REFACTOR_FIXTURE, **got)
    saved = np.load(REFACTOR_FIXTURE)
    assert sorted(saved.files) == sorted(got)
    for k, v in got.items():
        np.testing.assert_allclose(v, saved[k], rtol=0, atol=1e-5, err_msg=k)


def test_cli_and_node_give_the_same_image_on_real_size_sd21(comfy, tmp_path) -> None:
    """The same StableSR through the two front-ends of the core engine: ComfyUI's node on the host's MODEL,
    VAE and CLIP (empty prompt) loaded by ComfyUI's checkpoint loader, and ``python -m realsr_core stablesr``
    on the core's own UNet, VAE and text tower read from the same real-size SD 2.1 file (random weights).
    Same seed, official DDPM, 2 steps, 32 -> 128 px.

    Tolerance: 2/255 at any pixel, 2e-3 mean.  The two sides run the same method with different
    implementations of the same operations (ComfyUI's UNet, attention, VAE and CLIP against ours; the DDPM
    update in ComfyUI's VE sigma space against the official eps space), so float32 rounding differs; it goes
    through 865 M-parameter networks and two sampling steps, not more.
    """
    import subprocess

    from comfy.sd import load_checkpoint_guess_config
    from test_server import STABLESR_FILES, sd21_files

    sd21 = sd21_files()
    assert sd21 is not None, "could not make the real-size SD 2.1 stand-ins (tests/host/sd21_random.py)"
    from helpers import make_weights

    fixture, wrapper = STABLESR_FILES["stablesr_000117.ckpt"]
    module_file = tmp_path / "stablesr_000117.ckpt"
    make_weights.save_checkpoint(fixture_state_dict(fixture), str(module_file), wrapper)
    photo = skimage_photo("astronaut")[:, :, 90:122, 190:222]
    from realsr_core.imageio import save_image

    save_image(photo, tmp_path / "lr.png")

    out = tmp_path / "cli.png"
    proc = subprocess.run([sys.executable, "-m", "realsr_core", "stablesr", str(tmp_path / "lr.png"), "-o", str(out),
                           "--sd", str(sd21 / "v2-1_512-ema-pruned.safetensors"), "--module", str(module_file),
                           "--steps", "2", "--seed", "11"], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from realsr_core.imageio import load_image

    cli = load_image(out)[0].permute(1, 2, 0)

    model, clip, vae = load_checkpoint_guess_config(str(sd21 / "v2-1_512-ema-pruned.safetensors"))[:3]
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    loader = comfy.nodes[f"{PREFIX}LoadModel"]
    import folder_paths

    folder_paths.add_model_folder_path("realsr", str(tmp_path))
    sr = _out(loader.execute(model_name="stablesr_000117.ckpt"))[2]
    node = comfy.nodes[f"{PREFIX}StableSRSampler"]
    img, _ = _out(node.execute(model=model, stablesr=sr, vae=vae, image=bhwc(photo), positive=cond, negative=cond,
                               **_args(seed=11, steps=2, tile_size=0, tile_overlap=0)))
    node_img = (img[0].float() * 255).round() / 255  # the CLI's result went through an 8-bit PNG
    diff = (node_img - cli).abs()
    assert diff.max().item() <= 2 / 255 + 1e-6 and diff.mean().item() < 2e-3, (diff.max().item(), diff.mean().item())


def test_node_in_float16_is_finite_and_close_to_float32(comfy, pack, models) -> None:
    """What GPU users get by default (ComfyUI's --fp16-unet --fp16-vae): the host's UNet and VAE in float16 on the
    small SD 2-structured model.  The result is finite and close to the float32 run: sampled latent within 20 %
    (relative L2; measured 10 %), image within 0.25 at any pixel and 0.03 on average (measured 0.16 / 0.015).

    Why that much: one float16 UNet call is 0.2 % off its float32 result here, but the first DDPM steps turn the
    noise estimate into x0 through 1 / sqrt(alpha_bar_t), about 15x at t = 999, so 4 steps end 3 % apart with
    the UNet alone in float16 (measured), and the random-weight VAE (large activations) adds the rest in float16.
    A trained model's activations are far smaller; this test guards against non-finite or broken float16 paths.
    """
    from comfy import model_detection, model_patcher, supported_models
    from comfy.sd import VAE

    mm = comfy.model_management
    sd = fixture_state_dict("stablesr_sampling")
    unet_sd = {k: v for k, v in sd.items() if k.startswith(UNET_PREFIX) and ".spade." not in k}
    cfg = model_detection.detect_unet_config(unet_sd, UNET_PREFIX)
    model_config = supported_models.SD20(cfg)
    model_config.unet_config["num_head_channels"] = 16
    model_config.set_inference_dtype(torch.float16, None)
    base = model_config.get_model(unet_sd, UNET_PREFIX)
    base.diffusion_model.load_state_dict({k[len(UNET_PREFIX):]: v.half() for k, v in unet_sd.items()}, strict=True)
    base.eval()
    model16 = model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    vae = models["vae"]
    vae16 = VAE(sd={k: v for k, v in vae.first_stage_model.state_dict().items()}, dtype=torch.float16,
                         config={"params": {"ddconfig": _VAE_DDCONFIG, "embed_dim": 4}})
    assert next(base.diffusion_model.parameters()).dtype == torch.float16 and vae16.vae_dtype == torch.float16
    node = comfy.nodes[f"{PREFIX}StableSRSampler"]
    image = bhwc(skimage_photo("astronaut")[:, :, 100:116, 200:216])
    img32, lat32 = _out(node.execute(model=models["model"], stablesr=models["sr"], vae=vae, image=image, **_args()))
    img16, lat16 = _out(node.execute(model=model16, stablesr=models["sr"], vae=vae16, image=image, **_args()))
    assert torch.isfinite(img16).all() and torch.isfinite(lat16["samples"]).all()
    z16, z32 = lat16["samples"].float(), lat32["samples"].float()
    rel = ((z16 - z32).norm() / z32.norm()).item()
    diff = (img16.float() - img32.float()).abs()
    assert rel < 0.2 and diff.max().item() < 0.25 and diff.mean().item() < 0.03, (rel, diff.max().item(),
                                                                                   diff.mean().item())
