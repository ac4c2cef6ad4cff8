"""StableSR costs (issue 4): per-step tile-aggregation overhead, and tiled-VAE peak memory against image size.

``overhead``: one official DDPM step, through the core engine's sampling backend, on a latent canvas of 3x3 tiles (64/32 latent, the 512 model's plan)
with the real-size SD 2.1 UNet (865.9 M parameters, random weights: speed does not depend on the values) and
the real-size StableSR module (the ``stablesr_struct`` fixture's layout, 105.5 M).  The time spent inside the
tile evaluations (time-aware encoder + UNet with SFT, what any tiled StableSR must run) is measured
separately from the step's total; the difference is what the aggregation adds (cropping, Gaussian weights,
blending, the sampler update).  CPU time of this process (``time.process_time``) with ``--threads`` threads,
so a shared machine inflates neither side; ``--device cuda`` uses wall time with synchronisation.

``vae``: peak memory of the tiled VAE decode (shared GroupNorm statistics, 64-latent-px tiles + 8 context,
output assembled on the CPU) for growing outputs, each in a fresh subprocess: CUDA
``max_memory_allocated`` on a GPU, peak RSS growth on the CPU.  ``--vae-width`` scales the decoder's base
width (128 = the real SD VAE; smaller for a quick CPU run: memory still shows whether it grows).

``cli``: ``python -m realsr_core stablesr`` itself (the core engine with the core's UNet, VAE and text tower
read from an SD 2.1 file) on a ``--size`` crop of a real photo, x4: seconds per sampling step (from a 1-step and
a 3-step run) and each run's peak RSS.

Usage::

    python bench/bench_stablesr.py cli --sd v2-1_512-ema-pruned.safetensors --module stablesr_000117.ckpt [--size 128]
    python bench/bench_stablesr.py overhead [--device cuda] [--latent 128] [--steps 2]
    python bench/bench_stablesr.py vae [--sizes 512 1024 2048] [--vae-width 128] [--whole-too]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench_feedforward import peak_rss_mib, rss_mib  # noqa: E402  (this folder is on sys.path)


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def overhead(device: torch.device, latent: int, steps: int) -> dict:
    """Sampling through the core engine's backend (``CoreSampler``), UNet + encoder calls timed inside it."""
    from helpers import fixture_state_dict

    from realsr_core.diffusion import plan_latent_tiles
    from realsr_core.diffusion.engine import CoreSampler
    from realsr_core.models.stablesr import load as load_module
    from realsr_core.models.stablesr.unet import StableSRUNet, UNetConfig

    torch.manual_seed(0)
    unet = StableSRUNet(UNetConfig()).eval().to(device)
    module = load_module(fixture_state_dict("stablesr_struct"))
    module.to(device)
    g = torch.Generator().manual_seed(0)
    lr = torch.randn(1, 4, latent, latent, generator=g)
    ctx = torch.zeros(1, 77, 1024, device=device)
    inside = [0.0]

    def timed_unet(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, cond: object, sft: object) -> torch.Tensor:
        t0 = _clock(device)
        out = unet(x, t, c, cond, sft)
        inside[0] += _clock(device) - t0
        return out

    def timed_encoder(lr_tiles: torch.Tensor, t: torch.Tensor) -> object:
        t0 = _clock(device)
        out = module.encoder(lr_tiles, t)
        inside[0] += _clock(device) - t0
        return out

    rows = []
    with torch.no_grad():
        for k in range(steps):  # each run: one respaced step of the whole canvas, through the engine
            inside[0] = 0.0
            sampler = CoreSampler(timed_unet, timed_encoder, module.sft_layers, ctx, prediction="eps", steps=1,
                                  seed=k, latent_scale=1.0, device=device)
            t0 = _clock(device)
            sampler(lr, 64, 32)
            total = _clock(device) - t0
            rows.append({"step": k, "total_s": total, "tiles_s": inside[0], "overhead": total / inside[0] - 1})
            print(json.dumps(rows[-1]), flush=True)
    best = min(rows[1:] or rows, key=lambda r: r["total_s"])
    return {"latent": latent, "tiles": len(plan_latent_tiles(latent, latent, 64, 32)), "device": str(device),
            "threads": torch.get_num_threads(), "steps": rows, "overhead": best["overhead"]}


