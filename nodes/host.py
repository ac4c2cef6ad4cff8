"""The one module that talks to ComfyUI: model folders, ModelPatcher wrapping, memory, progress, interrupt.

Node files call these helpers and the core; nothing here holds method-specific logic.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths
import spandrel
import torch
from torch import Tensor

from ..realsr_core import ModelDescriptor, load_model, upscale
from ..realsr_core.adapt import FinetuneResult, finetune
from ..realsr_core.catalog import missing_file_message
from ..realsr_core.inference import TileSize
from ..realsr_core.weights import builtin_models, builtin_path
from .types import SPANDREL

log = logging.getLogger(__name__)

FOLDER = "realsr"
NCNN_GRAPH, NCNN_WEIGHTS = ".param", ".bin"  # an ncnn model: x.param (listed, loaded) with x.bin beside it


def register_model_folder() -> None:
    """Register ``models/realsr`` without dropping paths ``extra_model_paths.yaml`` already gave it."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    paths, _ = folder_paths.folder_names_and_paths.get(FOLDER, ([], set()))
    if default not in paths:
        paths = [*paths, default]
    # add_model_folder_path on a new name would register an empty extension set (= every file).
    extensions = set(folder_paths.supported_pt_extensions) | {NCNN_GRAPH}
    folder_paths.folder_names_and_paths[FOLDER] = (paths, extensions)


BUILTIN = "built-in/"  # prefix of the models shipped inside the pack (realsr_core/weights)
SEARCHED = (FOLDER, "upscale_models")  # the folders a RealSR model file is looked up in, in this order


