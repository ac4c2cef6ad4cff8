"""Speed and peak memory of FeMaSR x4 and MM-RealSR x4 against spandrel, and tiled memory at 2048x2048.

Both implementations load the same generated checkpoint (the oracle fixtures' deterministic weights,
saved in the official ``{'params': ...}`` container).  Each measurement runs in a fresh subprocess so
peak memory is that run's own: CUDA ``max_memory_allocated`` on a GPU, peak RSS growth on the CPU
(``ru_maxrss`` after the run minus the RSS once the model is loaded).

Outputs are compared on the raw network call (``model(x)``) at sizes that need no padding, so both
sides compute exactly the same thing: max and mean |diff| and the fraction of output pixels where some
channel differs by more than 1e-2 (a few flipped VQ codes show up as a small fraction with a large max);
our official inference path (FeMaSR's always-pad mirror) is timed too.

Each run records wall time (``time.perf_counter``) and the process's CPU time (``time.process_time``,
all threads together), the best of the repeats; on a shared machine, ``--threads 1`` and the CPU-time
ratio are the least load-sensitive comparison.

Usage (needs ``pip install spandrel spandrel-extra-arches``, i.e. torch with torchvision)::

    python bench/bench_feedforward.py [--device cuda] [--sizes 128 512] [--repeats 3] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT))


def rss_mib() -> float:
    """This process's resident memory now, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_checkpoint(fixture: str, folder: Path) -> Path:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_weights", FIXTURES / "make_weights.py")
    mw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mw)
    man = mw.load_manifest(str(FIXTURES / fixture / "manifest.json"))
    path = folder / f"{fixture}.pth"
    if not path.exists():
        mw.save_checkpoint(mw.make_state_dict(man, man["seed"]), str(path), man["wrapper"])
    return path


def photo(size: int):
    """A real photo (scikit-image astronaut, or a wallpaper-size tiling of it) cropped to size x size."""
    import numpy as np
    import torch
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.astronaut())
    if size > 512:
        img = img.resize((size, size), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32)[:size, :size] / 255.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())[None]


