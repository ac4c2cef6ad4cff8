"""The folder job on Ray Data: the same :class:`jobs.UpscaleJob`, run by model-holding workers across a cluster.

The driver plans the job (every refusal of the local mode, before the cluster is touched), then streams the
tasks through a pool of actors (one per GPU, or one per ``cpus_per_worker`` CPU cores).  Each actor holds one
:class:`jobs.ModelRunner` and does its batch with :func:`jobs.run_task`, the local mode's own code: it reads
the input, skips a finished result, writes atomically, and turns a bad file into a ``failed`` outcome.  Only
the outcomes travel back; images go from storage to the worker and back to storage.

Nothing lost, nothing twice: Ray restarts a dead actor and resubmits its batch (Ray Data's defaults for actor
pools, ``max_restarts=-1``, ``max_task_retries=-1``).  A result the dead actor had already written is complete
(atomic rename), so the retry finds it and skips it; it is reported as done, since it was not there when the
job started.  A killed writer's hidden temporary file is removed at the end (:func:`jobs.remove_partials`).

Inputs and outputs must be where every worker sees them: a shared filesystem mounted at the same path on every
node, or URIs (``s3://...``, see :mod:`realsr_core.storage`).  ``ray`` is an
optional dependency (``pip install "ray[data]"``), imported only here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from . import jobs
from .errors import RealSRError
from .storage import as_path, as_str


class _Worker:
    """A Ray actor: the job's model, loaded once, applied to batches of tasks."""

    def __init__(self, job: jobs.UpscaleJob, root: str, scale: float) -> None:
        from PIL import Image

        # This process is the job's: its max_pixels (checked by load_image) is the one size limit, as in the local
        # mode, rather than Pillow's own decompression-bomb threshold.
        Image.MAX_IMAGE_PIXELS = None
        self.runner = jobs.ModelRunner(job)
        self.job, self.root, self.scale = job, as_path(root), scale

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        status, reason = [], []
        for src, dst, rel in zip(batch["src"], batch["dst"], batch["rel"], strict=True):
            outcome = jobs.run_task(jobs.Task(as_path(src), as_path(dst), str(rel)), self.runner, root=self.root,
                                    scale=self.scale, overwrite=self.job.overwrite, max_pixels=self.job.max_pixels)
            status.append(outcome.status)
            reason.append(outcome.reason)
        return {"index": batch["index"], "status": np.array(status, dtype=object),
                "reason": np.array(reason, dtype=object)}


def _connect(address: str) -> bool:
    """Join the cluster (``auto``: this machine's, else a new local one); True when this call started Ray."""
    try:
        import ray
    except ImportError as e:
        raise RealSRError("--ray needs Ray: pip install \"ray[data]\" (or pip install -e .[ray])") from e
    if ray.is_initialized():
        return False
    try:
        ray.init(address=None if address == "auto" else address, logging_level="WARNING", log_to_driver=False)
    except ConnectionError as e:
        cause = f"{e}: {type(e.__cause__).__name__}" if e.__cause__ is not None else str(e)
        raise RealSRError(
            f"--ray {address}: cannot join the cluster ({cause}). Start one with `ray start --head`, or pass --ray "
            "auto for a local one; a cluster with token authentication needs RAY_AUTH_MODE=token and its token "
            "(RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH) here too") from e
    return True


