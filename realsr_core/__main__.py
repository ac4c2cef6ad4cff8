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
import sys
import time
from pathlib import Path
from typing import TextIO

import torch

from . import imageio
from .errors import RealSRError
from .inference import upscale
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
        return float(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number in [0, 1], got {value!r}") from e


def _tile(value: str) -> int | str | None:
    if value.lower() in ("auto", "none", "0"):
        return "auto" if value.lower() == "auto" else None
    return int(value)


def _pairs(src: Path, dst: Path) -> list[tuple[Path, Path]]:
    if src.is_dir():
        if dst.exists() and not dst.is_dir():
            raise RealSRError(f"input {src} is a folder, so the output must be a folder; {dst} is a file")
        files = imageio.list_images(src)
        if not files:
            raise RealSRError(f"no images ({', '.join(imageio.IMAGE_EXT)}) in {src}")
        return [(f, dst / (f.stem + ".png")) for f in files]
    if not src.is_file():
        raise RealSRError(f"input not found: {src}")
    if dst.is_dir():
        return [(src, dst / (src.stem + ".png"))]
    return [(src, dst)]


def cmd_upscale(args: argparse.Namespace) -> int:
    pairs = _pairs(Path(args.input), Path(args.output))
    existing = [str(d) for _, d in pairs if d.exists()]
    if existing and not args.overwrite:
        raise RealSRError(f"refusing to overwrite {len(existing)} existing file(s), e.g. {existing[0]}; pass --overwrite")
    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    desc = load_model(args.model or builtin_path(), device=device)
    print(f"{desc.name}: {desc.num_params / 1e6:.1f}M parameters on {device}", file=sys.stderr)
    options = {}
    if desc.arch == "mmrealsr":
        options = {"blur": args.blur, "noise": args.noise}
    dtype = torch.float16 if args.half else None
    for src, dst in pairs:
        image = imageio.load_image(src)
        bar = ProgressBar(src.name)
        try:
            result = upscale(desc, image, tile=args.tile, overlap=args.overlap, device=device, dtype=dtype,
                             progress=bar, **options)
        finally:
            bar.close()
        dst.parent.mkdir(parents=True, exist_ok=True)
        imageio.save_image(result.image, dst)
        info = {k: v.flatten().tolist() for k, v in result.context[0].items() if isinstance(v, torch.Tensor)}
        extra = f" {json.dumps(info)}" if info else ""
        print(f"{src} -> {dst} ({result.image.shape[-1]}x{result.image.shape[-2]}){extra}", file=sys.stderr)
    return 0


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
    u = sub.add_parser("upscale", help="upscale an image file or a folder of images")
    u.add_argument("input", help="image file or folder")
    u.add_argument("-o", "--output", required=True, help="output file, or folder when INPUT is a folder")
    u.add_argument("--model", default=None,
                   help="checkpoint file (.safetensors, .pth, .ckpt, ...); default: the shipped CRL-SR x4 model")
    u.add_argument("--tile", type=_tile, default="auto", help="input tile size in pixels, 'auto' (default) or 0 for none")
    u.add_argument("--overlap", type=int, default=16, help="blend width between tiles, input pixels (default 16)")
    u.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    u.add_argument("--half", action="store_true", help="half precision (float16 on GPU, bfloat16 on CPU)")
    u.add_argument("--blur", type=_parse_score, default=None, help="MM-RealSR blur score in [0, 1] or 'auto'")
    u.add_argument("--noise", type=_parse_score, default=None, help="MM-RealSR noise score in [0, 1] or 'auto'")
    u.add_argument("--overwrite", action="store_true", help="replace existing output files")
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
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RealSRError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
