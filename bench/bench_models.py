"""Where the shipped default stands against the GAN upscalers users pick instead (issue 18, item 6).

Models: the shipped CRL-SR x4, Real-ESRGAN x4plus and realsr-ncnn-vulkan's DF2K_JPEG x4 (both as their ncnn files,
read by ``realsr_core.ncnn``; equal to the ncnn runtime within 7e-6).  Images: the held-out photos, degraded once
per family with a fixed seed (``bench_lway.degraded``: camera, BSRGAN, Real-ESRGAN's pipeline).  Per image and
model: PSNR / SSIM on Y (4 px border cropped) and NIQE of the whole-image x4 result, and seconds per output
megapixel; a contact sheet (``--sheet``): for one photo per family, a crop of the LR (nearest), bicubic, each
model and the HR, side by side.

Usage::

    python bench/bench_models.py --x4plus realesrgan-x4plus.param --df2k models-DF2K_JPEG/x4.param \\
        [--families camera bsrgan realesrgan] [--sheet docs/compare_models.png] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_crlsr import measure  # noqa: E402
from bench_lway import degraded  # noqa: E402

from realsr_core import load_model  # noqa: E402
from realsr_core.weights import builtin_path  # noqa: E402

SCALE = 4
CROP = 96  # output pixels of each contact-sheet crop


def _tile(x: torch.Tensor, y: int, x0: int, label: str) -> Image.Image:
    a = (x[0, :, y:y + CROP, x0:x0 + CROP].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    im = Image.fromarray(a).resize((2 * CROP, 2 * CROP), Image.NEAREST)
    canvas = Image.new("RGB", (2 * CROP, 2 * CROP + 16), "white")
    canvas.paste(im, (0, 16))
    ImageDraw.Draw(canvas).text((3, 2), label, fill=(0, 0, 0))
    return canvas


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--x4plus", required=True)
    p.add_argument("--df2k", required=True)
    p.add_argument("--families", nargs="+", default=["camera", "bsrgan", "realesrgan"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sheet", default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    models = {"CRL-SR x4 (shipped)": load_model(builtin_path()), "Real-ESRGAN x4plus": load_model(a.x4plus),
              "DF2K_JPEG x4": load_model(a.df2k)}
    rows, sheet_rows = [], []
    for family in a.families:
        for name, lr, hr, _ in degraded(family, a.seed):
            bic = F.interpolate(lr, scale_factor=SCALE, mode="bicubic", align_corners=False).clamp(0, 1)
            row = {"family": family, "photo": name, "lr": f"{lr.shape[-1]}x{lr.shape[-2]}", "bicubic": measure(bic, hr)}
            outs = {"bicubic": bic}
            for label, desc in models.items():
                t0 = time.perf_counter()
                with torch.inference_mode():
                    sr = desc.forward(lr).float().clamp(0, 1)
                sec = time.perf_counter() - t0
                row[label] = {**measure(sr, hr), "s_per_mp": sec / (sr.shape[-1] * sr.shape[-2] / 1e6)}
                outs[label] = sr
            rows.append(row)
            print(json.dumps(row), flush=True)
            if name == "astronaut":  # one photo per family on the contact sheet: the face
                y, x0 = 80, 200
                lr_up = F.interpolate(lr, scale_factor=SCALE, mode="nearest")
                tiles = [_tile(lr_up, y, x0, f"{family}: LR")]
                tiles += [_tile(v, y, x0, k.split(" (")[0]) for k, v in outs.items()] + [_tile(hr, y, x0, "HR")]
                sheet_rows.append(tiles)
    summary = {f: {m: {k: statistics.median(r[m][k] for r in rows if r["family"] == f)
                       for k in ("psnr_y", "ssim_y", "niqe")} for m in ("bicubic", *models)} for f in a.families}
    for m in models:
        summary.setdefault("s_per_mp", {})[m] = statistics.median(r[m]["s_per_mp"] for r in rows)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")
    info = {"machine": f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}", "date": time.strftime("%Y-%m-%d"),
            "threads": a.threads, "median": summary, "rows": rows}
    print(json.dumps(summary, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(info, indent=1))
    if a.sheet and sheet_rows:
        w, h = sheet_rows[0][0].size
        sheet = Image.new("RGB", (w * len(sheet_rows[0]), h * len(sheet_rows)), "white")
        for i, tiles in enumerate(sheet_rows):
            for j, t in enumerate(tiles):
                sheet.paste(t, (j * w, i * h))
        sheet.save(a.sheet, optimize=True)


if __name__ == "__main__":
    main()
