"""The pack as a webui extension, through the real HTTP API of Forge and AUTOMATIC1111 (see conftest.py).

Tolerances: the webui runs torch 2.14.1 and the reference runs in this interpreter, so feed-forward results may
differ by one 8-bit level where a float lands on a rounding edge (measured: identical on this machine); StableSR
runs the host's own UNet (ldm's / Forge's attention) against the core's, 2/255 at any pixel and 2e-3 on average,
as for ComfyUI's node against the command line (tests/host/test_stablesr_host.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT
from PIL import Image
from webui_host import NCNN_MODEL, SD_FILE, V768_FILE, b64png, decode, photo, sd21_file, to_tensor

from realsr_core import color_fix, load_model, upscale

pytestmark = pytest.mark.slow
BUILTIN = "RealSR CRL-SR x4 (built-in)"
OFFICIAL = "StableSR DDPM (official)"


def extras(webui, image, upscaler: str, realsr: dict | None = None) -> dict:
    body = {"image": b64png(image), "upscaler_1": upscaler, "upscaling_resize": 4}
    if realsr is None:
        return webui.ok("POST", "/sdapi/v1/extra-single-image", {**body, "resize_mode": 0})
    return webui.ok("POST", "/realsr/v1/extra-single-image", {**body, "realsr": realsr})


def levels(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def stablesr_args(module: str = "stablesr_000117.ckpt", steps: int = 2, **kw) -> list:
    a = {"module": module, "cfw": "None", "upscale": 4, "sampler": OFFICIAL, "steps": steps, "tile_size": 0,
         "tile_overlap": 0, "start": "lr_latent", "color_fix": "wavelet", "color_fix_strength": 1.0, "cfw_weight": 0.5,
         "tiled_vae": "auto", **kw}
    return list(a.values())


def img2img(webui, image, *, seed: int = 11, script_args: list | None = None) -> tuple[int, object]:
    body = {"init_images": [b64png(image)], "prompt": "a photo", "seed": seed, "steps": 2, "width": 64, "height": 64,
            "denoising_strength": 0.5, "sampler_name": "Euler"}
    if script_args is not None:
        body.update(prompt="", script_name="stablesr", script_args=script_args)
    return webui.call("POST", "/sdapi/v1/img2img", body)


def test_upscalers_listed(webui) -> None:
    names = [u["name"] for u in webui.ok("GET", "/sdapi/v1/upscalers")]
    assert {BUILTIN, "RealSR FeMaSR_SRX4_model_g", "RealSR MMRealSRGAN"} <= set(names)
    if (webui.models / f"{NCNN_MODEL}.param").exists():  # an ncnn file (Real-ESRGAN's compact net) is one too
        assert f"RealSR {NCNN_MODEL}" in names
    # The StableSR module and the CFW VAE are not upscalers: only the StableSR script lists them.
    assert not any("stablesr" in n.lower() or "cfw" in n.lower() for n in names)


def test_builtin_upscaler_gives_the_command_lines_pixels(webui, tmp_path) -> None:
    image = photo(100, 50, 64, 48)
    out = decode(extras(webui, image, BUILTIN)["image"])
    image.save(tmp_path / "in.png")
    done = subprocess.run([sys.executable, "-m", "realsr_core", "upscale", str(tmp_path / "in.png"), "-o",
                           str(tmp_path / "cli.png")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    cli = np.asarray(Image.open(tmp_path / "cli.png").convert("RGB"))
    assert out.shape == (192, 256, 3)
    assert levels(out, cli) <= 1


@pytest.mark.parametrize("name", ["FeMaSR_SRX4_model_g.pth", "MMRealSRGAN.pth", f"{NCNN_MODEL}.param"])
def test_official_layout_stand_ins_and_an_ncnn_file_run(webui, name: str) -> None:
    if not (webui.models / name).exists():
        pytest.skip(f"no {name}: tests/test_ncnn.py says where the ncnn files come from")
    image = photo(200, 100, 32, 24)
    out = decode(extras(webui, image, f"RealSR {Path(name).stem}")["image"])
    desc = load_model(webui.models / name)
    ref = upscale(desc, to_tensor(image)).image
    ref = (ref[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert levels(out, ref) <= 1


def test_extras_controls_change_the_result_as_expected(webui) -> None:
    image = photo(150, 60, 32, 32)
    x = to_tensor(image)
    mm = load_model(webui.models / "MMRealSRGAN.pth")

    def reference(**options) -> np.ndarray:
        y = upscale(mm, x, **options).image
        return (y[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)

    plain = decode(extras(webui, image, "RealSR MMRealSRGAN")["image"])
    # Manual scores reach the model: each equals the core's result with the same scores, and they differ.
    clean = extras(webui, image, "RealSR MMRealSRGAN", {"blur_auto": False, "blur": 0.0, "noise_auto": False, "noise": 0.0})
    heavy = extras(webui, image, "RealSR MMRealSRGAN", {"blur_auto": False, "blur": 1.0, "noise_auto": False, "noise": 1.0})
    assert levels(decode(clean["image"]), reference(blur=0.0, noise=0.0)) <= 1
    assert levels(decode(heavy["image"]), reference(blur=1.0, noise=1.0)) <= 1
    assert levels(decode(clean["image"]), decode(heavy["image"])) > 8
    assert "blur 0.000, noise 0.000" in clean["html_info"]
    # Auto scores: the model's estimate, reported.
    auto = extras(webui, image, "RealSR MMRealSRGAN", {})
    assert levels(decode(auto["image"]), plain) <= 1 and "estimated" in auto["html_info"]
    # Colour fix against the input: the core's colour fix of the plain result.
    fixed = extras(webui, image, "RealSR MMRealSRGAN", {"color_fix": "adain", "color_fix_strength": 1.0})
    want = color_fix(to_tensor(plain), x, method="adain")
    want = (want[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert levels(decode(fixed["image"]), want) <= 1 and levels(decode(fixed["image"]), plain) > 0
    # LWay: an adapted copy gives another image and a loss curve; the loaded model is unchanged afterwards.
    lway = extras(webui, image, "RealSR MMRealSRGAN", {"lway_iterations": 3, "lway_lr": 1e-4})
    assert levels(decode(lway["image"]), plain) > 0
    assert len(lway["extra_images"]) == 1 and decode(lway["extra_images"][0]).shape == (360, 640, 3)
    assert "RealSR LWay: &quot;3 iterations" in lway["html_info"]
    assert levels(decode(extras(webui, image, "RealSR MMRealSRGAN")["image"]), plain) == 0
    # A bad control is refused with its name; the server goes on.
    status, body = webui.call("POST", "/realsr/v1/extra-single-image",
                              {"image": b64png(image), "upscaler_1": BUILTIN, "realsr": {"blurr": 1}})
    assert status == 400 and "blurr" in body
    status, body = webui.call("POST", "/realsr/v1/extra-single-image",
                              {"image": b64png(image), "upscaler_1": BUILTIN, "realsr": {"color_fix_strength": 3}})
    assert status == 400 and "color_fix_strength must be in [0, 1]" in body


def test_stablesr_script_matches_the_command_line_and_leaves_img2img_unchanged(webui, tmp_path) -> None:
    lr = photo(190, 90, 32, 32)
    # img2img draws the VAE's posterior sample from the global generator, left by the job before it, so the
    # plain run is made twice: "before" then follows the same job as "after" does, StableSR aside.
    assert img2img(webui, lr)[0] == 200
    status, plain = img2img(webui, lr)
    assert status == 200, plain
    status, out = img2img(webui, lr, script_args=stablesr_args())
    assert status == 200, f"{out}\n{webui.log_tail()}"
    got = decode(out["images"][0])
    assert got.shape == (128, 128, 3)
    lr.save(tmp_path / "lr.png")
    done = subprocess.run([sys.executable, "-m", "realsr_core", "stablesr", str(tmp_path / "lr.png"), "-o",
                           str(tmp_path / "cli.png"), "--sd", str(sd21_file()), "--module",
                           str(webui.models / "stablesr_000117.ckpt"), "--steps", "2", "--seed", "11"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    cli = np.asarray(Image.open(tmp_path / "cli.png").convert("RGB"))
    diff = np.abs(got.astype(float) - cli.astype(float)) / 255
    assert diff.max() <= 2 / 255 + 1e-9 and diff.mean() < 2e-3, (diff.max(), diff.mean())
    # The SFT hooks are gone: a plain img2img with the same seed gives the same pixels as before.
    status, after = img2img(webui, lr)
    assert status == 200 and decode(after["images"][0]).tobytes() == decode(plain["images"][0]).tobytes()


def test_stablesr_webui_sampler_and_cfw_run(webui) -> None:
    lr = photo(190, 90, 24, 24)
    status, out = img2img(webui, lr, script_args=stablesr_args(sampler="webui sampler (Sampling method, CFG, prompts)",
                                                                 cfw="vqgan_cfw_00011.ckpt", upscale=2))
    assert status == 200, f"{out}\n{webui.log_tail()}"
    img = decode(out["images"][0])
    assert img.shape == (48, 48, 3) and img.std() > 0


def test_interrupt_mid_run_leaves_img2img_unchanged(webui) -> None:
    lr = photo(190, 90, 32, 32)
    assert img2img(webui, lr, seed=3)[0] == 200  # see the test above: "before" follows the same job as "after"
    status, plain = img2img(webui, lr, seed=3)
    assert status == 200
    result: dict = {}
    run = threading.Thread(target=lambda: result.update(r=img2img(webui, lr, script_args=stablesr_args(steps=50))))
    t0 = time.time()
    run.start()
    while time.time() - t0 < 300:  # wait until sampling has begun, then press Interrupt
        time.sleep(1)
        if webui.ok("GET", "/sdapi/v1/progress?skip_current_image=true")["state"].get("sampling_step", 0) > 0:
            break
    webui.ok("POST", "/sdapi/v1/interrupt")
    run.join(600)
    assert not run.is_alive()
    status, body = result["r"]
    assert status == 200 and body["images"] == [] and "interrupted" in body["info"]
    assert time.time() - t0 < 200  # 50 steps would take about 4 minutes here
    status, after = img2img(webui, lr, seed=3)
    assert status == 200 and decode(after["images"][0]).tobytes() == decode(plain["images"][0]).tobytes()


def _misfit_module(folder) -> str:
    """The 512 module with one SFT layer widened to 640 channels (consistently): it loads, but fits no SD 2.1."""
    sd = torch.load(folder / "stablesr_000117.ckpt", weights_only=True)["state_dict"]
    pre = "model.diffusion_model.input_blocks.1.0.spade."
    for k in [k for k in sd if k.startswith(pre) and not k.startswith(pre + "mlp_shared")]:
        shape = list(sd[k].shape)
        shape[0] = 640
        sd[k] = torch.zeros(shape)
    torch.save({"state_dict": sd}, folder / "misfit_stablesr.ckpt")
    return "misfit_stablesr.ckpt"


def test_bad_inputs_get_one_line_messages_and_the_server_goes_on(webui) -> None:
    lr = photo(190, 90, 32, 32)
    cases = [
        (stablesr_args(module="stablesr_768v_000139.ckpt"),  # an official file not downloaded: folder and link
         "https://huggingface.co/Iceclear/StableSR/resolve/main/stablesr_768v_000139.ckpt and put it in models/RealSR/"),
        (stablesr_args(module="mine.ckpt"), "python -m realsr_core models"),
        (stablesr_args(module="MMRealSRGAN.pth"), "not a StableSR module"),
        (stablesr_args(module=_misfit_module(webui.models)), "does not fit this UNet"),
        (stablesr_args(upscale=0.5), "upscale must be a number in [1, 16]"),
        (stablesr_args(sampler="Euler"), "sampler must be one of"),
    ]
    for args, message in cases:
        status, body = img2img(webui, lr, script_args=args)
        assert status != 200 and message in str(body), (args, status, str(body)[:1500])
    status, body = img2img(webui, photo(0, 0, 1, 1), script_args=stablesr_args(upscale=1))
    assert status != 200 and "at least 8x8" in str(body)
    assert SD_FILE in str(webui.ok("GET", "/sdapi/v1/sd-models"))  # still serving


def test_install_py_installs_nothing_into_a_webui_venv(webui) -> None:
    """What the webui runs on every start (``run_extension_installer``: the webui's Python, PYTHONPATH = its root):
    with the webui's pinned packages nothing is missing, so pip is not called and the host's pins stay."""
    python, root = webui.proc.args[0], webui.root
    done = subprocess.run([python, str(ROOT / "install.py")], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "realsr: all requirements are installed" in done.stdout, done.stdout + done.stderr


def test_stablesr_reads_v_prediction_from_the_weights_on_768v(webui, tmp_path) -> None:
    """The 768-v file (Forge takes it for eps without a .yaml): the script's image is the command line's, which reads
    v-prediction from the same weights; an eps reading would be far off."""
    titles = [m["title"] for m in webui.ok("GET", "/sdapi/v1/sd-models")]
    v768 = next(t for t in titles if "768" in t)
    webui.ok("POST", "/sdapi/v1/options", {"sd_model_checkpoint": v768})
    try:
        lr = photo(190, 90, 32, 32)
        status, out = img2img(webui, lr, script_args=stablesr_args())
        assert status == 200, f"{out}\n{webui.log_tail()}"
    finally:
        webui.ok("POST", "/sdapi/v1/options", {"sd_model_checkpoint": next(t for t in titles if "512" in t)})
    lr.save(tmp_path / "lr.png")
    done = subprocess.run([sys.executable, "-m", "realsr_core", "stablesr", str(tmp_path / "lr.png"), "-o",
                           str(tmp_path / "cli.png"), "--sd", str(sd21_file(V768_FILE)), "--module",
                           str(webui.models / "stablesr_000117.ckpt"), "--steps", "2", "--seed", "11"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0 and "v-prediction" in done.stderr, done.stderr[-3000:]
    diff = np.abs(decode(out["images"][0]).astype(float) - np.asarray(Image.open(tmp_path / "cli.png")).astype(float))
    assert diff.max() <= 2 + 1e-9 and diff.mean() / 255 < 2e-3, (diff.max(), diff.mean())


def test_hires_fix_runs_the_realsr_upscaler(webui) -> None:
    """txt2img with hires fix upscaling by the shipped CRL-SR: the webui calls our upscaler inside its own job."""
    body = {"prompt": "a photo", "seed": 5, "steps": 1, "width": 64, "height": 64, "sampler_name": "Euler",
            "enable_hr": True, "hr_scale": 2, "hr_upscaler": BUILTIN, "hr_second_pass_steps": 1, "denoising_strength": 0.3}
    if webui.name == "forge":  # Forge's API fails any hires fix without it ("'NoneType' is not iterable", even Lanczos)
        body["hr_additional_modules"] = ["Use same choices"]
    status, out = webui.call("POST", "/sdapi/v1/txt2img", body)
    assert status == 200, f"{out}\n{webui.log_tail()}"
    assert decode(out["images"][0]).shape == (128, 128, 3)
    assert f"Hires upscaler: {BUILTIN}" in out["info"]
