"""Image jobs on files and folders: which outputs a job writes, refusals before any work, and the run.

The rules, shared by every front-end that writes files (command line, batch executors):

* a result is written atomically (``imageio.save_image``): no partial file, ever;
* no output is one of the inputs, the output folder is not the input folder, and two inputs never map
  to one output: each is refused, naming the files, before anything runs (even with ``overwrite``);
* a symbolic link in the output tree is never followed or replaced;
* the output folder is writable and the output type known before any work;
* a bad input is reported and the job goes on; an existing complete result is skipped unless
  ``overwrite``, so an interrupted job resumes where it stopped; an existing file that is not such a
  result is never replaced without ``overwrite``.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Literal, Protocol

import torch
from torch import Tensor

from . import imageio
from .errors import InvalidInputError, RealSRError, RealSRWarning
from .files import PARTIAL_MARK
from .storage import UriPath, as_path

if TYPE_CHECKING:
    from .descriptor import ModelDescriptor

# A local file or folder, or one named by a URI (storage.UriPath: object stores, HDFS, ...).
AnyPath = Path | UriPath

# Exit codes of the command line (and of any job runner that reports one).
EXIT_OK = 0
EXIT_REFUSED = 2  # nothing ran: bad arguments, model, input or output
EXIT_SOME_FAILED = 3  # the job ran; some files failed (listed in the summary)
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM; rerun the same command to continue

Status = Literal["done", "skipped", "failed"]


@dataclass(frozen=True)
class Task:
    """One input image and the file its result goes to (``rel``: the input's path inside the job's input)."""

    src: AnyPath
    dst: AnyPath
    rel: str


@dataclass
class Plan:
    """What a job will do: ``tasks`` in order, and files of the input folder that are not images (with why)."""

    tasks: list[Task]
    output_root: AnyPath
    ignored: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Outcome:
    task: Task
    status: Status
    reason: str = ""

    def failure(self) -> str:
        """``input: reason``, naming the input once (reading errors already start with the path)."""
        src = str(self.task.src)
        return self.reason if self.reason.startswith(src) else f"{src}: {self.reason}"


@dataclass
class Summary:
    outcomes: list[Outcome] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)

    def count(self, status: Status) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def exit_code(self) -> int:
        return EXIT_SOME_FAILED if self.count("failed") else EXIT_OK

    def lines(self) -> list[str]:
        """The end-of-job report: counts, then every failed file with its reason."""
        head = (f"{self.count('done')} done, {self.count('skipped')} skipped (already done), "
                f"{self.count('failed')} failed")
        if self.ignored:
            head += f", {len(self.ignored)} ignored (not images)"
        return [head] + [f"  failed: {o.failure()}" for o in self.outcomes if o.status == "failed"]


@dataclass(frozen=True)
class UpscaleJob:
    """A feed-forward upscale job on files, described once for every executor (this process, or Ray workers).

    Plain values only: it is pickled to the workers, each of which builds its own :class:`ModelRunner`.

    Args:
        input, output: as :func:`plan_job` takes them.
        model: checkpoint path; None for the shipped CRL-SR x4.
        tile, overlap, memory_budget: as :func:`realsr_core.upscale` takes them.
        device: ``cpu``, ``cuda``, ``cuda:1`` ...; None: CUDA when available.
        half: float16 on a GPU, bfloat16 on a CPU.
        threads: CPU threads for the model (None: torch's default); equal thread counts give equal bytes.
        options: the model's user options (MM-RealSR ``blur`` / ``noise``) as (name, value) pairs.
        overwrite, keep_ext, max_pixels: as :func:`plan_job` and :func:`run_task` take them.
    """

    input: str
    output: str
    model: str | None = None
    tile: int | str | None = "auto"
    overlap: int = 16
    memory_budget: int | None = None
    device: str | None = None
    half: bool = False
    threads: int | None = None
    options: tuple[tuple[str, float], ...] = ()
    overwrite: bool = False
    keep_ext: bool = False
    max_pixels: int | None = imageio.DEFAULT_MAX_PIXELS

    def plan(self) -> Plan:
        return plan_job(self.input, self.output, keep_ext=self.keep_ext)


def model_options(desc: ModelDescriptor, job: UpscaleJob) -> dict[str, float]:
    """The job's options that the model takes; given ones it does not take are reported, not silently dropped."""
    given = dict(job.options)
    ignored = [f"--{k}" for k in given if k not in desc.option_names()]
    if ignored:
        warnings.warn(f"{' and '.join(ignored)} ignored: {desc.name} takes no degradation scores (MM-RealSR does)",
                      RealSRWarning, stacklevel=2)
    return {k: v for k, v in given.items() if k in desc.option_names()}


class TileProgress(Protocol):
    def __call__(self, done: int, total: int) -> None: ...

    def close(self) -> None: ...


class ModelRunner:
    """The job's model, loaded once in this process, as the ``upscale_fn`` of :func:`run_task`.

    Args:
        job: the job (model file, device, dtype, tiles, options).
        progress: ``progress(task)`` gives a per-tile progress bar for one image (closed after it), or None.

    Raises:
        RealSRError: the model file is unreadable or not a feed-forward upscaler.
    """

    def __init__(self, job: UpscaleJob, progress: Callable[[Task], TileProgress] | None = None) -> None:
        from .inference import compute_dtype, resolve_device
        from .registry import load_model
        from .weights import builtin_path

        if job.threads:
            torch.set_num_threads(job.threads)
        self.job, self.progress = job, progress
        self.device = resolve_device(job.device)
        self.desc = load_model(job.model or builtin_path(), device=self.device)
        # The runner owns its model, so it is cast once rather than copied per image.
        self.desc.to(dtype=compute_dtype(self.desc, self.device, torch.float16 if job.half else None))
        self.options = model_options(self.desc, job)

    @property
    def scale(self) -> float:
        return self.desc.scale

    def __call__(self, image: Tensor, task: Task) -> tuple[Tensor, str]:
        import json

        from .inference import upscale

        bar = self.progress(task) if self.progress is not None else None
        try:
            result = upscale(self.desc, image, tile=self.job.tile, overlap=self.job.overlap, device=self.device,
                             dtype=self.desc.dtype, progress=bar, memory_budget=self.job.memory_budget,
                             **self.options)
        finally:
            if bar is not None:
                bar.close()
        info = {k: v.flatten().tolist() for k, v in result.context[0].items() if isinstance(v, Tensor)}
        return result.image, size_note(result.image) + (f" {json.dumps(info)}" if info else "")


def size_note(image: Tensor) -> str:
    """``(WxH)`` of a result, for the per-image report."""
    return f"({image.shape[-1]}x{image.shape[-2]})"


# ---------------------------------------------------------------------------- planning


def _is_folder_target(output: str) -> bool:
    return output.partition("?")[0].endswith(("/", os.sep)) or as_path(output).is_dir()


def _keep(rel: str, name: str, ignored: list[tuple[str, str]]) -> bool:
    """Whether a file is an input image; if not, why is added to ``ignored``."""
    if PARTIAL_MARK in name:
        ignored.append((rel, "an unfinished result of an interrupted job"))
    elif PurePath(name).suffix.lower() not in imageio.IMAGE_EXT:
        ignored.append((rel, f"not an image type ({PurePath(name).suffix or 'no extension'})"))
    else:
        return True
    return False


def _walk(root: AnyPath, skip: AnyPath | None) -> tuple[list[AnyPath], list[tuple[str, str]]]:
    """Image files under ``root`` (sorted, subfolders included) and what was left out, with why."""
    files: list[AnyPath] = []
    ignored: list[tuple[str, str]] = []
    if isinstance(root, UriPath):
        for p in root.walk_files():
            rel = p.relative_to(root)
            if isinstance(skip, UriPath) and p.path.startswith(skip.path + "/"):
                continue  # the job's own output folder, inside its input folder
            if _keep(str(rel), p.name, ignored):
                files.append(p)
        return files, ignored
    for folder, dirs, names in os.walk(root, followlinks=False):
        here = Path(folder)
        keep = []
        for d in sorted(dirs):
            sub = here / d
            if skip is not None and sub.resolve() == skip:
                continue  # the job's own output folder, inside its input folder
            if sub.is_symlink():
                ignored.append((str(sub.relative_to(root)), "a link to a folder (not followed)"))
            else:
                keep.append(d)
        dirs[:] = keep
        for n in sorted(names):
            p = here / n
            if _keep(str(p.relative_to(root)), n, ignored):
                files.append(p)
    return files, ignored


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(folder: AnyPath) -> None:
    """Refuse an output folder that cannot be created or written, by trying (permission bits lie to root)."""
    if isinstance(folder, UriPath):
        folder.check_writable()
        return
    base = _nearest_existing(folder)
    if not base.is_dir():
        raise InvalidInputError(f"cannot write to {folder}: {base} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=base, prefix=".realsr-write-test-"):
            pass
    except OSError as e:
        raise InvalidInputError(f"cannot write to {folder}: {e.strerror or e} ({base}); choose another output") from e


def _output_name(rel: PurePath, keep_ext: bool) -> PurePath:
    return rel.with_name(rel.name + ".png") if keep_ext else rel.with_suffix(".png")


def plan_job(input_path: str | os.PathLike[str], output: str | os.PathLike[str], *, keep_ext: bool = False) -> Plan:
    """Map an input file or folder to output files, refusing every unsafe mapping before any work.

    Args:
        input_path: an image file, or a folder (searched with its subfolders, mirrored in the output); a local
            path or a URI (``storage.UriPath``: ``s3://bucket/photos``, ``file:///mnt/share/photos`` ...).
        output: a file (its extension picks the format), or a folder (existing, or ending with ``/``);
            a folder input always gives a folder of PNG files.
        keep_ext: name folder results ``name.jpg.png`` rather than ``name.png`` (when a folder holds
            ``name.jpg`` and ``name.png``).

    Raises:
        InvalidInputError: the input is missing or has no images; an output would be an input; the output
            folder is the input folder; two inputs map to one output; unknown output type; not writable.
    """
    src = as_path(os.fspath(input_path))
    out_str = os.fspath(output)
    out = as_path(out_str)
    if src.is_dir():
        if out.exists() and not out.is_dir():
            raise InvalidInputError(f"input {src} is a folder, so the output must be a folder; {out} is a file")
        root = out.resolve()
        if root == src.resolve():
            raise InvalidInputError(
                f"the output folder {out} is the input folder: results would replace or mix with the originals "
                f"(and be taken as inputs by the next run); choose another folder, e.g. {out / 'x4'}")
        files, ignored = _walk(src, root)
        if not files:
            raise InvalidInputError(f"no images ({', '.join(imageio.IMAGE_EXT)}) in {src} or its subfolders")
        tasks = [Task(f, out / _output_name(f.relative_to(src), keep_ext), str(f.relative_to(src))) for f in files]
    elif src.is_file():
        ignored = []
        dst = out / (src.stem + ".png") if _is_folder_target(out_str) else out
        imageio.check_output_path(dst)
        tasks = [Task(src, dst, src.name)]
    elif src.exists():
        raise InvalidInputError(f"input {src} is neither a file nor a folder")
    else:
        raise InvalidInputError(f"input not found: {src}")

    inputs = {t.src.resolve(): t.src for t in tasks}
    seen: dict[Path, Task] = {}
    for t in tasks:
        key = t.dst.resolve()
        if key in inputs:
            raise InvalidInputError(
                f"the output {t.dst} is the input file {inputs[key]} itself; refusing to replace an input, even "
                "with --overwrite: choose another output")
        if key in seen:
            raise InvalidInputError(
                f"{seen[key].src} and {t.src} would both be written to {t.dst}; rename one, or pass --keep-ext "
                "to name results after the whole file name (name.jpg.png)")
        seen[key] = t
    output_root = out if src.is_dir() else tasks[0].dst.parent
    check_writable(output_root)
    return Plan(tasks, output_root, ignored)


# ---------------------------------------------------------------------------- running


def _check_no_links(root: AnyPath, dst: AnyPath) -> None:
    """Refuse a result path whose file or folders below the output root are symbolic links (the root
    itself is the user's choice and may be one).  URIs name no links."""
    if isinstance(dst, UriPath) or isinstance(root, UriPath):
        return
    p = dst
    while p != root and len(p.parts) > len(root.parts):
        if p.is_symlink():
            raise InvalidInputError(f"{p} is a symbolic link (to {os.readlink(p)}); it is not followed out of "
                                    "the output folder nor replaced")
        p = p.parent


UpscaleFn = Callable[[Tensor, Task], tuple[Tensor, str]]


def run_task(task: Task, upscale_fn: UpscaleFn, *, root: AnyPath, scale: float, overwrite: bool,
             max_pixels: int | None) -> Outcome:
    """Do one image: skip a finished result, refuse a foreign file, else read, upscale and write atomically.

    ``upscale_fn(image, task)`` returns the result (1, C, sH, sW) and a note for the report (e.g. the
    scores used).  Errors of this file become a ``failed`` outcome; KeyboardInterrupt propagates.
    """
    try:
        _check_no_links(root, task.dst)
        if task.dst.exists() and not overwrite:
            size = imageio.image_size(task.src)
            expected = (round(size[0] * scale), round(size[1] * scale)) if size else None
            if expected is not None and imageio.is_complete_image(task.dst, expected):
                return Outcome(task, "skipped", "already done")
            what = f"a {expected[0]}x{expected[1]} image" if expected else "a readable image"
            return Outcome(task, "failed", f"{task.dst} exists and is not a finished result of this job ({what}); "
                                           "pass --overwrite to replace it")
        image = imageio.load_image(task.src, max_pixels=max_pixels)
        result, note = upscale_fn(image, task)
        task.dst.parent.mkdir(parents=True, exist_ok=True)
        _check_no_links(root, task.dst)  # a link may have appeared while the model ran
        imageio.save_image(result, task.dst, overwrite=True)
    except (RealSRError, OSError) as e:
        return Outcome(task, "failed", str(e))
    except RuntimeError as e:  # e.g. out of memory at the smallest tile: this file fails, the job goes on
        return Outcome(task, "failed", f"{type(e).__name__}: {e}")
    return Outcome(task, "done", note)


def remove_partials(plan: Plan) -> int:
    """Delete the hidden temporary files that killed writers left beside this job's outputs; returns how many.

    A write is atomic (``files.atomic_write``), but a process killed outright (SIGKILL, a lost machine)
    cannot remove its temporary ``.NAME.realsr-partial-XXXX`` file.  Only such files named after one of
    this job's results are removed; nothing else in the output folders is touched.
    """
    names: defaultdict[AnyPath, set[str]] = defaultdict(set)
    for t in plan.tasks:
        names[t.dst.parent].add(t.dst.name)
    removed = 0
    for folder, wanted in names.items():
        if not folder.is_dir() or folder.is_symlink():
            continue
        for entry in folder.iterdir():
            base = entry.name[1:].partition(PARTIAL_MARK)
            if entry.name.startswith(".") and base[1] and base[0] in wanted and not entry.is_symlink() \
                    and entry.is_file():
                entry.unlink(missing_ok=True)
                removed += 1
    return removed


def run_job(plan: Plan, upscale_fn: UpscaleFn, *, scale: float, overwrite: bool = False,
            max_pixels: int | None = imageio.DEFAULT_MAX_PIXELS,
            report: Callable[[Outcome], None] | None = None) -> Summary:
    """Run every task of a plan in order on this machine; ``report`` sees each outcome as it happens."""
    remove_partials(plan)
    summary = Summary(ignored=list(plan.ignored))
    for task in plan.tasks:
        outcome = run_task(task, upscale_fn, root=plan.output_root, scale=scale, overwrite=overwrite,
                           max_pixels=max_pixels)
        summary.outcomes.append(outcome)
        if report is not None:
            report(outcome)
    return summary


def describe_ignored(ignored: Iterable[tuple[str, str]]) -> list[str]:
    return [f"  ignored: {rel}: {why}" for rel, why in ignored]