def _ncnn_graphs(folder: str) -> list[str]:
    """``.param`` files under ``folder``'s paths (recursive, ``/``-separated names as ComfyUI lists them).

    ``models/upscale_models`` keeps ComfyUI's extension set (its own loader cannot read ncnn files), so
    the pack scans those folders itself.
    """
    found = []
    for root in folder_paths.get_folder_paths(folder):
        for dirpath, dirs, files in os.walk(root, followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found += [os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/")
                      for f in files if f.lower().endswith(NCNN_GRAPH)]
    return found


def _ncnn_partner(folder: str, name: str, ext: str) -> bool:
    """Whether the listed file ``name`` has the file of extension ``ext`` and the same stem beside it."""
    path = folder_paths.get_full_path(folder, name)
    return path is not None and os.path.isfile(os.path.splitext(path)[0] + ext)


def _folder_files(folder: str) -> list[str]:
    """One folder's loadable names: checkpoints and ncnn ``.param`` files that have their ``.bin`` beside them.

    The ``.bin`` of an ncnn pair is its weights, not a checkpoint, so it is not listed on its own.
    """
    names = set(folder_paths.get_filename_list(folder)) | set(_ncnn_graphs(folder))
    return sorted(
        n for n in names
        if not (n.lower().endswith(NCNN_GRAPH) and not _ncnn_partner(folder, n, NCNN_WEIGHTS))
        and not (n.lower().endswith(NCNN_WEIGHTS) and _ncnn_partner(folder, n, NCNN_GRAPH))
    )


def model_files() -> list[str]:
    """The shipped models, then model names from ``models/realsr`` and ``models/upscale_models``."""
    names = [BUILTIN + n for n in builtin_models()]
    for folder in SEARCHED:
        names += [n for n in _folder_files(folder) if n not in names]
    return names


def searched_folders() -> list[str]:
    """Every folder a model file is looked for in (``models/realsr``, ``extra_model_paths.yaml``, upscale_models)."""
    return [p for folder in SEARCHED for p in folder_paths.get_folder_paths(folder)]


def missing_model_message(name: str) -> str:
    """The one-line report of a model file that is in none of the folders: where it belongs and its link."""
    return missing_file_message(name, "comfyui", searched_folders())


def resolve_model_file(name: str) -> str:
    """The full path of a loader's ``model_name``; a missing file raises naming the folders and the download link."""
    if name.startswith(BUILTIN):
        return str(builtin_path(name[len(BUILTIN):]))
    for folder in SEARCHED:
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            return path
    raise FileNotFoundError(missing_model_message(name))


@dataclass
class RealSRModel:
    """What travels on a model socket: the core descriptor plus its ComfyUI ModelPatcher."""

    desc: ModelDescriptor
    file: str
    patcher: comfy.model_patcher.ModelPatcher

    @property
    def arch(self) -> str:
        return self.desc.arch


@dataclass
class NotThisModel:
    """Placed on a loader output whose family does not match the file, so the node can say why."""

    wanted: str
    found: str
    file: str


class NoUpscaleModel:
    """On the loader's UPSCALE_MODEL output when the file has no spandrel equivalent.

    ComfyUI's 'Upscale Image (using Model)' (and other UPSCALE_MODEL nodes) first read ``.model`` / ``.scale``;
    here those raise the reason instead of an AttributeError.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError(self.reason)

    model = property(_refuse)
    scale = property(_refuse)
    to = __call__ = _refuse

    def __repr__(self) -> str:
        return f"NoUpscaleModel({self.reason!r})"


def spandrel_model(desc: ModelDescriptor, name: str) -> Any:
    """The loader's UPSCALE_MODEL: a spandrel ``ImageModelDescriptor`` built as ComfyUI's 'Load Upscale Model'
    builds one, from the network's state dict (released key names), or a :class:`NoUpscaleModel`.

    A file whose network is followed by an output resize (ncnn realesr-animevideov3-x2/x3: the x4 network,
    then a bicubic downscale) is refused: spandrel's model is the network alone, so ComfyUI's node would
    give x4 while the file is x2 / x3.
    """
    if desc.arch not in SPANDREL:
        return NoUpscaleModel(
            f"'{name}' is a {desc.name} model: the loader's UPSCALE_MODEL output carries only ESRGAN / "
            f"Real-ESRGAN models (RRDBNet, compact). Connect its 'SR model' output to 'RealSR Upscale' instead.")
    if "output_scale" in desc.config:
        return NoUpscaleModel(
            f"'{name}' is {desc.name}: ComfyUI's upscale-model nodes run the network alone and would give "
            f"x{desc.config['scale']}, not the file's x{desc.scale}. Connect the loader's 'SR model' output to "
            f"'RealSR Upscale' (it applies the resize), or load the x{desc.config['scale']} file for this node "
            f"and scale its result with 'Upscale Image By'.")
    instead = "Connect the loader's 'SR model' output to 'RealSR Upscale' instead."
    try:
        out = spandrel.ModelLoader().load_from_state_dict(desc.model.state_dict()).eval()
    except Exception as e:  # a layout the core reads and spandrel does not: the other outputs still work
        return NoUpscaleModel(f"'{name}' ({desc.name}): spandrel, ComfyUI's upscale-model library, cannot read "
                              f"it ({' '.join(str(e).split())[:300]}). {instead}")
    if not isinstance(out, spandrel.ImageModelDescriptor):  # as ComfyUI's loader checks
        return NoUpscaleModel(f"'{name}' ({desc.name}): spandrel reads it as a {type(out).__name__}, not a "
                              f"single-image model. {instead}")
    return out


def load(name: str) -> tuple[RealSRModel, Any]:
    """Load a checkpoint through the core and wrap it for ComfyUI's model management.

    Returns the model and its UPSCALE_MODEL (:func:`spandrel_model`, made from the float32 weights, as
    ComfyUI's own loader keeps them).
    """
    desc = load_model(resolve_model_file(name))
    upscale_model = spandrel_model(desc, name)
    load_device = mm.get_torch_device()
    if load_device.type != "cpu":
        # Half precision on the GPU where the model supports it (FeMaSR keeps its codebook search in fp32).
        if desc.supports_half and mm.should_use_fp16(load_device):
            desc.to(dtype=torch.float16)
        elif desc.supports_bf16 and mm.should_use_bf16(load_device):
            desc.to(dtype=torch.bfloat16)
    return wrap(desc, name), upscale_model


def require(model: Any, arch: str | tuple[str, ...], label: str) -> RealSRModel:
    """The model on a socket, or a clear error when the loader output carried another family."""
    if isinstance(model, NotThisModel):
        raise ValueError(
            f"'{model.file}' is a {model.found} model, not {model.wanted}: connect the loader's "
            f"output of that family to a node that runs it instead"
        )
    archs = arch if isinstance(arch, tuple) else (arch,)
    if not isinstance(model, RealSRModel) or model.arch not in archs:
        raise ValueError(f"{label} needs a {' / '.join(archs)} model from 'Load RealSR Model', got "
                         f"{getattr(model, 'arch', type(model).__name__)}")
    return model


def parse_tile(value: str) -> TileSize:
    return "auto" if value == "auto" else None if value == "none" else int(value)


def offload(patcher: comfy.model_patcher.ModelPatcher) -> None:
    """Give the model's memory back once the node is done (the next node usually needs the GPU)."""
    for i, loaded in enumerate(mm.current_loaded_models):
        if loaded.model is patcher:
            loaded.model_unload()
            mm.current_loaded_models.pop(i)
            break


def interrupt_check() -> bool:
    """A core ``cancel`` callback: raises ComfyUI's interrupt when the user pressed Cancel, else False."""
    mm.throw_exception_if_processing_interrupted()  # raises ComfyUI's own interrupt exception
    return False


def run_upscale(model: RealSRModel, image: Tensor, *, tile: str, overlap: int, **options: Any) -> tuple[Tensor, list[dict]]:
    """Upscale a ComfyUI IMAGE [B, H, W, C] under model management; returns [B, sH, sW, C] and contexts."""
    desc = model.desc
    device = model.patcher.load_device
    tile_size = parse_tile(tile)
    h, w = image.shape[1:3]
    # Memory for one tile's activations (the core picks the "auto" tile from what is free after loading).
    side = min(max(h, w), 512) if tile_size in ("auto", None) else min(int(tile_size), max(h, w))
    half = desc.dtype in (torch.float16, torch.bfloat16)
    tile_bytes = int(desc.bytes_per_px * (side + 32) ** 2 * (0.5 if half else 1.0))
    mm.load_models_gpu([model.patcher], memory_required=tile_bytes, force_full_load=True)
    pbar = comfy.utils.ProgressBar(1)
    try:
        res = upscale(
            desc, image.movedim(-1, 1), tile=tile_size, overlap=overlap, device=device, dtype=desc.dtype,
            output_device=mm.intermediate_device(), progress=lambda d, t: pbar.update_absolute(d, t),
            cancel=interrupt_check, **options,
        )
    finally:
        offload(model.patcher)
    return res.image.movedim(1, -1), res.context


def run_finetune(model: Any, image: Tensor, lway: RealSRModel, *, iterations: int, **options: Any) -> FinetuneResult:
    """LWay fine-tuning of ``model`` (a core descriptor or a spandrel one) on a ComfyUI IMAGE [B, H, W, C].

    The core trains a private copy on the GPU (gradients on despite ComfyUI's inference mode); the input
    model is never changed, and the adapted copy comes back on the offload device, so the GPU holds the
    training state only while this node runs.  A model ComfyUI loaded in float16 / bfloat16 (its choice for
    the GPU) trains in mixed precision (passes in that dtype, weights and Adam state float32); a float32 one
    (on the CPU, and ComfyUI's upscale models) in float32.
    """
    device = mm.get_torch_device()
    net = model.model
    dtype = next(net.parameters()).dtype
    mixed = dtype in (torch.float16, torch.bfloat16)
    params = sum(p.numel() * 4 for p in net.parameters())
    p, b = options.get("patch_size", 64), options.get("batch_size", 4)
    scale = getattr(model, "scale", 4)
    # Weights, grads and Adam's two moments in float32, plus the autograd activations of one patch batch
    # (~2 KB per SR pixel for these conv nets in float32, measured on CRL-SR / RRDB; half that in mixed
    # precision) and the frozen E + R.
    act = b * (p * scale) ** 2 * (1024 if mixed else 2048)
    required = 4 * params + act + sum(q.numel() * 4 for q in lway.desc.model.parameters())
    mm.free_memory(required, device)
    pbar = comfy.utils.ProgressBar(iterations)
    try:
        result = finetune(model, image.movedim(-1, 1), lway.desc, iterations=iterations, device=device,
                          compute_dtype=dtype if mixed else torch.float32,
                          progress=lambda done, total, _loss: pbar.update_absolute(done, total),
                          cancel=interrupt_check, **options)
    finally:
        mm.soft_empty_cache()
    result.model.to(mm.unet_offload_device())
    return result


def wrap(desc: ModelDescriptor, name: str) -> RealSRModel:
    """A core descriptor (loaded, or made in a node such as an adapted model) under ComfyUI's model management."""
    patcher = comfy.model_patcher.ModelPatcher(desc.model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    return RealSRModel(desc, name, patcher)