def cli(sd: str, module: str, size: int, threads: int, device: str) -> dict:
    """``python -m realsr_core stablesr`` on a real photo crop: seconds per step from 1- and 3-step runs (the
    difference removes loading, VAE and colour fix), peak RSS of each run (``wait4``)."""
    from PIL import Image

    from realsr_core.training.data import load_photo

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        x = load_photo("astronaut", max_side=None)[:, :size, :size]
        Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(Path(tmp) / "in.png")
        for steps in (1, 3):
            cmd = [sys.executable, "-m", "realsr_core", "stablesr", str(Path(tmp) / "in.png"), "-o",
                   str(Path(tmp) / f"out{steps}.png"), "--sd", sd, "--module", module, "--steps", str(steps),
                   "--device", device]
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            err = proc.stderr.read() if proc.stderr else ""
            _, status, usage = os.wait4(proc.pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                raise RuntimeError(err[-3000:])
            runs[steps] = {"seconds": time.perf_counter() - t0, "peak_rss_gib": usage.ru_maxrss / 2**20}
            print(json.dumps({"steps": steps, **runs[steps]}), flush=True)
    return {"input": f"{size}x{size}", "output": f"{4 * size}x{4 * size}", "runs": runs,
            "seconds_per_step": (runs[3]["seconds"] - runs[1]["seconds"]) / 2}


def vae_worker(size: int, width: int, device: str, tiled: bool) -> dict:
    from realsr_core.models.stablesr.cfw import build_vae
    from realsr_core.tiling import tiled_decode

    dev = torch.device(device)
    # The SD 2.1 VAE layout (kl-f8) at base width ``width`` (128 = the real one).
    cfg = {"in_channels": 3, "out_channels": 3, "ch": width, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
           "z_channels": 4, "double_z": True, "embed_dim": 4, "enc_attn_levels": [], "dec_attn_levels": [],
           "mid_attn": True, "shortcut": "nin_shortcut", "feature_levels": [1, 2]}
    torch.manual_seed(0)
    vae = build_vae(cfg).eval().to(dev)
    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    base = rss_mib()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    with torch.no_grad():
        if tiled:
            out = tiled_decode(vae.decode, vae.decoder, z, 64, 8, context=8, device=dev, output_device="cpu")
        else:
            out = vae.decode(z.to(dev)).cpu()
    seconds = time.perf_counter() - t0
    res = {"size": size, "width": width, "tiled": tiled, "seconds": seconds, "out": list(out.shape)}
    if dev.type == "cuda":
        res["peak_mib"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    else:
        res["peak_mib"] = peak_rss_mib() - base
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["overhead", "vae", "vae-worker", "cli"])
    p.add_argument("--sd", help="cli: SD 2.1 file (real, or tests/host/sd21_random.py's stand-in)")
    p.add_argument("--module", help="cli: StableSR module file")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--latent", type=int, default=128, help="latent canvas side (128 = 1024 px, 3x3 tiles)")
    p.add_argument("--steps", type=int, default=2, help="steps timed (the first warms up)")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--vae-width", type=int, default=128)
    p.add_argument("--whole-too", action="store_true", help="also decode the whole latent at once")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--tiled", type=int, default=1)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.what == "vae-worker":
        print(json.dumps(vae_worker(a.size, a.vae_width, a.device, bool(a.tiled))))
        return
    info = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
            "date": time.strftime("%Y-%m-%d"), "threads": a.threads}
    if a.device.startswith("cuda"):
        info["machine"] += f", {torch.cuda.get_device_name(0)}"
    if a.what == "overhead":
        info["overhead"] = overhead(torch.device(a.device), a.latent, a.steps)
    elif a.what == "cli":
        info["cli"] = cli(a.sd, a.module, a.size, a.threads, a.device)
    else:
        rows = []
        for size in a.sizes:
            for tiled in ([1, 0] if a.whole_too else [1]):
                cmd = [sys.executable, __file__, "vae-worker", "--size", str(size), "--tiled", str(tiled),
                       "--vae-width", str(a.vae_width), "--device", a.device, "--threads", str(a.threads)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(done.stderr[-3000:])
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
        info["vae"] = rows
    print(json.dumps(info, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
