"""Command line: ``python -m realsr_core upscale INPUT -o OUTPUT [--model CHECKPOINT]``.

INPUT is an image file or a folder of images; OUTPUT is then a file or a folder.  An existing
output is never overwritten unless ``--overwrite`` is given.  Without ``--model`` the shipped CRL-SR x4
model (``realsr_core/weights``) runs.

``python -m realsr_core train CONFIG.toml [--out DIR] [--resume] [--steps N] [--device cuda]`` trains a
model (see ``realsr_core/training/trainer.py``); an existing run is continued only with ``--resume``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import TextIO

import torch
from PIL import Image

from . import imageio, jobs
from .descriptor import ModelDescriptor
from .errors import RealSRError, RealSRWarning
from .inference import compute_dtype, resolve_device, upscale
from .registry import load_model
from .weights import builtin_path


class ProgressBar:
    """A one-line text progress bar on stderr (no dependency)."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label, self.stream, self.start = label, stream or sys.stderr, time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        width = 30
        filled = int(width * done / max(total, 1))
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} tiles {elapsed:.1f}s")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def _parse_score(value: str) -> float | None:
    if value.lower() == "auto":
        return None
    try:
        v = float(value)
    except ValueError:
        v = math.nan
    if not 0.0 <= v <= 1.0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number in [0, 1], got {value!r}")
    return v


def _tile(value: str) -> int | str | None:
    if value.lower() in ("auto", "none", "0"):
        return "auto" if value.lower() == "auto" else None
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected 'auto', 0 (no tiles) or a size in pixels, got {value!r}")
    return int(value)


def _non_negative(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value!r}")
    return int(value)


