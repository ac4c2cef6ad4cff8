"""Every feed-forward model the core loads, as a webui upscaler (Extras, hires fix, "SD upscale").

The shipped CRL-SR x4 and each FeMaSR / MM-RealSR / CRL-SR / ESRGAN / Real-ESRGAN file in ``models/RealSR``
(``.pth``, ``.safetensors``, or an ncnn ``.param`` with its ``.bin``) become one ``UpscalerData``.  ``do_upscale`` hands the image to :func:`realsr_core.upscale`: the core's tiler (tile size
and overlap from the webui's settings), the webui's device and half precision, progress and Interrupt through
the job state.  One model is kept loaded; choosing another releases it.  The Extras controls
(:mod:`realsr_webui.extras`) hand their options to the next call through :data:`NEXT`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from modules.upscaler import Upscaler, UpscalerData
from PIL import Image

from realsr_core import ModelDescriptor, load_model, upscale
from realsr_core.adapt.lway import finetune
from realsr_core.errors import Cancelled
from realsr_core.inference import compute_dtype
from realsr_core.weights import DEFAULT_MODEL, builtin_path

from . import host

FEED_FORWARD = ("femasr", "mmrealsr", "crlsr", "esrgan", "compact")
BUILTIN_NAME = "RealSR CRL-SR x4 (built-in)"
LWAY_MODULE = "lway_rec.safetensors"


@dataclass
class Request:
    """What the Extras controls ask of the next RealSR upscale (reset after each Extras run)."""

    options: dict[str, Any] = field(default_factory=dict)  # MM-RealSR blur / noise
    lway_iterations: int = 0
    lway_lr: float = 1e-5
    losses: list[float] = field(default_factory=list)  # filled by the LWay run, for the loss curve
    used: str = ""  # the model that ran, for the infotext
    scores: list[float] = field(default_factory=list)  # MM-RealSR (blur, noise) used, estimated or given


NEXT: Request | None = None


class UpscalerRealSR(Upscaler):
    """The webui instantiates this once at start (``--realsr-models-path`` arrives as ``dirname``)."""

    def __init__(self, dirname: str | None = None) -> None:
        self.name = "RealSR"
        self.user_path = dirname
        super().__init__()
        self._loaded: tuple[str, ModelDescriptor] | None = None
        self.scalers = [UpscalerData(BUILTIN_NAME, str(builtin_path(DEFAULT_MODEL)), self, 4)]
        for path in host.files_of(*FEED_FORWARD):
            m = re.search(r"[xX]([1248])(?!\d)", path.stem)
            self.scalers.append(UpscalerData(f"RealSR {path.stem}", str(path), self, int(m.group(1)) if m else 4))

    def load_model(self, path: str) -> ModelDescriptor:
        """The model at ``path``; the previous one is released first (one RealSR model in memory)."""
        if self._loaded is not None and self._loaded[0] == path:
            return self._loaded[1]
        self._loaded = None
        host.free_memory()
        if not Path(path).is_file():
            host.find_model_file(Path(path).name)  # raises with the folder and the download link
        desc = load_model(path)
        self._loaded = (path, desc)
        return desc

    def do_upscale(self, img: Image.Image, selected_model: str | None = None) -> Image.Image:
        try:
            with host.same_host_rng():
                return self._upscale(img, selected_model)
        except Cancelled:  # Interrupt: the webui stops the job and resizes what it has, as for its own upscalers
            return img

    def _upscale(self, img: Image.Image, selected_model: str | None) -> Image.Image:
        desc = self.load_model(selected_model or str(builtin_path(DEFAULT_MODEL)))
        req = NEXT
        device = host.device()
        dtype = compute_dtype(desc, device, torch.float16 if host.half() else None)
        x = host.to_tensor(img)
        options: dict[str, Any] = {}
        if req is not None:
            options = {k: v for k, v in req.options.items() if k in desc.option_names()}
            req.used = desc.name
            if req.lway_iterations > 0:
                desc = self._adapt(desc, x, req, device, dtype)
        result = upscale(desc, x, tile=host.setting(host.TILE) or "auto", overlap=host.setting(host.OVERLAP),
                         device=device, dtype=dtype, progress=host.progress(f"RealSR {desc.name}"),
                         cancel=host.cancelled, **options)
        if req is not None:
            degrees = result.context[0].get("degrees")
            req.scores = [] if degrees is None else [float(v) for v in degrees.flatten()]
        if req is not None and req.lway_iterations > 0:
            host.free_memory()  # the adapted copy lived for this image only
        return host.to_image(result.image)

    def _adapt(self, desc: ModelDescriptor, x: torch.Tensor, req: Request, device: torch.device,
               dtype: torch.dtype) -> ModelDescriptor:
        """LWay: a copy of the model fine-tuned on this image; the loaded model is not changed.  It trains in
        the upscale's precision: mixed (float16 / bfloat16 passes, float32 weights) where the webui runs half."""
        lway = load_model(builtin_path(LWAY_MODULE))
        step = host.progress("LWay adaptation")
        res = finetune(desc, x, lway, iterations=req.lway_iterations, lr=req.lway_lr, device=device,
                       compute_dtype=dtype, progress=lambda done, total, _loss: step(done, total), cancel=host.cancelled)
        req.losses = list(res.losses)
        return res.model
