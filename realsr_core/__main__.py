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
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import torch
from PIL import Image

from . import imageio, jobs
from .catalog import missing_file_message
from .errors import CheckpointError, RealSRError, RealSRWarning
from .inference import resolve_device
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


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}")
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


def _report(outcome: jobs.Outcome) -> None:
    t = outcome.task
    if outcome.status == "done":
        print(f"{t.src} -> {t.dst} {outcome.reason}", file=sys.stderr)
    elif outcome.status == "skipped":
        print(f"{t.src}: skipped, {t.dst} is already done (--overwrite redoes it)", file=sys.stderr)
    else:
        print(f"failed: {outcome.failure()}", file=sys.stderr)


def _require_files(*paths: str | None) -> None:
    """Refuse a missing checkpoint before anything loads: the message says where the official file is published."""
    for path in paths:
        if path is not None and not Path(path).exists():
            raise CheckpointError(missing_file_message(Path(path).name, "cli", [path]))


def cmd_upscale(args: argparse.Namespace) -> int:
    # Every refusal that needs no model comes first: nothing is loaded or run for a job that cannot finish.
    job = jobs.UpscaleJob(
        input=args.input, output=args.output, model=args.model, tile=args.tile, overlap=args.overlap,
        memory_budget=args.memory_budget, device=args.device, half=args.half, threads=args.threads,
        options=tuple((k, getattr(args, k)) for k in ("blur", "noise") if getattr(args, k) is not None),
        overwrite=args.overwrite, keep_ext=args.keep_ext, max_pixels=args.max_pixels or None)
    plan = job.plan()
    _require_files(args.model)
    if args.ray is not None:
        return _run_on_ray(job, plan, args)
    runner = jobs.ModelRunner(job, progress=lambda task: ProgressBar(task.rel))
    desc = runner.desc
    print(f"{desc.name}: {desc.num_params / 1e6:.1f}M parameters on {runner.device} ({str(desc.dtype)[6:]})",
          file=sys.stderr)
    return _run_local(plan, runner, desc.scale, args)


def _run_on_ray(job: jobs.UpscaleJob, plan: jobs.Plan, args: argparse.Namespace) -> int:
    """The same job on Ray Data: the model is checked here (refusals before the cluster starts), run by the workers."""
    from .ray_executor import run_on_ray

    desc = load_model(args.model or builtin_path())  # refuses a bad file here, not in every worker
    jobs.model_options(desc, job)  # and warns here about scores the model ignores
    print(f"{desc.name}: {desc.num_params / 1e6:.1f}M parameters, {len(plan.tasks)} images on Ray ({args.ray})",
          file=sys.stderr)
    return _run_files(plan, args, lambda report: run_on_ray(
        job, plan, scale=desc.scale, address=args.ray, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
        batch_size=args.batch_size, report=report, describe=lambda line: print(line, file=sys.stderr)),
        numbered=True)


