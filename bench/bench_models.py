"""Where the shipped default stands against the GAN upscalers users pick instead (issue 18, item 6).

Models: the shipped CRL-SR x4, Real-ESRGAN x4plus and realsr-ncnn-vulkan's DF2K_JPEG x4 (both as their ncnn files,
read by ``realsr_core.ncnn``; equal to the ncnn runtime within 7e-6).  Images: the held-out photos, degraded once
per family with a fixed seed (``bench_lway.degraded``: camera, BSRGAN, Real-ESRGAN's pipeline).  Per image and
model: PSNR / SSIM on Y (4 px border cropped) and NIQE of the whole-image x4 result, and seconds per output
megapixel; a contact sheet (``--sheet``): for one photo per family, a crop of the LR (nearest), bicubic, each
model and the HR, side by side.

Each model after LWay: ``--lway`` takes the JSON files of ``bench_lway.py`` runs on these models (same photos,
degradations and seed), adds their "after" figures as "<model> + LWay" to the table and medians, and puts the
adapted results those runs saved (``<json>/<family>_<photo>.png``) on the sheet beside each model.

Usage::

    python bench/bench_models.py --x4plus realesrgan-x4plus.param --df2k models-DF2K_JPEG/x4.param \\
        [--families camera bsrgan realesrgan] [--lway bench/out/lway_*.json] [--sheet docs/compare_models.png]
        [--json out.json]
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
from realsr_core.imageio import load_image  # noqa: E402
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


def lway_results(files: list[str], paths: dict[str, str]) -> dict[tuple[str, str, str], dict]:
    """(model label, family, photo) -> {"after": metrics, "image": saved PNG or None} from bench_lway JSON files;
    ``paths`` maps each label to its model file (a run is matched to a model by that file)."""
    by_file = {Path(v).resolve(): k for k, v in paths.items()}
    out: dict[tuple[str, str, str], dict] = {}
    for f in files:
        run = json.loads(Path(f).read_text())
        label = by_file.get(Path(run["meta"]["args"]["model"]).resolve())
        if label is None:
            raise SystemExit(f"{f}: its model {run['meta']['args']['model']} is none of {sorted(paths.values())}")
        for r in run["rows"]:
            png = Path(f).with_suffix("") / f"{r['family']}_{r['photo']}.png"
            key = (label, r["family"], r["photo"])
            out[key] = {"after": r["after"], "image": png if png.exists() else out.get(key, {}).get("image"),
                        "iterations": run["meta"]["args"]["iterations"]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--x4plus", required=True)
    p.add_argument("--df2k", required=True)
    p.add_argument("--families", nargs="+", default=["camera", "bsrgan", "realesrgan"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lway", nargs="*", default=[], help="bench_lway.py JSON files of these models")
    p.add_argument("--sheet", default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    paths = {"CRL-SR x4 (shipped)": str(builtin_path()), "Real-ESRGAN x4plus": a.x4plus, "DF2K_JPEG x4": a.df2k}
    models = {label: load_model(path) for label, path in paths.items()}
    adapted = lway_results(a.lway, paths)
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
                done = adapted.get((label, family, name))
                if done is not None:
                    row[f"{label} + LWay"] = {**done["after"], "iterations": done["iterations"]}
                    if done["image"] is not None:
                        outs[f"{label} + LWay"] = load_image(done["image"])
            rows.append(row)
            print(json.dumps(row), flush=True)
            if name == "astronaut":  # one photo per family on the contact sheet: the face
                y, x0 = 80, 200
                lr_up = F.interpolate(lr, scale_factor=SCALE, mode="nearest")
                tiles = [_tile(lr_up, y, x0, f"{family}: LR")]
                tiles += [_tile(v, y, x0, k.replace(" (shipped)", "")) for k, v in outs.items()] + [_tile(hr, y, x0, "HR")]
                sheet_rows.append(tiles)
    columns = ["bicubic", *(c for m in models for c in (m, f"{m} + LWay"))]
    summary = {f: {m: {k: statistics.median(r[m][k] for r in rows if r["family"] == f)
                       for k in ("psnr_y", "ssim_y", "niqe")}
                   for m in columns if all(m in r for r in rows if r["family"] == f)} for f in a.families}
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