def _bytes(value: str) -> int:
    """'1G', '512M', '2.5GiB' or a number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", value, re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 512M or 2G, got {value!r}")
    return int(float(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper()))


class _Interrupted(Exception):
    """SIGTERM, turned into the same clean stop as Ctrl-C."""


def _warn_line(message: Warning | str, *_args: object, **_kwargs: object) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _model_options(desc: ModelDescriptor, args: argparse.Namespace) -> dict[str, float]:
    """The degradation scores the model takes; given ones it does not take are reported, not silently dropped."""
    given = {k: getattr(args, k) for k in ("blur", "noise") if getattr(args, k) is not None}
    ignored = [f"--{k}" for k in given if k not in desc.option_names()]
    if ignored:
        warnings.warn(f"{' and '.join(ignored)} ignored: {desc.name} takes no degradation scores (MM-RealSR does)",
                      RealSRWarning, stacklevel=2)
    return {k: v for k, v in given.items() if k in desc.option_names()}


def _report(outcome: jobs.Outcome, shape: dict[str, str]) -> None:
    t = outcome.task
    if outcome.status == "done":
        print(f"{t.src} -> {t.dst} ({shape.get(t.rel, '')}){' ' + outcome.reason if outcome.reason else ''}",
              file=sys.stderr)
    elif outcome.status == "skipped":
        print(f"{t.src}: skipped, {t.dst} is already done (--overwrite redoes it)", file=sys.stderr)
    else:
        print(f"failed: {outcome.failure()}", file=sys.stderr)


def cmd_upscale(args: argparse.Namespace) -> int:
    # Every refusal that needs no model comes first: nothing is loaded or run for a job that cannot finish.
    plan = jobs.plan_job(args.input, args.output, keep_ext=args.keep_ext)
    device = resolve_device(args.device)
    desc = load_model(args.model or builtin_path(), device=device)
    # The command line owns its model, so it is cast once rather than copied per image.
    desc.to(dtype=compute_dtype(desc, device, torch.float16 if args.half else None))
    options = _model_options(desc, args)
    print(f"{desc.name}: {desc.num_params / 1e6:.1f}M parameters on {device} ({str(desc.dtype)[6:]})", file=sys.stderr)
    for line in jobs.describe_ignored(plan.ignored):
        print(line, file=sys.stderr)
    shapes: dict[str, str] = {}

    def run(image: torch.Tensor, task: jobs.Task) -> tuple[torch.Tensor, str]:
        bar = ProgressBar(task.rel)
        try:
            result = upscale(desc, image, tile=args.tile, overlap=args.overlap, device=device, dtype=desc.dtype,
                             progress=bar, memory_budget=args.memory_budget, **options)
        finally:
            bar.close()
        shapes[task.rel] = f"{result.image.shape[-1]}x{result.image.shape[-2]}"
        info = {k: v.flatten().tolist() for k, v in result.context[0].items() if isinstance(v, torch.Tensor)}
        return result.image, json.dumps(info) if info else ""

    outcomes: list[jobs.Outcome] = []

    def report(outcome: jobs.Outcome) -> None:
        outcomes.append(outcome)
        _report(outcome, shapes)

    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # --max-pixels (load_image) is the one limit in this process
    try:
        summary = jobs.run_job(plan, run, scale=desc.scale, overwrite=args.overwrite,
                               max_pixels=args.max_pixels or None, report=report)
    except (KeyboardInterrupt, _Interrupted):
        done = sum(o.status != "failed" for o in outcomes)
        print(f"interrupted: {done} of {len(plan.tasks)} images finished and kept, no partial file written; "
              "run the same command again to do the rest", file=sys.stderr)
        return jobs.EXIT_INTERRUPTED
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    if len(plan.tasks) > 1 or summary.exit_code:
        for line in summary.lines():
            print(line, file=sys.stderr)
    return summary.exit_code


def cmd_info(args: argparse.Namespace) -> int:
    desc = load_model(args.model)
    print(json.dumps(desc.describe(), indent=1))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write only what inference loads (e.g. a trained CRL-SR without E_h, the MLP heads, E_f, D_rec)."""
    from .training.trainer import read_metadata, save_weights

    dst = Path(args.output)
    if dst.exists() and not args.overwrite:
        raise RealSRError(f"refusing to overwrite {dst}; pass --overwrite")
    desc = load_model(args.model)
    meta = read_metadata(args.model) if str(args.model).endswith(".safetensors") else {}
    meta["arch"] = desc.arch
    save_weights(dst, desc.model.state_dict(), meta)
    print(f"{dst}: {desc.name}, {desc.num_params / 1e6:.2f}M parameters, {dst.stat().st_size / 2**20:.1f} MiB "
          f"(left out {len(desc.ignored_keys)} training-only tensors)", file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .training.trainer import train  # lazy: the trainer pulls in the data and degradation modules

    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    result = train(args.config, out, resume=args.resume, steps=args.steps, device=args.device,
                   max_minutes=args.minutes)
    evals = " ".join(f"{k} {v:.2f}" for k, v in result.last_eval.items() if k.startswith("psnr"))
    print(f"{result.model_path} at step {result.step} ({result.stopped}){' ' + evals if evals else ''}", file=sys.stderr)
    return 130 if result.stopped == "interrupted" else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m realsr_core", description="Real-world super-resolution.")
    sub = p.add_subparsers(dest="command", required=True)
    u = sub.add_parser("upscale", help="upscale an image file or a folder of images (with its subfolders)",
                       epilog="Exit status: 0 all done, 2 refused before any work, 3 some files failed (listed), "
                              "130 interrupted (run the same command again to continue).")
    u.add_argument("input", help="image file or folder (subfolders are mirrored in the output)")
    u.add_argument("-o", "--output", required=True,
                   help="output file (.png, .jpg, .webp, .bmp, .tif), or a folder (existing or ending with /); "
                        "a folder input always gives a folder of PNG files")
    u.add_argument("--model", default=None,
                   help="checkpoint file (.safetensors, .pth, .ckpt, ...); default: the shipped CRL-SR x4 model")
    u.add_argument("--tile", type=_tile, default="auto",
                   help="input tile size in pixels (at least 32), 'auto' (default: the largest that fits the memory "
                        "budget) or 0 for none")
    u.add_argument("--overlap", type=_non_negative, default=16, help="blend width between tiles, input pixels (default 16)")
    u.add_argument("--memory-budget", type=_bytes, default=None, metavar="SIZE",
                   help="memory 'auto' tiles may use, e.g. 2G (default: 1G on a CPU, 80%% of free memory on a GPU)")
    u.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    u.add_argument("--half", action="store_true", help="half precision (float16 on GPU, bfloat16 on CPU)")
    u.add_argument("--blur", type=_parse_score, default=None, help="MM-RealSR blur score in [0, 1] or 'auto'")
    u.add_argument("--noise", type=_parse_score, default=None, help="MM-RealSR noise score in [0, 1] or 'auto'")
    u.add_argument("--overwrite", action="store_true",
                   help="redo finished results and replace existing files (never an input file)")
    u.add_argument("--keep-ext", action="store_true",
                   help="name folder results name.jpg.png, for folders holding name.jpg and name.png")
    u.add_argument("--max-pixels", type=_non_negative, default=imageio.DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"refuse larger inputs, a guard against decompression bombs (default {imageio.DEFAULT_MAX_PIXELS}, "
                        "0 for no limit)")
    u.set_defaults(func=cmd_upscale)
    i = sub.add_parser("info", help="describe a checkpoint")
    i.add_argument("model")
    i.set_defaults(func=cmd_info)
    e = sub.add_parser("export", help="write a checkpoint's inference weights only (safetensors)")
    e.add_argument("model")
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=cmd_export)
    t = sub.add_parser("train", help="train a model from a TOML config (resumable)")
    t.add_argument("config", help="config file, or the name of a shipped one (e.g. crlsr_x4)")
    t.add_argument("--out", default=None, help="run folder (default: runs/<config name>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its state.pt")
    t.add_argument("--steps", type=int, default=None, help="total steps, overriding train.steps")
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    t.add_argument("--minutes", type=float, default=None, help="stop (and save) after this many minutes")
    t.set_defaults(func=cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run a command; returns the exit status (see ``jobs.EXIT_*``).  Errors are one line, never a traceback."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse printed the usage error (or --help); a caller gets the status back
        return int(e.code or 0)
    with warnings.catch_warnings():
        warnings.simplefilter("always", RealSRWarning)
        warnings.showwarning = _warn_line
        try:
            return args.func(args)
        except RealSRError as e:
            print(f"error: {e}", file=sys.stderr)
            return jobs.EXIT_REFUSED
        except (KeyboardInterrupt, _Interrupted):
            print("\ninterrupted", file=sys.stderr)
            return jobs.EXIT_INTERRUPTED


def _on_sigterm(_signum: int, _frame: object) -> None:
    raise _Interrupted


def entry() -> None:
    """The console script: SIGTERM stops as cleanly as Ctrl-C (no partial file, one line)."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    sys.exit(main())


if __name__ == "__main__":
    entry()
