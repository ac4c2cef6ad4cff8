"""The official model files the pack reads: where their authors publish them and where each host wants them.

One table (``CATALOG``) serves every front end: ``python -m realsr_core models`` prints it, the README's
"Model files" table is generated from it (a test keeps the two equal), the shipped ComfyUI workflows carry its
links in their ``models`` lists, and a missing file is reported with ``missing_file_message``: the folders that
were searched, the folder the file belongs in for that host and its download link.

Nothing here imports a host.  The shipped models (``realsr_core/weights``: CRL-SR x4, the LWay module) are not
listed: they need no download.  LWay and CRL-SR have no official weights (the authors released none).

Sizes (``size_mb``, 10^6 bytes) are approximate.  They were computed as the sum of numel x bytes-per-dtype over
the key / shape manifests of the oracle fixtures (``tests/fixtures/*/manifest.json``: the official networks'
state dicts, float32), not read from the released files:

* FeMaSR x4 / x2 / HRP: 140 / 151 / 92 MB; the released files also hold a few unused keys (left over from
  development), so they are somewhat larger.
* MM-RealSR: 105 MB for one copy of the weights (``params``); a file that also holds ``params_ema`` is twice that.
* StableSR module (``structcond_stage_model.*`` + the UNet's ``*.spade.*``): 105.5 M parameters, 422 MB, which
  matches the authors' "about 400 MB" for ``webui_768v_139.ckpt``.
* CFW VAE: 128 M parameters, 512 MB.
* SD 2.1 (UNet + VAE + OpenCLIP text tower): 1.30 G parameters, 5215 MB in float32 (the real-size stand-ins of
  ``tests/host/sd21_random.py`` have the same keys and shapes and take 2.6 GB in float16).
* Whole StableSR checkpoints (SD 2.1 + module): 5215 + 422 = 5637 MB; Lightning may store more beside them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Literal

Host = Literal["comfyui", "webui", "cli"]

HOST_NAMES: dict[str, str] = {"comfyui": "ComfyUI", "webui": "Forge / AUTOMATIC1111", "cli": "the command line"}
MODELS_COMMAND = "python -m realsr_core models"

_FEMASR = "https://github.com/chaofengc/FeMaSR/releases/download/v0.1-pretrain_models/"
_MMREALSR = "https://github.com/TencentARC/MM-RealSR/releases/download/v1.0.0/"
_STABLESR = "https://huggingface.co/Iceclear/StableSR/resolve/main/"
_SD21_512 = "https://huggingface.co/stabilityai/stable-diffusion-2-1-base/resolve/main/"
_SD21_768 = "https://huggingface.co/stabilityai/stable-diffusion-2-1/resolve/main/"

COMFY_PACK = "models/realsr/"
COMFY_SD = "models/checkpoints/"
WEBUI_PACK = "models/RealSR/"
WEBUI_SD = "models/Stable-diffusion/"


@dataclass(frozen=True)
class ModelFile:
    """One official file.

    Attributes:
        name: the released file name (keep it: the workflows and the README use it).
        method: the method it belongs to (``FeMaSR``, ``MM-RealSR``, ``StableSR``, ``Stable Diffusion 2.1``).
        size_mb: approximate size in MB (10^6 bytes); see the module docstring for how it was obtained.
        url: a direct download link (a GitHub release asset or a Hugging Face ``/resolve/main/`` file); for a
            file the authors publish inside an archive, the archive's link (``archive`` names it).
        comfy_folder: where ComfyUI finds it, relative to the ComfyUI folder (``models/realsr/``).
        webui_folder: where Forge and AUTOMATIC1111 find it, relative to the webui folder.
        note: what the file is, in a few words.
        comfy_also: other ComfyUI folders it must also be in (the turbo checkpoint is also an SD model).
        webui_also: other webui folders it must also be in.
        archive: the archive that holds the file, when the authors publish it zipped.
    """

    name: str
    method: str
    size_mb: int
    url: str
    comfy_folder: str
    webui_folder: str
    note: str
    comfy_also: tuple[str, ...] = ()
    webui_also: tuple[str, ...] = ()
    archive: str | None = None

    @property
    def comfy_directory(self) -> str:
        """The ComfyUI folder name (``folder_paths`` key, a workflow's ``models[].directory``): ``realsr``."""
        return PurePath(self.comfy_folder).name

    def folders(self, host: Host) -> tuple[str, ...]:
        """Every folder the file belongs in for a host (the first is its main one); none for the command line."""
        if host == "comfyui":
            return (self.comfy_folder, *self.comfy_also)
        if host == "webui":
            return (self.webui_folder, *self.webui_also)
        return ()

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready description (what ``python -m realsr_core models --json`` prints)."""
        return {"name": self.name, "method": self.method, "size_mb": self.size_mb, "url": self.url,
                "comfyui_folders": list(self.folders("comfyui")), "webui_folders": list(self.folders("webui")),
                "note": self.note, "archive": self.archive}


CATALOG: tuple[ModelFile, ...] = (
    ModelFile("FeMaSR_SRX4_model_g.pth", "FeMaSR", 140, _FEMASR + "FeMaSR_SRX4_model_g.pth",
              COMFY_PACK, WEBUI_PACK, "x4 upscaler"),
    ModelFile("FeMaSR_SRX2_model_g.pth", "FeMaSR", 151, _FEMASR + "FeMaSR_SRX2_model_g.pth",
              COMFY_PACK, WEBUI_PACK, "x2 upscaler"),
    ModelFile("FeMaSR_HRP_model_g.pth", "FeMaSR", 92, _FEMASR + "FeMaSR_HRP_model_g.pth",
              COMFY_PACK, WEBUI_PACK, "HRP autoencoder: x1, the high-resolution prior"),
    ModelFile("MMRealSRGAN.pth", "MM-RealSR", 105, _MMREALSR + "MMRealSRGAN.pth",
              COMFY_PACK, WEBUI_PACK, "x4, GAN, the official demo's model"),
    ModelFile("MMRealSRNet.pth", "MM-RealSR", 105, _MMREALSR + "MMRealSRNet.pth",
              COMFY_PACK, WEBUI_PACK, "x4, L1 + ranking losses: smoother"),
    ModelFile("MMRealSRGAN_ModulationBest.pth", "MM-RealSR", 105, _MMREALSR + "MMRealSRGAN_ModulationBest.pth",
              COMFY_PACK, WEBUI_PACK, "x4, GAN, fewer iterations: the best modulation"),
    ModelFile("stablesr_000117.ckpt", "StableSR", 5637, _STABLESR + "stablesr_000117.ckpt",
              COMFY_PACK, WEBUI_PACK, "whole checkpoint, SD 2.1 512: the module is read from it"),
    ModelFile("stablesr_768v_000139.ckpt", "StableSR", 5637, _STABLESR + "stablesr_768v_000139.ckpt",
              COMFY_PACK, WEBUI_PACK, "whole checkpoint, SD 2.1 768-v: the module is read from it"),
    ModelFile("webui_768v_139.ckpt", "StableSR", 422, _STABLESR + "webui_768v_139.ckpt",
              COMFY_PACK, WEBUI_PACK, "module only, for SD 2.1 768-v"),
    ModelFile("stablesr_webui_sd-v2-1-512-ema-000117.ckpt", "StableSR", 422, _STABLESR + "webui_512v_models.zip",
              COMFY_PACK, WEBUI_PACK, "module only, for SD 2.1 512",
              archive="webui_512v_models.zip"),
    ModelFile("stablesr_turbo.ckpt", "StableSR", 5637, _STABLESR + "stablesr_turbo.ckpt",
              COMFY_PACK, WEBUI_PACK, "whole checkpoint for 4 steps, also the SD model",
              comfy_also=(COMFY_SD,), webui_also=(WEBUI_SD,)),
    ModelFile("vqgan_cfw_00011.ckpt", "StableSR", 512, _STABLESR + "vqgan_cfw_00011.ckpt",
              COMFY_PACK, WEBUI_PACK, "CFW VAE, optional: a decoder that keeps the input's detail"),
    ModelFile("v2-1_512-ema-pruned.safetensors", "Stable Diffusion 2.1", 5215,
              _SD21_512 + "v2-1_512-ema-pruned.safetensors",
              COMFY_SD, WEBUI_SD, "the SD model of the 512 StableSR modules"),
    ModelFile("v2-1_768-ema-pruned.safetensors", "Stable Diffusion 2.1", 5215,
              _SD21_768 + "v2-1_768-ema-pruned.safetensors",
              COMFY_SD, WEBUI_SD, "the SD model of the 768-v StableSR module"),
)

_BY_NAME: dict[str, ModelFile] = {m.name.lower(): m for m in CATALOG}


def find(name: str) -> ModelFile | None:
    """The official file of that name (case-insensitive; a path is reduced to its file name), or None."""
    base = PurePath(str(name).replace("\\", "/")).name
    return _BY_NAME.get(base.lower())


def size_text(size_mb: int) -> str:
    """``140 MB``, ``5.6 GB``."""
    return f"{size_mb} MB" if size_mb < 1000 else f"{size_mb / 1000:.1f} GB"


def link_label(m: ModelFile) -> str:
    """A short name of where the link points: the release, the Hugging Face repository, or the archive."""
    if m.url.startswith("https://github.com/"):
        owner, repo, *_ = m.url.removeprefix("https://github.com/").split("/")
        return f"{owner}/{repo} release"
    repo = "/".join(m.url.removeprefix("https://huggingface.co/").split("/")[:2])
    return f"{m.archive} ({repo})" if m.archive else repo


COLUMNS = ("file", "method", "size", "link", "ComfyUI folder", "Forge / AUTOMATIC1111 folder")


def rows() -> list[tuple[str, ...]]:
    """The catalog as text cells, in ``COLUMNS`` order (the link cell is the URL itself)."""
    return [(m.name, m.method, "~" + size_text(m.size_mb), m.url, " + ".join(m.folders("comfyui")),
             " + ".join(m.folders("webui"))) for m in CATALOG]


def markdown_table() -> str:
    """The README's "Model files" table (``python -m realsr_core models --markdown``)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for m in CATALOG:
        name = f"`{m.name}`" + (f" (in `{m.archive}`)" if m.archive else "")
        comfy = " + ".join(f"`{f}`" for f in m.folders("comfyui"))
        webui = " + ".join(f"`{f}`" for f in m.folders("webui"))
        lines.append(f"| {name} | {m.method} | ~{size_text(m.size_mb)} | [{link_label(m)}]({m.url}) | {comfy} | {webui} |")
    return "\n".join(lines)


def text_table() -> str:
    """The catalog as aligned plain-text columns (``python -m realsr_core models``)."""
    table = [COLUMNS, *rows()]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    # The link is the widest column: keep it last on the line so the other columns stay readable.
    order = (0, 1, 2, 4, 5, 3)
    return "\n".join("  ".join(r[i].ljust(widths[i]) for i in order).rstrip() for r in table)


def _download(m: ModelFile) -> str:
    if m.archive:
        return f"download {m.archive} (it holds this file) from {m.url}, unzip it"
    return f"download it from {m.url}"


def missing_file_message(name: str, host: Host, searched: Sequence[str]) -> str:
    """One line for a model file that is not where it was looked for.

    Args:
        name: the file name the user gave (a widget value, a ``--model`` path, ...).
        host: ``comfyui`` or ``webui`` (the message names that host's folder), or ``cli`` (the command line
            and the Python API, which take paths: ``searched`` is the path that was tried).
        searched: the folders (or, for ``cli``, the paths) that were searched.

    Returns:
        The file and where it was searched; for an official file, what it is, the folder it belongs in for
        that host and its download link; for any other name, a pointer to ``python -m realsr_core models``.
    """
    where = ", ".join(str(s) for s in searched)
    if host == "cli":
        head = f"checkpoint not found: {where or name}"
    else:
        head = f"model file {name!r} not found" + (f" (searched {where})" if where else "")
    m = find(name)
    if m is None:
        return (f"{head}; `{MODELS_COMMAND}` lists the official model files, the folder each belongs in and "
                "its download link")
    what = f"{m.name} is the official {m.method} file ({m.note}, ~{size_text(m.size_mb)})"
    if host == "cli":
        return f"{head}; {what}: {_download(m)}, then give its path"
    first, *more = m.folders(host)
    also = f", and in {' and '.join(more)} too (a link is enough)" if more else ""
    return f"{head}; {what}: {_download(m)} and put it in {first} of {HOST_NAMES[host]}{also}"
