"""x4 quality of CRL-SR on the held-out photos: against bicubic and against its own ablation (issue 5).

The held-out photos (``realsr_core.training.data.HELDOUT``, never trained on) are mod-cropped to a multiple
of 4 and degraded once with a fixed seed, in two settings of the CRL-SR paper:

* ``isotropic``: Eq. (1) with an isotropic 21x21 Gaussian kernel of width 2.0 and noise level 15;
* ``spatially_variant``: kernel width 0.2 -> 4 and noise 5 -> 50 growing from left to right (Sec. 4.3).

Each model upscales the whole LR photo (no tiling); PSNR and SSIM on Y with a 4 px border cropped, NIQE on the
RGB result (lower is better).  Models: the paper's Table 1 model (f), i.e. the shipped CRL-SR, and model (a),
the same network trained without the contrastive losses.

Usage::

    python bench/bench_crlsr.py [--model realsr_core/weights/crlsr_x4.safetensors]
                                [--ablation runs/crlsr_x4_ablation/model.safetensors] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from realsr_core import load_model  # noqa: E402
from realsr_core.training.data import photos  # noqa: E402
from realsr_core.training.degradations import classical, spatially_variant  # noqa: E402
from realsr_core.training.metrics import niqe, psnr_y, ssim_y  # noqa: E402

SCALE = 4
SEED = 0


def degraded_set() -> list[tuple[str, str, torch.Tensor, torch.Tensor]]:
    """(setting, photo, lr, hr) for every held-out photo and setting, fixed seed per setting."""
    items = []
    for setting in ("isotropic", "spatially_variant"):
        g = torch.Generator().manual_seed(SEED)
        for name, img in photos("heldout"):
            h, w = (s // SCALE * SCALE for s in img.shape[-2:])
            hr = img[None, :, :h, :w].contiguous()
            if setting == "isotropic":
                lr = classical(hr, SCALE, sigma=2.0, noise=15.0, generator=g)
            else:
                lr = spatially_variant(hr, SCALE, generator=g)
            items.append((setting, name, lr.clamp(0, 1), hr))
    return items


def measure(sr: torch.Tensor, hr: torch.Tensor) -> dict[str, float]:
    sr = sr.clamp(0, 1)
    return {"psnr_y": float(psnr_y(sr, hr, crop_border=SCALE)[0]), "ssim_y": float(ssim_y(sr, hr, crop_border=SCALE)[0]),
            "niqe": float(niqe(sr[0]))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "realsr_core" / "weights" / "crlsr_x4.safetensors"))
    p.add_argument("--ablation", default=str(ROOT / "runs" / "crlsr_x4_ablation" / "model.safetensors"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    models = {"CRL-SR (f)": load_model(a.model), "ablation (a)": load_model(a.ablation)}
    rows: list[dict] = []
    for setting, name, lr, hr in degraded_set():
        bic = F.interpolate(lr, scale_factor=SCALE, mode="bicubic", align_corners=False)
        row = {"setting": setting, "photo": name, "size": f"{hr.shape[-1]}x{hr.shape[-2]}", "bicubic": measure(bic, hr)}
        for label, desc in models.items():
            t0 = time.perf_counter()
            sr = desc.forward(lr)
            row[label] = {**measure(sr, hr), "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for setting in ("isotropic", "spatially_variant"):
        sel = [r for r in rows if r["setting"] == setting]
        summary[setting] = {m: {k: sum(r[m][k] for r in sel) / len(sel) for k in ("psnr_y", "ssim_y", "niqe")}
                            for m in ("bicubic", *models)}
    print(json.dumps(summary, indent=1))
    if a.json:
        meta = {"machine": f"{platform.machine()}, torch {torch.__version__}", "date": time.strftime("%Y-%m-%d"),
                "model": a.model, "ablation": a.ablation,
                "steps": {k: v.config.get("step") for k, v in models.items()}}
        Path(a.json).write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
