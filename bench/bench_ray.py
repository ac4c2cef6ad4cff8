"""Throughput of the folder job: the local executor against Ray with 1 and 2 workers, on this machine (issue 19).

A folder of real photos (crops of scikit-image's photos, ``--size`` px, ``--count`` files) upscaled by the shipped
CRL-SR x4 model.  Every run writes a fresh output folder; the Ray runs share one local cluster started before the
clock (``ray.init``), so their times include what every job pays: starting the actors, loading the model in each,
scheduling and moving the outcomes; not the cluster's own start (reported apart).  Also measured: the I/O of one
image (read the input, write the PNG result) and the model load of one actor, the two limits of scaling out.

Usage::

    python bench/bench_ray.py --count 32 --size 128
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def make_photos(folder: Path, count: int, size: int) -> None:
    from skimage import data

    from realsr_core.imageio import save_image

    names = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "cat"]
    k = 0
    while k < count:
        for name in names:
            img = torch.from_numpy(getattr(data, name)()[..., :3].copy()).permute(2, 0, 1)[None].float() / 255
            h, w = img.shape[-2:]
            y, x = (k * 37) % (h - size), (k * 53) % (w - size)
            (folder / f"roll{k % 4}").mkdir(parents=True, exist_ok=True)
            save_image(img[..., y:y + size, x:x + size], folder / f"roll{k % 4}" / f"{name}_{k:04d}.png")
            k += 1
            if k == count:
                break


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=32)
    p.add_argument("--size", type=int, default=128)
    a = p.parse_args()

    import ray

    from realsr_core import jobs
    from realsr_core.imageio import load_image, save_image
    from realsr_core.ray_executor import run_on_ray

    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    src = tmp / "in"
    src.mkdir()
    make_photos(src, a.count, a.size)
    rows = []

    def record(label: str, seconds: float, summary: jobs.Summary) -> None:
        assert summary.count("done") == a.count, summary.lines()
        rows.append({"run": label, "seconds": round(seconds, 2), "images_per_s": round(a.count / seconds, 3)})
        print(json.dumps(rows[-1]), flush=True)

    # Local executor, 2 threads (the machine's cores), then 1.
    for threads in (2, 1):
        job = jobs.UpscaleJob(str(src), f"{tmp}/local{threads}/", threads=threads)
        t0 = time.perf_counter()
        runner = jobs.ModelRunner(job)
        summary = jobs.run_job(job.plan(), runner, scale=runner.scale)
        record(f"local, {threads} threads (model load included)", time.perf_counter() - t0, summary)
    torch.set_num_threads(2)

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cluster_start = time.perf_counter() - t0
    try:
        for workers, cpus in ((1, 2), (1, 1), (2, 1)):
            job = jobs.UpscaleJob(str(src), f"{tmp}/ray{workers}x{cpus}/")
            t0 = time.perf_counter()
            summary = run_on_ray(job, job.plan(), scale=4, workers=workers, cpus_per_worker=cpus)
            record(f"ray, {workers} worker(s) x {cpus} CPU", time.perf_counter() - t0, summary)
        # A one-image job: the fixed cost of a Ray job (actor start + model load + scheduling), 1 worker.
        one = tmp / "one"
        one.mkdir()
        first = sorted(src.rglob("*.png"))[0]
        (one / "x.png").write_bytes(first.read_bytes())
        job = jobs.UpscaleJob(str(one), f"{tmp}/ray_one/")
        t0 = time.perf_counter()
        run_on_ray(job, job.plan(), scale=4, workers=1, cpus_per_worker=2)
        one_image_job = time.perf_counter() - t0
    finally:
        ray.shutdown()

    # The two limits of scaling out: I/O per image and model load per actor.
    files = sorted(src.rglob("*.png"))
    t0 = time.perf_counter()
    for f in files:
        save_image(torch.nn.functional.interpolate(load_image(f), scale_factor=4), tmp / "io.png", overwrite=True)
    io_per_image = (time.perf_counter() - t0) / len(files)
    t0 = time.perf_counter()
    jobs.ModelRunner(jobs.UpscaleJob(str(src), str(tmp / "x")))
    model_load = time.perf_counter() - t0

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")
    by = {r["run"]: r for r in rows}
    local2 = by["local, 2 threads (model load included)"]["seconds"]
    ray12 = by["ray, 1 worker(s) x 2 CPU"]["seconds"]
    print(json.dumps({
        "machine": f"{cpu}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "ray": ray.__version__, "images": a.count, "size": a.size, "model": "shipped CRL-SR x4", "rows": rows,
        "ray_cluster_start_s": round(cluster_start, 2), "ray_one_image_job_s": round(one_image_job, 2),
        # Ray's cost against the local executor on the same 2 CPUs: a fixed part per job (the one-image job minus
        # one image's compute) and the rest spread over the images.
        "ray_fixed_cost_per_job_s": round(one_image_job - local2 / a.count, 2),
        "ray_overhead_per_image_s": round((ray12 - local2 - (one_image_job - local2 / a.count)) / a.count, 3),
        "io_per_image_s (read input + write x4 PNG)": round(io_per_image, 3),
        "model_load_per_actor_s": round(model_load, 2),
    }, indent=1))


if __name__ == "__main__":
    main()
