"""LWay's claim on our data (issue 6): does self-supervised fine-tuning on the LR image itself help an SR model
whose training degradations differ from the test image's?

SR model: the shipped CRL-SR x4 (trained on the CRL-SR paper's classical and spatially variant degradations), or
any file the pack loads (``--model``, e.g. the bicubic-trained ``lway_bench_sr_bicubic`` run).
Test images: the held-out photos (``realsr_core.training.data.HELDOUT``, never trained on by either model),
mod-cropped to 4 and degraded once per family with a fixed seed by a *different* family: BSRGAN's
``degradation_bsrgan``, Real-ESRGAN's second-order pipeline, or the low-noise ``camera`` family.  For every image: PSNR / SSIM on Y (4 px
border cropped) and NIQE of the whole-image x4 result before and after LWay (``realsr_core.adapt.finetune``
on that LR image alone, with the shipped LWay module), the time per fine-tuning iteration, and LWay's own loss
on the whole image for the clean HR, the SR result before and after, and bicubic (which one the objective
prefers; ``--iterations 0`` gives only this and the "before" metrics).  With ``--json out.json`` each adapted
result is also written as ``out/<family>_<photo>.png``.

``--oracle`` (camera family only) replaces the learned LWay module by the camera model's own noise-free
operator with each image's drawn parameters (defocus disk, lens PSF, area downscale, then LWay's bicubic
upsampling): the fine-tuning then optimises against a perfect R, which separates what LWay's objective can give
this SR model from what the learned R's errors cost.

Usage::

    python bench/bench_lway.py [--iterations 100] [--lr 1e-5] [--families bsrgan realesrgan]
                               [--compute-dtype fp32|bf16|fp16] [--device cpu|cuda] [--threads 2]
                               [--json bench/out/lway.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_crlsr import measure as quality  # noqa: E402  (this folder is on sys.path)

from realsr_core import load_model  # noqa: E402
from realsr_core.adapt import finetune, hf_weight_map, lway_loss  # noqa: E402
from realsr_core.imageio import save_image  # noqa: E402
from realsr_core.models.lway.network import LWayReconstruction, bicubic_resize  # noqa: E402
from realsr_core.training.data import photos  # noqa: E402
from realsr_core.training.degradations import bsrgan, camera, camera_optics, realesrgan  # noqa: E402
from realsr_core.weights import builtin_path  # noqa: E402

SCALE = 4
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FAMILIES = {"bsrgan": bsrgan, "realesrgan": realesrgan, "camera": camera}


def degraded(family: str, seed: int, only: list[str] | None = None) -> list[tuple[str, Tensor, Tensor, dict | None]]:
    """(photo, lr, hr, camera parameters or None) for every held-out photo, degraded by ``family`` with one
    generator seeded once (a photo gets the same degradation whether or not ``only`` leaves others out)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for name, img in photos("heldout"):
        h, w = (s // SCALE * SCALE for s in img.shape[-2:])
        hr = img[None, :, :h, :w].contiguous()
        params = None
        if family == "camera":
            lr, params = camera(hr, SCALE, g, return_params=True)
        else:
            lr = FAMILIES[family](hr, SCALE, g)
        if not only or name in only:
            out.append((name, lr.clamp(0, 1), hr, params))
    return out


class _CameraOperator(nn.Module):
    """The camera family's noise-free operator for one image's parameters, as R's call ``(sr, e) -> lr_up``."""

    def __init__(self, params: dict[str, Tensor]) -> None:
        super().__init__()
        self.radius, self.psf_sigma = params["radius"], params["psf_sigma"]

    def forward(self, sr: Tensor, e: Tensor) -> Tensor:
        return bicubic_resize(camera_optics(sr, SCALE, self.radius, self.psf_sigma), tuple(sr.shape[-2:]))


class OracleReconstruction(LWayReconstruction):
    """LWay's E and R replaced by the true degradation (``--oracle``): E is unused, R is the camera operator."""

    def __init__(self, params: dict[str, Tensor]) -> None:
        super().__init__(embed_dim=1, enc_feat=1, enc_blocks=0, enc_channels=(1,), mlp_layers=1, rec_feat=1,
                         rec_blocks=0)
        self.reconstructor = _CameraOperator(params)  # type: ignore[assignment]

    def embed(self, lr_up: Tensor) -> Tensor:
        return lr_up.new_zeros(lr_up.shape[0], 1, 1, 1)


def measure(desc, lr: torch.Tensor, hr: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
    """PSNR-Y / SSIM-Y / NIQE of ``desc``'s whole-image result (the CRL-SR benchmark's metrics), and the result."""
    with torch.inference_mode():
        sr = desc.forward(lr.to(desc.device)).float().cpu().clamp(0, 1)
    return quality(sr, hr), sr


def whole_image_losses(rec, lr: torch.Tensor, candidates: dict[str, torch.Tensor]) -> dict[str, float]:
    """LWay's loss on the whole image (x 1e4) for each candidate SR-size image: which one the objective prefers."""
    with torch.inference_mode():
        up = bicubic_resize(lr, candidates["hr"].shape[-2:])
        e, w = rec.model.embed(up), hf_weight_map(up)
        return {k: float(lway_loss(rec.model.reconstructor(v, e), up, w)) * 1e4 for k, v in candidates.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(builtin_path("crlsr_x4.safetensors")))
    p.add_argument("--lway", default=str(builtin_path("lway_rec.safetensors")))
    p.add_argument("--families", nargs="+", default=["bsrgan", "realesrgan"], choices=sorted(FAMILIES))
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--patch-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--params", default="all")
    p.add_argument("--seed", type=int, default=0, help="degradation seed (the fine-tuning seed is fixed at 0)")
    p.add_argument("--photos", nargs="*", default=None, help="only these held-out photos")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compute-dtype", default="fp32", choices=sorted(DTYPES),
                   help="precision of the fine-tuning passes (bf16 / fp16: mixed precision; metrics stay float32)")
    p.add_argument("--oracle", action="store_true", help="fine-tune against the true camera operator (camera family)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.oracle and a.families != ["camera"]:
        p.error("--oracle needs --families camera (the only family with a deterministic operator to stand in for R)")
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    model = load_model(a.model, device=dev)
    rec = load_model(a.lway, device=dev)
    rows = []
    for family in a.families:
        for name, lr, hr, params in degraded(family, a.seed, a.photos):
            before, sr0 = measure(model, lr, hr)
            t0 = time.perf_counter()
            r = OracleReconstruction(params) if a.oracle else rec
            res = finetune(model, lr, r, iterations=a.iterations, lr=a.lr, patch_size=a.patch_size,
                           batch_size=a.batch_size, params=a.params, device=dev,
                           compute_dtype=DTYPES[a.compute_dtype])
            if dev.type == "cuda":
                torch.cuda.synchronize()
            per_it = (time.perf_counter() - t0) / max(a.iterations, 1)
            after, sr1 = measure(res.model, lr, hr)
            if a.json:  # the adapted results beside the figures (bench_models.py --lway puts them on its sheet)
                folder = Path(a.json).with_suffix("")
                folder.mkdir(parents=True, exist_ok=True)
                save_image(sr1, folder / f"{family}_{name}.png", overwrite=True)
            bic = bicubic_resize(lr, hr.shape[-2:]).clamp(0, 1)
            losses = whole_image_losses(rec, lr, {"hr": hr, "sr_before": sr0, "sr_after": sr1, "bicubic": bic})
            row = {"family": family, "photo": name, "lr_size": f"{lr.shape[-1]}x{lr.shape[-2]}", "before": before,
                   "after": after, "gain_db": after["psnr_y"] - before["psnr_y"],
                   "ssim_gain": after["ssim_y"] - before["ssim_y"], "niqe_change": after["niqe"] - before["niqe"],
                   "s_per_iteration": per_it, "loss_first10": sum(res.losses[:10]) / max(1, len(res.losses[:10])),
                   "loss_last10": sum(res.losses[-10:]) / max(1, len(res.losses[-10:])),
                   "whole_image_loss_x1e4": losses}
            rows.append(row)
            print(json.dumps(row), flush=True)
    gains = [r["gain_db"] for r in rows]
    summary = {"images": len(rows), "improved": sum(g > 0 for g in gains), "median_gain_db": statistics.median(gains),
               "mean_gain_db": statistics.fmean(gains), "worst_gain_db": min(gains),
               "median_s_per_iteration": statistics.median(r["s_per_iteration"] for r in rows)}
    print(json.dumps(summary, indent=1))
    if a.json:
        meta = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
                + (f", {torch.cuda.get_device_name(0)}" if dev.type == "cuda" else ""),
                "date": time.strftime("%Y-%m-%d"), "args": vars(a),
                "model_step": model.config.get("step"), "lway_step": rec.config.get("step")}
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
