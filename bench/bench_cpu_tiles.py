"""Peak memory and time of ``python -m realsr_core upscale`` on a CPU: ``--tile auto`` (the stated budget)
against one whole-image tile (what "auto" did when it took half of the free RAM) and fixed tiles.

Each setting runs the real command in a fresh process on a centre crop of a real photo (Debian's
plasma-workspace-wallpapers) and reads that process's own peak RSS (``os.wait4``); the results are compared
with the last setting's (the whole image by default) in 8-bit levels.

Usage::

    python bench/bench_cpu_tiles.py [--size 1024] [--model FILE] [--tiles auto 128 256 0] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def photo(size: int) -> Image.Image:
    """A ``size`` x ``size`` centre crop of the first Plasma wallpaper photo (2560x1600)."""
    from realsr_core.training.data import load_photo, photo_names

    names = [n for n in photo_names() if n.startswith("plasma_")]
    if not names:
        raise SystemExit("needs Debian's plasma-workspace-wallpapers (apt-get install plasma-workspace-wallpapers)")
    x = load_photo(names[0], max_side=None)
    h, w = x.shape[-2:]
    if min(h, w) < size:
        raise SystemExit(f"{names[0]} is {w}x{h}; choose --size <= {min(h, w)}")
    y0, x0 = (h - size) // 2, (w - size) // 2
    arr = (x[:, y0 : y0 + size, x0 : x0 + size].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


def run(src: Path, dst: Path, tile: str, model: str | None, threads: int) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of one command in a fresh process (``wait4`` gives that child's own peak)."""
    cmd = [sys.executable, "-m", "realsr_core", "upscale", str(src), "-o", str(dst), "--tile", tile, "--overwrite"]
    if model:
        cmd += ["--model", model]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--model", default=None, help="checkpoint (default: the shipped CRL-SR x4)")
    ap.add_argument("--tiles", nargs="+", default=["auto", "128", "256", "0"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"# {platform.node()} {cpu}, {os.cpu_count()} cores, {args.threads} threads, {time.strftime('%Y-%m-%d')}")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.png"
        photo(args.size).save(src)
        results = {}
        for tile in args.tiles:
            results[tile] = run(src, Path(tmp) / f"out_{tile}.png", tile, args.model, args.threads)
        ref = np.asarray(Image.open(Path(tmp) / f"out_{args.tiles[-1]}.png"), dtype=np.int16)
        print(f"{args.size}x{args.size} -> x4, model {args.model or 'shipped CRL-SR x4'}")
        print("| --tile | time (s) | peak RSS (GiB) | max diff vs last (8-bit levels) |")
        print("| --- | --- | --- | --- |")
        for tile, (seconds, peak) in results.items():
            diff = np.abs(np.asarray(Image.open(Path(tmp) / f"out_{tile}.png"), dtype=np.int16) - ref).max()
            print(f"| {tile} | {seconds:.1f} | {peak / 1024:.2f} | {diff} |")


if __name__ == "__main__":
    main()
