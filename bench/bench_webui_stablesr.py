"""StableSR in the webui (the img2img script) against ComfyUI's node: same SD 2.1 file, module, image and steps.

``webui``: a running Forge or AUTOMATIC1111 with this extension (start it with ``../shared/webui/start_*.sh``
plus ``--realsr-models-path`` holding the module and ``--ckpt-dir`` holding the SD file); calls
``/sdapi/v1/img2img`` with ``script_name: stablesr``.  ``comfy``: the pack's StableSR node inside ComfyUI
(``COMFYUI_PATH``), in this process.  Both: a warm-up call (loads everything), then 1 and 5 official DDPM
steps; seconds per step = (t5 - t1) / 4 (loading, VAE and colour fix cancel out); peak memory = the largest
resident set of the process that runs the model during a call, minus its resident set just before.

Usage::

    python bench/bench_webui_stablesr.py webui --port 7861 --pid $(cat ~/webui/forge-server.pid) [--size 64]
    COMFYUI_PATH=... python bench/bench_webui_stablesr.py comfy --sd v2-1_512-ema-pruned.safetensors \
        --module stablesr_000117.ckpt [--size 64]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(call: Callable[[], object], pid: int) -> dict:
    """Wall seconds of ``call`` and the peak resident-set growth of process ``pid`` meanwhile (sampled at 20 Hz)."""
    before, peak, done = rss(pid), [0], threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss(pid))
            time.sleep(0.05)

    t = threading.Thread(target=poll)
    t.start()
    t0 = time.perf_counter()
    try:
        call()
    finally:
        seconds = time.perf_counter() - t0
        done.set()
        t.join()
    return {"seconds": seconds, "peak_rss_growth_gib": max(peak[0] - before, 0) / 2**30, "rss_before_gib": before / 2**30}


def photo(size: int) -> np.ndarray:
    from skimage import data

    return data.astronaut()[90:90 + size, 190:190 + size]


def webui(port: int, pid: int, size: int, module: str) -> Callable[[int], object]:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(photo(size)).save(buf, "PNG")
    image = base64.b64encode(buf.getvalue()).decode()

    def run(steps: int) -> object:
        body = {"init_images": [image], "prompt": "", "seed": 11, "script_name": "stablesr",
                "script_args": [module, "None", 4, "StableSR DDPM (official)", steps, 0, 0, "lr_latent", "wavelet", 1.0,
                                0.5, "auto"]}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/sdapi/v1/img2img", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=3600) as r:
            out = json.loads(r.read())
        assert out["images"], out.get("info")
        return out

    return run


def comfy(sd: str, module: str, size: int) -> Callable[[int], object]:
    import asyncio

    import torch

    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    from comfy.cli_args import args

    args.cpu = True
    import folder_paths
    from comfy.sd import load_checkpoint_guess_config

    import nodes

    assert asyncio.run(nodes.load_custom_node(str(ROOT)))
    folder_paths.add_model_folder_path("realsr", str(Path(module).parent))
    model, clip, vae = load_checkpoint_guess_config(sd)[:3]
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(""))

    def out(r):  # a V3 node's NodeOutput or a plain tuple
        return r.result if hasattr(r, "result") else r

    sr = out(nodes.NODE_CLASS_MAPPINGS["RealSR_LoadModel"].execute(model_name=Path(module).name))[2]
    image = torch.from_numpy(photo(size).astype(np.float32) / 255)[None]
    node = nodes.NODE_CLASS_MAPPINGS["RealSR_StableSRSampler"]

    def run(steps: int) -> object:
        with torch.inference_mode():
            return node.execute(model=model, stablesr=sr, vae=vae, image=image, positive=cond, negative=cond,
                                upscale=4.0, seed=11, steps=steps, sampler_name="stablesr_ddpm", scheduler="normal",
                                cfg=1.0, start="lr_latent", tile_size=0, tile_overlap=0, color_fix="wavelet",
                                cfw_weight=0.5)

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["webui", "comfy"])
    p.add_argument("--port", type=int)
    p.add_argument("--pid", type=int, help="webui: the server's process id (its start script writes it)")
    p.add_argument("--sd", help="comfy: the SD 2.1 file")
    p.add_argument("--module", default="stablesr_000117.ckpt", help="module file (webui: its name in models/RealSR)")
    p.add_argument("--size", type=int, default=64, help="input side (x4 output)")
    a = p.parse_args()
    if a.what == "webui":
        run, pid = webui(a.port, a.pid, a.size, Path(a.module).name), a.pid
    else:
        run, pid = comfy(a.sd, a.module, a.size), os.getpid()
    run(1)  # warm-up: loads the checkpoint, the module, the text tower
    runs = {steps: measure(lambda s=steps: run(s), pid) for steps in (1, 5)}
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    print(json.dumps({"what": a.what, "machine": f"{cpu}, {os.cpu_count()} cores",
                      "date": time.strftime("%Y-%m-%d"), "input": f"{a.size}x{a.size}", "output": f"{4 * a.size}px",
                      "runs": runs, "seconds_per_step": (runs[5]["seconds"] - runs[1]["seconds"]) / 4}, indent=1))


if __name__ == "__main__":
    main()
