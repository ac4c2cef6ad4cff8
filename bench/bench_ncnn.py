"""Our PyTorch path against the ncnn runtime on the same ncnn files (Real-ESRGAN x4plus), the runtime CPU users pick.

Each measurement runs in a fresh subprocess (peak RSS = ``ru_maxrss`` of that process minus its RSS after loading
the model, so both sides count only the run): a warm-up, then the timed run, same thread count on both sides.
``--size 128``: the whole image at once.  ``--size 512`` with ``--tile T``: both run the same tiles (T input px,
10 px context around each, as Real-ESRGAN's ncnn apps pre-pad), ours through :func:`realsr_core.upscale`, ncnn
through a plain loop over the same tiles.

``--precision bf16``: both sides in their bfloat16 mode (ours: ``dtype=torch.bfloat16``, what ``--half`` runs on a
CPU; ncnn: ``opt.use_bf16_storage``); each result's PSNR against ncnn's float32 result is reported, so the speed of a
precision is never shown without its cost.

Usage::

    python bench/bench_ncnn.py --model realesrgan-x4plus.param --size 128 --threads 2 [--precision bf16]
    python bench/bench_ncnn.py --model realesrgan-x4plus.param --size 512 --tile 128 --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONTEXT = 10


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def photo(size: int) -> np.ndarray:
    from skimage import data

    img = data.astronaut()  # 512x512
    return np.ascontiguousarray(img[:size, :size].astype(np.float32).transpose(2, 0, 1) / 255)


def run_ours(model: str, x: np.ndarray, tile: int, threads: int, bf16: bool) -> tuple[float, int, np.ndarray]:
    import torch

    from realsr_core import load_model, upscale

    torch.set_num_threads(threads)
    desc = load_model(model)
    t = torch.from_numpy(x)[None]
    kw = {"tile": tile or None, "overlap": 0, "context": CONTEXT, "dtype": torch.bfloat16 if bf16 else None}
    upscale(desc, t[..., :64, :64], tile=None, dtype=kw["dtype"])  # warm-up
    base = rss()
    t0 = time.perf_counter()
    y = upscale(desc, t, **kw).image
    return time.perf_counter() - t0, base, y[0].float().numpy()


def run_ncnn(model: str, x: np.ndarray, tile: int, threads: int, bf16: bool) -> tuple[float, int, np.ndarray]:
    import ncnn

    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.num_threads = threads
    net.opt.use_bf16_storage = bf16
    net.load_param(model)
    net.load_model(model[: -len(".param")] + ".bin")

    def infer(a: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(a)  # ncnn.Mat wraps this buffer: keep it alive while the extractor runs
        ex = net.create_extractor()
        ex.input("data", ncnn.Mat(a))
        return np.array(ex.extract("output")[1])

    infer(x[:, :64, :64])  # warm-up
    base = rss()
    t0 = time.perf_counter()
    if not tile:
        out = infer(x)
    else:
        _, h, w = x.shape
        out = np.zeros((3, 4 * h, 4 * w), np.float32)
        for y0 in range(0, h, tile):
            for x0 in range(0, w, tile):
                y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
                py0, px0 = max(y0 - CONTEXT, 0), max(x0 - CONTEXT, 0)
                py1, px1 = min(y1 + CONTEXT, h), min(x1 + CONTEXT, w)
                y = infer(x[:, py0:py1, px0:px1])
                oy, ox = 4 * (y0 - py0), 4 * (x0 - px0)
                out[:, 4 * y0:4 * y1, 4 * x0:4 * x1] = y[:, oy:oy + 4 * (y1 - y0), ox:ox + 4 * (x1 - x0)]
    return time.perf_counter() - t0, base, out


def worker(side: str, model: str, size: int, tile: int, threads: int, bf16: bool, save: str) -> dict:
    x = photo(size)
    seconds, base, out = (run_ours if side == "ours" else run_ncnn)(model, x, tile, threads, bf16)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    np.save(save, np.clip(out, 0, 1))
    return {"side": side, "precision": "bf16" if bf16 else "fp32", "seconds": seconds,
            "peak_rss_growth_mib": max(peak - base, 0) / 2**20}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="an ncnn .param (its .bin beside it)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--tile", type=int, default=0, help="input tile (0: whole image)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--worker", choices=["ours", "ncnn"])
    p.add_argument("--save", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.model, a.size, a.tile, a.threads, a.precision == "bf16", a.save)))
        return
    rows, outputs = [], {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-ncnn-"))
    runs = [("ncnn", "fp32")] + ([("ncnn", "bf16"), ("ours", "bf16")] if a.precision == "bf16" else [("ours", "fp32")])
    for side, precision in runs:
        save = tmp / f"{side}_{precision}.npy"
        cmd = [sys.executable, __file__, "--worker", side, "--model", a.model, "--size", str(a.size), "--tile",
               str(a.tile), "--threads", str(a.threads), "--precision", precision, "--save", str(save)]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        outputs[side, precision] = np.load(save)
        rows[-1]["psnr_vs_ncnn_fp32_db"] = round(psnr(outputs[side, precision], outputs["ncnn", "fp32"]), 1)
        print(json.dumps(rows[-1]), flush=True)
    default = rows[0]  # ncnn as users run it: float32 (its defaults on this CPU)
    rows = [r for r in rows if r["precision"] == a.precision]
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")
    ncnn_row, ours = rows
    print(json.dumps({"machine": f"{cpu}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
                      "model": Path(a.model).name, "size": a.size, "tile": a.tile, "threads": a.threads, "rows": rows,
                      "time_ratio_ours_over_ncnn": ours["seconds"] / ncnn_row["seconds"],
                      "memory_ratio_ours_over_ncnn": ours["peak_rss_growth_mib"] / max(ncnn_row["peak_rss_growth_mib"], 1e-9),
                      "time_ratio_ours_over_ncnn_fp32_default": ours["seconds"] / default["seconds"]},
                     indent=1))


if __name__ == "__main__":
    main()