def _pool(job: jobs.UpscaleJob, workers: int | None, cpus_per_worker: int) -> tuple[int, float, float]:
    """(workers, CPUs per worker, GPUs per worker) from the cluster's resources."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus and (job.device is None or job.device.startswith("cuda")):
        return workers or gpus, 1.0, 1.0
    if job.device is not None and job.device.startswith("cuda"):
        raise RealSRError(f"--device {job.device}: the Ray cluster has no GPU (resources: {resources})")
    cpus = int(resources.get("CPU", 1))
    return workers or max(1, cpus // cpus_per_worker), float(cpus_per_worker), 0.0


def run_on_ray(job: jobs.UpscaleJob, plan: jobs.Plan, *, scale: float, address: str = "auto",
               workers: int | None = None, cpus_per_worker: int = 1, batch_size: int = 4,
               report: Callable[[jobs.Outcome], None] | None = None,
               describe: Callable[[str], None] | None = None) -> jobs.Summary:
    """Run a planned job on Ray; ``report`` sees each outcome on this machine as it arrives (any order).

    Args:
        job: the job, as the local executor takes it (``threads`` is set to ``cpus_per_worker`` on CPU workers).
        plan: ``job.plan()``.
        scale: the model's scale (for the finished-result check).
        address: ``auto`` or a Ray cluster address.
        workers: model-holding actors (default: one per GPU, else one per ``cpus_per_worker`` CPUs).
        cpus_per_worker: CPU cores (and torch threads) of each CPU actor.
        batch_size: tasks per actor call (at most the images per worker).
        describe: receives one line on the pool (workers, resources, nodes) before the work starts.

    Returns:
        The summary in the plan's order, as the local executor gives it.
    """
    import dataclasses
    import logging

    started = _connect(address)
    import ray
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its per-run lines; the per-image report is the progress
    try:
        n_workers, cpus, gpus = _pool(job, workers, cpus_per_worker)
        if describe is not None:
            nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
            each = "1 GPU" if gpus else f"{cpus:g} CPU{'s' if cpus != 1 else ''}"
            describe(f"{n_workers} worker{'s' if n_workers != 1 else ''} ({each} each) on {nodes} "
                     f"node{'s' if nodes != 1 else ''}")
        if not gpus:
            job = dataclasses.replace(job, threads=cpus_per_worker, device="cpu")
        jobs.remove_partials(plan)
        existed = {i for i, t in enumerate(plan.tasks) if t.dst.exists()}
        # Absolute paths and whole URIs: workers run in other folders (and on other machines, where a shared
        # filesystem is mounted at the same path); the report keeps the paths as the user gave them.
        items = [{"index": i, "src": as_str(t.src), "dst": as_str(t.dst), "rel": t.rel}
                 for i, t in enumerate(plan.tasks)]
        ray.data.DataContext.get_current().enable_progress_bars = False
        # Smaller batches when there are few images, so that every worker gets some; one block per batch.
        batch_size = max(1, min(batch_size, math.ceil(len(items) / n_workers)))
        ds = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / batch_size))
        kwargs: dict[str, Any] = {"num_gpus": gpus} if gpus else {}
        results = ds.map_batches(
            _Worker, fn_constructor_kwargs={"job": job, "root": as_str(plan.output_root), "scale": scale},
            batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=n_workers), num_cpus=cpus, **kwargs)
        outcomes: dict[int, jobs.Outcome] = {}
        for row in results.iter_rows():
            i = int(row["index"])
            task = plan.tasks[i]
            # The worker named the file by its absolute path; the report names it as the user did.
            status, reason = str(row["status"]), str(row["reason"]).replace(str(task.src.absolute()), str(task.src))
            if status == "skipped" and i not in existed:
                # Written by an actor that died before returning its batch; the retry found it complete.
                status, reason = "done", "written before its worker was lost (kept, not redone)"
            outcome = jobs.Outcome(task, status, reason)  # type: ignore[arg-type]
            if i in outcomes:
                continue  # a batch returned twice is reported once
            outcomes[i] = outcome
            if report is not None:
                report(outcome)
        missing = [t.rel for i, t in enumerate(plan.tasks) if i not in outcomes]
        if missing:
            raise RealSRError(f"Ray returned no result for {len(missing)} images (first: {missing[:3]}); rerun the "
                              "same command to do them")
        jobs.remove_partials(plan)
        return jobs.Summary([outcomes[i] for i in range(len(plan.tasks))], ignored=list(plan.ignored))
    finally:
        if started:
            ray.shutdown()