def _run_local(plan: jobs.Plan, upscale_fn: jobs.UpscaleFn, scale: float, args: argparse.Namespace) -> int:
    """Run a planned file job in this process (``--max-pixels`` is then the one image-size limit here)."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        return _run_files(plan, args, lambda report: jobs.run_job(
            plan, upscale_fn, scale=scale, overwrite=args.overwrite, max_pixels=args.max_pixels or None,
            report=report))
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _run_files(plan: jobs.Plan, args: argparse.Namespace, execute: Callable[[Callable[[jobs.Outcome], None]],
               jobs.Summary], *, numbered: bool = False) -> int:
    """A planned file job with the command line's reporting, Ctrl-C handling and exit status; ``execute(report)``
    runs it (here or on Ray).  ``numbered``: prefix each outcome with ``[k/N]`` (outcomes arrive in any order)."""
    for line in jobs.describe_ignored(plan.ignored):
        print(line, file=sys.stderr)
    outcomes: list[jobs.Outcome] = []

    def report(outcome: jobs.Outcome) -> None:
        outcomes.append(outcome)
        if numbered:
            print(f"[{len(outcomes)}/{len(plan.tasks)}] ", end="", file=sys.stderr)
        _report(outcome)

    try:
        summary = execute(report)
    except (KeyboardInterrupt, _Interrupted):
        done = sum(o.status != "failed" for o in outcomes)
        print(f"interrupted: {done} of {len(plan.tasks)} images finished and kept, no partial file written; "
              "run the same command again to do the rest", file=sys.stderr)
        return jobs.EXIT_INTERRUPTED
    if len(plan.tasks) > 1 or summary.exit_code:
        for line in summary.lines():
            print(line, file=sys.stderr)
    return summary.exit_code


def cmd_stablesr(args: argparse.Namespace) -> int:
    """StableSR on the core's own UNet, VAE and text tower read from the user's SD 2.1 file."""
    from .diffusion.engine import CoreSampler, CoreVAE, StableSROptions, run_stablesr
    from .models.stablesr.sd import check_module_fits, load_sd, unet_channels

    options = StableSROptions(upscale=args.upscale, steps=args.steps, seed=args.seed, start=args.start,
                              tile_size=args.tile, tile_overlap=args.tile_overlap, color_fix=args.color_fix,
                              color_fix_strength=args.color_fix_strength, cfw_weight=args.cfw_weight,
                              tiled_vae=args.tiled_vae)
    options.check()
    plan = jobs.plan_job(args.input, args.output, keep_ext=args.keep_ext)
    _require_files(args.sd, args.module, args.cfw)  # before the first multi-GB read
    device = resolve_device(args.device)
    dtype = (torch.float16 if device.type == "cuda" else torch.bfloat16) if args.half else torch.float32
    module = load_model(args.module)
    if module.arch != "stablesr":
        raise RealSRError(f"--module {args.module}: a {module.name}, not a StableSR module (stablesr_000117.ckpt, "
                          "webui_768v_139.ckpt, stablesr_turbo.ckpt)")
    cfw = load_model(args.cfw) if args.cfw else None
    if cfw is not None and cfw.arch != "stablesr_cfw":
        raise RealSRError(f"--cfw {args.cfw}: a {cfw.name}, not StableSR's CFW VAE (vqgan_cfw_00011.ckpt)")
    sd = load_sd(args.sd, device=device, dtype=dtype)
    check_module_fits(module.model, unet_channels(sd.unet))
    module.to(device, dtype)
    if cfw is not None:
        cfw.to(device, dtype)
    context = sd.context(args.prompt, device).to(dtype)
    print(f"{sd.source}: SD 2.x {sd.prediction}-prediction, {module.name}"
          f"{', ' + cfw.name if cfw else ''} on {device} ({str(dtype)[6:]})", file=sys.stderr)

    def run(image: torch.Tensor, task: jobs.Task) -> tuple[torch.Tensor, str]:
        bar = ProgressBar(f"{task.rel} ({options.steps} steps)")
        sampler = CoreSampler(sd.unet, module.model.encoder, module.model.sft_layers, context,
                              prediction=sd.prediction, steps=options.steps, seed=options.seed, start=options.start,
                              sampler=args.sampler, device=device, dtype=dtype, progress=bar)
        try:
            with torch.no_grad():
                out, _ = run_stablesr(image, vae=CoreVAE(sd.vae, cfw), sample=sampler, prediction=sd.prediction,
                                      options=options)
        finally:
            bar.close()
        if image.shape[1] in (2, 4):  # alpha: resized beside the result, as the feed-forward models do
            alpha = torch.nn.functional.interpolate(image[:, -1:], size=out.shape[-2:], mode="bicubic")
            out = torch.cat([out if image.shape[1] == 4 else out.mean(1, keepdim=True), alpha.clamp(0, 1)], 1)
        elif image.shape[1] == 1:
            out = out.mean(1, keepdim=True)
        return out, f"{jobs.size_note(out)} seed {options.seed}"

    return _run_local(plan, run, options.upscale, args)


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .errors import UnsupportedModelError
    from .models.stablesr.sd import load_sd, sd_kind

    try:
        described = load_model(args.model).describe()
    except UnsupportedModelError:
        # A Stable Diffusion checkpoint is no model of the registry, but StableSR runs on SD 2.x files.
        if sd_kind(load_checkpoint(args.model, prefer="state_dict").state_dict) != "SD 2.x":
            raise
        described = load_sd(args.model).describe()
    print(json.dumps(described, indent=1, default=str))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """The official model files: name, method, size, folder in each host, download link."""
    from . import catalog

    if args.json:
        print(json.dumps([m.to_dict() for m in catalog.CATALOG], indent=1))
    elif args.markdown:
        print(catalog.markdown_table())
    else:
        print(catalog.text_table())
        print("\nFolders are relative to the ComfyUI or webui folder; ComfyUI also searches models/upscale_models/ and "
              "any realsr: entry of extra_model_paths.yaml. Keep the official file names.")
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


def cmd_convert(args: argparse.Namespace) -> int:
    """An ncnn (or any ESRGAN / Real-ESRGAN) file -> safetensors with the released key names (spandrel reads it)."""
    from .training.trainer import save_weights

    src, dst = Path(args.model), Path(args.output)
    if dst.suffix.lower() != ".safetensors":
        raise RealSRError(f"-o {dst}: convert writes a .safetensors file")
    if dst.exists() and not args.overwrite:
        raise RealSRError(f"refusing to overwrite {dst}; pass --overwrite")
    desc = load_model(src)
    if desc.arch not in ("esrgan", "compact"):
        raise RealSRError(f"{src.name} is a {desc.name}: convert writes ESRGAN / Real-ESRGAN models (RRDBNet, the compact "
                          "net); `export` writes this pack's models")
    net = getattr(desc.model, "net", desc.model)  # an output resize (animevideov3-x2/x3) is not part of the file
    save_weights(dst, net.state_dict(), {"arch": desc.arch, "source": src.name})
    print(f"{dst}: {desc.name}, {desc.num_params / 1e6:.2f}M parameters, {dst.stat().st_size / 2**20:.1f} MiB", file=sys.stderr)
    if net is not desc.model:
        print(f"note: {src.name} resizes the x{net.scale} network's output by {desc.config['output_scale']:g} (bicubic); "
              f"the file holds the x{net.scale} network, as spandrel and ComfyUI run it", file=sys.stderr)
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
    u.add_argument("input", help="image file or folder (subfolders are mirrored in the output); a path or a URI that "
                                 "pyarrow reads (s3://bucket/photos, file:///mnt/share/photos; see the README)")
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
    u.add_argument("--threads", type=_positive, default=None,
                   help="CPU threads for the model (default: torch's choice; on Ray: --cpus-per-worker)")
    u.add_argument("--blur", type=_parse_score, default=None, help="MM-RealSR blur score in [0, 1] or 'auto'")
    u.add_argument("--noise", type=_parse_score, default=None, help="MM-RealSR noise score in [0, 1] or 'auto'")
    u.add_argument("--overwrite", action="store_true",
                   help="redo finished results and replace existing files (never an input file)")
    u.add_argument("--keep-ext", action="store_true",
                   help="name folder results name.jpg.png, for folders holding name.jpg and name.png")
    u.add_argument("--max-pixels", type=_non_negative, default=imageio.DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"refuse larger inputs, a guard against decompression bombs (default {imageio.DEFAULT_MAX_PIXELS}, "
                        "0 for no limit)")
    r = u.add_argument_group("many machines (pip install ray[data]; see the README)")
    r.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run on Ray: 'auto' (the cluster this machine belongs to, else a new local one) or a "
                        "cluster address (HOST:6379, ray://HOST:10001)")
    r.add_argument("--workers", type=_positive, default=None,
                   help="model-holding workers (default: one per GPU, else one per --cpus-per-worker CPUs)")
    r.add_argument("--cpus-per-worker", type=_positive, default=1, help="CPU threads of each worker (default 1)")
    r.add_argument("--batch-size", type=_positive, default=4, help="images per request to a worker (default 4)")
    u.set_defaults(func=cmd_upscale)
    st = sub.add_parser("stablesr", help="StableSR on your SD 2.1 checkpoint: an image file or a folder",
                        epilog="Exit status as for upscale.  Files are read as released: SD 2.1 512 / 768-v "
                               "(.safetensors or .ckpt; v-prediction is read from the weights), the StableSR module "
                               "(the whole Lightning .ckpt), the CFW VAE (vqgan_cfw_00011.ckpt).")
    st.add_argument("input", help="image file or folder (subfolders are mirrored in the output)")
    st.add_argument("-o", "--output", required=True, help="output file, or a folder (existing or ending with /)")
    st.add_argument("--sd", required=True, help="SD 2.1 checkpoint: v2-1_512-ema-pruned.safetensors (or the 768-v file)")
    st.add_argument("--module", required=True, help="StableSR module: stablesr_000117.ckpt, webui_768v_139.ckpt, "
                                                    "stablesr_turbo.ckpt")
    st.add_argument("--cfw", default=None, help="CFW VAE (vqgan_cfw_00011.ckpt) for a decoder that keeps the input's detail")
    st.add_argument("--cfw-weight", type=float, default=0.5, help="CFW fidelity weight in [0, 1] (default 0.5)")
    st.add_argument("--upscale", type=float, default=4.0, help="output size / input size (default 4)")
    st.add_argument("--steps", type=int, default=200, help="sampling steps (200 official, 4 for turbo)")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm", help="official respaced DDPM, or DDIM")
    st.add_argument("--start", choices=["lr_latent", "noise"], default="lr_latent",
                    help="x_T from the LR latent (official) or from pure noise")
    st.add_argument("--tile", type=_non_negative, default=0, help="latent tile size (0: official 64, 96 for 768-v)")
    st.add_argument("--tile-overlap", type=_non_negative, default=0, help="latent tile overlap (0: official 32 / 48)")
    st.add_argument("--color-fix", choices=["wavelet", "adain", "none"], default="wavelet")
    st.add_argument("--color-fix-strength", type=float, default=1.0, help="in [0, 1] (default 1)")
    st.add_argument("--tiled-vae", choices=["auto", "on", "off"], default="auto",
                    help="VAE window by window with shared GroupNorm statistics (auto: above 2 megapixels)")
    st.add_argument("--prompt", default="", help="text prompt (default: the official empty prompt; others need "
                                                 "pip install open-clip-torch)")
    st.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    st.add_argument("--half", action="store_true", help="half precision (float16 on GPU, bfloat16 on CPU)")
    st.add_argument("--overwrite", action="store_true", help="redo finished results (never an input file)")
    st.add_argument("--keep-ext", action="store_true", help="name folder results name.jpg.png")
    st.add_argument("--max-pixels", type=_non_negative, default=imageio.DEFAULT_MAX_PIXELS, metavar="N",
                    help="refuse larger inputs (0: no limit)")
    st.set_defaults(func=cmd_stablesr)
    i = sub.add_parser("info", help="describe a checkpoint (an upscaler, a StableSR module or VAE, an SD 2.x file)")
    i.add_argument("model")
    i.set_defaults(func=cmd_info)
    ms = sub.add_parser("models", help="list the official model files: size, folder in ComfyUI and in "
                                       "Forge / AUTOMATIC1111, download link")
    fmt = ms.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the list as JSON")
    fmt.add_argument("--markdown", action="store_true", help="print the README's table (Markdown)")
    ms.set_defaults(func=cmd_models)
    e = sub.add_parser("export", help="write a checkpoint's inference weights only (safetensors)")
    e.add_argument("model")
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=cmd_export)
    c = sub.add_parser("convert", help="write an ncnn model (x.param + x.bin) or another ESRGAN / Real-ESRGAN file as "
                                       "safetensors with the released key names (spandrel and ComfyUI read it)")
    c.add_argument("model")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=cmd_convert)
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