def worker(
    impl: str, ckpt: str, size: int, device: str, repeats: int, mode: str, tile: int | None, threads: int | None
) -> dict:
    """One measurement in this process: load, warm up, time, record peak memory."""
    import torch

    torch.set_grad_enabled(False)
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    x = photo(size).to(dev)
    if impl == "spandrel":
        import spandrel_extra_arches
        from spandrel import ModelLoader

        spandrel_extra_arches.install()
        model = ModelLoader().load_from_file(ckpt).model.eval().to(dev)
        if "mmrealsr" in ckpt:
            def call(t):
                return model(t)[0]
        else:
            call = model
    else:
        from realsr_core import load_model, upscale

        desc = load_model(ckpt, device=dev)
        if mode == "raw":
            # The bare network (FeMaSR without its padding); MM-RealSR estimates its scores as spandrel does.
            call = desc.model if desc.arch == "femasr" else desc.forward
        elif mode == "official":
            call = desc.forward
        else:  # tiled job through the public API, output assembled on the CPU
            def call(t):
                return upscale(desc, t.cpu(), tile=tile, device=dev).image

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    base_rss = rss_mib()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    times, cpu_times = [], []
    out = None
    for i in range(repeats + (1 if size <= 256 else 0)):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        out = call(x)
        sync()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if size > 256 or i > 0:  # small sizes get a warm-up run
            times.append(dt)
            cpu_times.append(dc)
    res = {"impl": impl, "mode": mode, "size": size, "device": device, "threads": torch.get_num_threads(),
           "seconds": min(times), "seconds_all": times, "cpu_seconds": min(cpu_times),
           "cpu_seconds_all": cpu_times, "out_shape": list(out.shape)}
    if dev.type == "cuda":
        res["peak_mib"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    else:
        res["peak_mib"] = peak_rss_mib() - base_rss
    if os.environ.get("BENCH_SAVE"):
        torch.save(out.float().cpu(), os.environ["BENCH_SAVE"])
    return res


def run_sub(*args: str, save: str | None = None, extra: list[str] | None = None) -> dict:
    env = dict(os.environ)
    if save:
        env["BENCH_SAVE"] = save
    cmd = [sys.executable, __file__, *(extra or []), "--worker", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare_outputs(a, b, threshold: float = 1e-2) -> dict:
    """Max and mean |a - b| and the fraction of pixels (B, H, W positions) where any channel differs by
    more than ``threshold``."""
    d = (a.float() - b.float()).abs()
    return {"max_abs_diff": d.max().item(), "mean_abs_diff": d.mean().item(),
            "frac_px_diff_gt_1e-2": (d.amax(1) > threshold).float().mean().item()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", nargs=6, metavar=("IMPL", "CKPT", "SIZE", "DEVICE", "REPEATS", "MODE"))
    p.add_argument("--tile", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every worker")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", type=int, nargs="*", default=[128, 512])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", nargs="+", default=["femasr_x4", "mmrealsr_x4"])
    p.add_argument("--tiled-size", type=int, default=512, help="input size of the tiled run (x4 -> 2048)")
    p.add_argument("--tiles", type=int, nargs="*", default=[128, 256])
    p.add_argument("--json", default=None)
    p.add_argument("--official-max-size", type=int, default=256,
                   help="time our official inference path only up to this input size (it costs a full extra run)")
    a = p.parse_args()
    if a.worker:
        impl, ckpt, size, device, repeats, mode = a.worker
        print(json.dumps(worker(impl, ckpt, int(size), device, int(repeats), mode, a.tile, a.threads)))
        return

    import torch

    tmp = Path(tempfile.mkdtemp(prefix="realsr_bench_"))
    results: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
                     "device": a.device, "date": time.strftime("%Y-%m-%d"), "rows": [], "tiled": []}
    if a.device.startswith("cuda"):
        results["machine"] += f", {torch.cuda.get_device_name(0)}"
    results["threads"] = a.threads
    thr = ["--threads", str(a.threads)] if a.threads else []
    for fixture in a.models:
        ckpt = str(make_checkpoint(fixture, tmp))
        for size in a.sizes:
            rep = str(a.repeats if size <= 256 else max(1, a.repeats - 2))
            s_out, o_out = str(tmp / "s.pt"), str(tmp / "o.pt")
            sp = run_sub("spandrel", ckpt, str(size), a.device, rep, "raw", save=s_out, extra=thr)
            ours = run_sub("ours", ckpt, str(size), a.device, rep, "raw", save=o_out, extra=thr)
            off = (run_sub("ours", ckpt, str(size), a.device, rep, "official", extra=thr)
                   if size <= a.official_max_size else {"seconds": None, "cpu_seconds": None})
            diff = compare_outputs(torch.load(s_out), torch.load(o_out))
            print(json.dumps({"spandrel": sp, "ours": ours}), file=sys.stderr, flush=True)
            row = {"model": fixture, "size": size, "spandrel_s": sp["seconds"], "ours_s": ours["seconds"],
                   "ours_official_path_s": off["seconds"], "time_ratio": ours["seconds"] / sp["seconds"],
                   "spandrel_cpu_s": sp["cpu_seconds"], "ours_cpu_s": ours["cpu_seconds"],
                   "ours_official_path_cpu_s": off["cpu_seconds"],
                   "cpu_time_ratio": ours["cpu_seconds"] / max(sp["cpu_seconds"], 1e-9),
                   "spandrel_peak_mib": sp["peak_mib"], "ours_peak_mib": ours["peak_mib"],
                   "mem_ratio": ours["peak_mib"] / max(sp["peak_mib"], 1e-9), **diff}
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
        for tile in a.tiles:
            t = run_sub("ours", ckpt, str(a.tiled_size), a.device, "1", "tiled", extra=["--tile", str(tile), *thr])
            row = {"model": fixture, "input": a.tiled_size, "output": t["out_shape"][-1], "tile": tile,
                   "seconds": t["seconds"], "cpu_seconds": t["cpu_seconds"], "peak_mib": t["peak_mib"]}
            results["tiled"].append(row)
            print(json.dumps(row), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
