"""The one module of the webui extension that talks to stable-diffusion-webui (Forge and AUTOMATIC1111).

Model folder, settings, device and dtype, and the job state turned into the core's progress and cancel
callbacks.  Imported only inside the webui (from the files under ``scripts/``); the core never imports it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from modules import devices, shared
from PIL import Image

from realsr_core.catalog import missing_file_message
from realsr_core.checkpoint import load_checkpoint
from realsr_core.errors import Cancelled
from realsr_core.registry import detect

log = logging.getLogger("realsr")

FOLDER = "RealSR"  # models/RealSR, as the webui names its model folders (models/ESRGAN, models/SwinIR)
EXTENSIONS = (".safetensors", ".pth", ".pt", ".ckpt", ".bin", ".param")  # .param: an ncnn graph, its .bin beside it

# Settings (Settings > Upscaling > RealSR; also /sdapi/v1/options).  Registered when the scripts load, not in
# an on_ui_settings callback, because an API-only webui (--nowebui) never runs those callbacks.
TILE = "realsr_tile"
OVERLAP = "realsr_tile_overlap"
SETTINGS = {
    TILE: (0, "RealSR upscalers: tile size in input pixels (0 = largest that fits the memory budget)",
           {"minimum": 0, "maximum": 2048, "step": 16}),
    OVERLAP: (16, "RealSR upscalers: tile overlap in input pixels (feathered)", {"minimum": 0, "maximum": 256, "step": 4}),
}


def register_settings() -> None:
    import gradio as gr

    section = ("upscaling", "Upscaling")
    for key, (default, label, slider) in SETTINGS.items():
        shared.opts.add_option(key, shared.OptionInfo(default, label, gr.Slider, slider, section=section))


def setting(key: str) -> int:
    return int(shared.opts.data.get(key, SETTINGS[key][0]))


def model_dirs() -> list[Path]:
    """``--realsr-models-path`` when given, else ``models/RealSR`` (created, as the webui does for its folders)."""
    given = getattr(shared.cmd_opts, "realsr_models_path", None)
    path = Path(given) if given else Path(shared.models_path) / FOLDER
    if not given:
        path.mkdir(parents=True, exist_ok=True)
    return [path]


def model_files() -> list[Path]:
    """Checkpoint files in the RealSR model folder (sub-folders included), sorted by name."""
    out: list[Path] = []
    for d in model_dirs():
        if d.is_dir():
            out += [p for p in d.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file()
                    and not (p.suffix.lower() == ".bin" and p.with_suffix(".param").exists())]  # an ncnn model's weights
    return sorted(out, key=lambda p: p.name.lower())


def files_of(*arch_ids: str) -> list[Path]:
    """The files of the RealSR folder whose architecture is one of ``arch_ids`` ("crlsr", "stablesr", ...).

    Only keys are looked at (pickles are memory-mapped), so listing stays fast; a file that cannot be read
    is logged and left out rather than failing the webui's start.
    """
    out = []
    for p in model_files():
        try:
            arch = detect(load_checkpoint(p).state_dict)
        except Exception as e:  # noqa: BLE001 - an unreadable file must not stop the others
            log.warning("RealSR: %s skipped: %s", p.name, e)
            continue
        if arch is not None and arch.id in arch_ids:
            out.append(p)
    return out


def find_model_file(name: str) -> Path:
    """The path of ``name`` in the RealSR folder; a missing file gets the folder and the download link."""
    for d in model_dirs():
        p = d / name
        if p.is_file():
            return p
    raise FileNotFoundError(missing_file_message(name, "webui", [str(d) for d in model_dirs()]))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """A PIL image -> (1, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def to_image(x: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) in [0, 1] -> an 8-bit RGB PIL image."""
    return Image.fromarray((x[0].clamp(0, 1).permute(1, 2, 0).float().cpu().numpy() * 255.0).round().astype(np.uint8))


def device() -> torch.device:
    return torch.device(devices.device)


def half() -> bool:
    """The webui's half-precision choice (--no-half / --precision full turn it off); never on the CPU."""
    return device().type != "cpu" and not getattr(shared.cmd_opts, "no_half", False) and devices.dtype == torch.float16


@contextlib.contextmanager
def same_host_rng() -> Iterator[None]:
    """Leave the host's global RNG states as they were (building a model draws from them).

    The webui draws from the global generator between seeded steps (the VAE's posterior sample in img2img,
    seeded only by whatever ran before), so without this a plain img2img would give other pixels after a
    RealSR job than before it.
    """
    dev = device()
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        yield


def progress(label: str) -> Callable[[int, int], None]:
    """A core progress callback that drives the webui's job progress (the progress bar and /progress)."""

    def update(done: int, total: int) -> None:
        shared.state.sampling_steps = total
        shared.state.sampling_step = done
        shared.state.textinfo = f"{label}: {done}/{total}"

    return update


def cancelled() -> bool:
    """The core's cancel callback: Interrupt (and Skip) in the UI or /sdapi/v1/interrupt."""
    return bool(shared.state.interrupted or shared.state.skipped)


def raise_if_cancelled() -> None:
    if cancelled():
        raise Cancelled("interrupted")


def free_memory() -> None:
    devices.torch_gc()
