"""LWay step 2: self-supervised test-time fine-tuning of any SR model on its own LR input.

Paper: H. Chen et al., "Low-Res Leads the Way", CVPR 2024, Sec. 3.2.  With the LR-reconstruction branch
(E, R; :mod:`realsr_core.models.lway`) frozen, each iteration::

    lr        random LR patches of the test image(s)                        (B, 3, p, p)
    lr_up     bicubic(lr, x scale), detached: the target                    (B, 3, p*s, p*s)
    sr        S(lr), with gradients                                          (B, 3, p*s, p*s)
    recon     R(sr, E(lr_up))                                                (B, 3, p*s, p*s)
    W         hf_weight_map(lr_up), in [0, 1]                                (B, 1, p*s, p*s)
    loss      mean(W * |recon - lr_up|)  -> Adam on the chosen parameters of S

Choices the paper leaves open (``shared/research/lway_crlsr_degradation.md`` Sec. 1.3), and ours:

* R works at the SR size, so the test LR is brought to it by bicubic upsampling, both as E's input
  (the authors' answer in their issue #1) and as the loss target.
* The weight map is computed on ``lr_up`` (detached, so it is a fixed weighting, not something the
  model can change), with the Haar wavelet; see :func:`hf_weight_map` for the details.
* ``L1(W * recon, W * lr_up)`` of the paper equals ``mean(W * |recon - lr_up|)`` since W >= 0; the LPIPS
  term of the paper is left out (its weights cannot be downloaded here).
* Optimiser Adam (betas 0.9, 0.999), constant learning rate; the model runs in eval mode throughout
  (no BatchNorm statistics updates, no dropout): only its weights change.
* Mixed precision is optional (``compute_dtype``): the forward and backward passes of S run in
  bfloat16 / float16 under autocast while its weights, their gradients and Adam's moments stay float32, so
  small steps (lr 1e-5 on weights of ~1e-2) are not rounded away; R and the loss stay float32 (see
  :func:`_step_loss`); float16 adds loss scaling against gradient underflow.  On a CPU with native bfloat16
  this nearly halves the time of a Real-ESRGAN x4plus step (BENCHMARKS.md, LWay).

The model passed in is never modified: a deep copy is fine-tuned and returned.
"""

from __future__ import annotations

import copy
import inspect
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..descriptor import ModelDescriptor
from ..errors import Cancelled, InvalidInputError, RealSRError
from ..models.lway.network import LWayReconstruction, bicubic_resize
from ..tiling import CancelFn

__all__ = [
    "FinetuneResult",
    "finetune",
    "haar_dwt2",
    "hf_weight_map",
    "lway_loss",
    "select_parameters",
    "self_supervised_loss",
]

#: ``progress(done, iterations, loss)`` after every fine-tuning iteration.
LossProgressFn = Callable[[int, int, float], None]
SRModel = Any  # nn.Module | ModelDescriptor | a spandrel ImageModelDescriptor (duck-typed: .model, .scale)


# --------------------------------------------------------------------------------------------- weight map
def _haar_filters(dtype: torch.dtype, device: torch.device) -> Tensor:
    """The four 2x2 analysis filters of the 2-D Haar DWT, (4, 1, 2, 2): LL, then PyWavelets' cH, cV, cD."""
    # The orthonormal Haar filters: low-pass (1, 1) / sqrt(2), high-pass (1, -1) / sqrt(2).  These are
    # PyWavelets' Wavelet("haar").dec_lo / dec_hi, [s, s] and [-s, s] with s = sqrt(0.5) = 0.7071067811865476
    # (the same double), reversed: pywt convolves and keeps the odd samples, F.conv2d correlates, so
    # reversing them makes conv2d(stride 2) equal pywt.dwt2 (checked against the analytic values in the tests).
    s = math.sqrt(0.5)
    lo = torch.tensor([s, s], dtype=torch.float64)
    hi = torch.tensor([s, -s], dtype=torch.float64)
    # pywt.dwt2 names the bands by axis 0 (rows) then axis 1: cH = ('da') detail along rows, approx along columns.
    bank = torch.stack([torch.outer(lo, lo), torch.outer(hi, lo), torch.outer(lo, hi), torch.outer(hi, hi)])
    return bank[:, None].to(device=device, dtype=dtype)


def haar_dwt2(x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """One level of the 2-D Haar DWT of every channel, equal to ``pywt.dwt2(x, "haar")`` (mode "symmetric").

    The filters are the orthonormal Haar pair (constants, no PyWavelets needed); the transform runs as a
    stride-2 convolution on ``x``'s device.

    Args:
        x: (B, C, H, W) float.

    Returns:
        ``(cA, (cH, cV, cD))``, each (B, C, ceil(H/2), ceil(W/2)): approximation, then the detail bands
        (pywt's names: horizontal, vertical, diagonal; in the paper's terms LH, HL, HH).
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise InvalidInputError(f"haar_dwt2 expects a float (B, C, H, W) tensor, got {tuple(x.shape)} {x.dtype}")
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        # pywt's default "symmetric" mode extends by mirroring with the edge sample repeated; for the
        # 2-tap Haar filter that is one replicated row / column.
        x = F.pad(x, (0, w % 2, 0, h % 2), mode="replicate")
    bands = F.conv2d(x.reshape(b * c, 1, *x.shape[-2:]), _haar_filters(x.dtype, x.device), stride=2)
    bands = bands.reshape(b, c, 4, *bands.shape[-2:])
    return bands[:, :, 0], (bands[:, :, 1], bands[:, :, 2], bands[:, :, 3])


def hf_weight_map(img: Tensor, eps: float = 1e-8) -> Tensor:
    """LWay's high-frequency weight map W in [0, 1], at the image's size.

    ``sqrt(cH^2 + cV^2 + cD^2)`` of the Haar DWT's detail bands (the L2 norm across directions, as the
    authors describe), averaged in energy over the colour channels so one map weights all of them, then
    min-max normalised per image to [0, 1] (a constant image, which has no detail, gives W = 0).

    The DWT gives the map at half size; each coefficient describes one 2x2 block of the input, so the map
    is brought to full size by nearest-neighbour x2 upsampling: every pixel gets the weight of its own
    block (a smooth upsampling would spread an edge's weight into the flat blocks beside it).  Odd sizes
    are cropped after upsampling.

    Args:
        img: (B, C, H, W) images (in LWay the upsampled LR, in [0, 1]).
        eps: guards the normalisation of a flat image.

    Returns:
        (B, 1, H, W) in [0, 1], same dtype and device, no gradient.
    """
    with torch.no_grad():
        _, (ch, cv, cd) = haar_dwt2(img.float())
        mag = (ch.square() + cv.square() + cd.square()).mean(dim=1, keepdim=True).sqrt()  # (B, 1, h/2, w/2)
        lo = mag.amin(dim=(-2, -1), keepdim=True)
        hi = mag.amax(dim=(-2, -1), keepdim=True)
        w = (mag - lo) / (hi - lo).clamp_min(eps)
        w = F.interpolate(w, scale_factor=2, mode="nearest")[..., : img.shape[-2], : img.shape[-1]]
        return w.clamp(0, 1).to(img.dtype)


def lway_loss(recon: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """LWay's weighted reconstruction loss ``mean(W * |recon - target|)``.

    Equals the paper's ``L1(W * recon, W * target)`` because W >= 0.  The mean is over every element
    (batch, channels, pixels), so flat areas (W ~ 0) dilute rather than renormalise the loss.

    Args:
        recon: (B, C, H, W) the reconstruction ``R(SR, E(lr_up))``.
        target: (B, C, H, W) the upsampled LR.
        weight: (B, 1, H, W) or (B, C, H, W) in [0, 1].

    Returns:
        a scalar float32 tensor.
    """
    if recon.shape != target.shape:
        raise InvalidInputError(f"recon {tuple(recon.shape)} and target {tuple(target.shape)} differ in shape")
    return (weight.float() * (recon.float() - target.float()).abs()).mean()


# --------------------------------------------------------------------------------------------- the SR model
@dataclass
class _Runner:
    """A private, trainable copy of an SR model and how to call it with gradients.

    Attributes:
        result: what is handed back (a copy of the descriptor, or of the module).
        module: the network inside ``result`` whose parameters are trained.
        call: ``(lr, image_index) -> sr`` with gradients; ``image_index`` (B,) tells which input image each
            patch comes from (for per-image context such as MM-RealSR's scores).
        scale: the SR factor.
        min_size: the smallest LR side the model accepts.
    """

    result: Any
    module: nn.Module
    call: Callable[[Tensor, Tensor], Tensor]
    scale: int
    min_size: int = 1


def _own_tensors(module: nn.Module) -> None:
    """Replace parameters / buffers that are inference tensors (made under ``torch.inference_mode``, as
    ComfyUI loads and runs models) by ordinary copies: autograd cannot save inference tensors."""
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.is_inference():
                mod._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        for name, b in list(mod._buffers.items()):
            if b is not None and b.is_inference():
                mod._buffers[name] = b.clone()


def _plain(value: Any) -> Any:
    """An ordinary (non-inference) copy of a context tensor; other values unchanged."""
    return value.detach().clone() if isinstance(value, Tensor) else value


def _gather_context(contexts: Sequence[dict[str, Any]], index: Tensor) -> dict[str, Any]:
    """Per-patch context: every per-image tensor of batch 1 is stacked along the patches' image index."""
    if not contexts or not contexts[0]:
        return {}
    out: dict[str, Any] = {}
    for key, first in contexts[0].items():
        if isinstance(first, Tensor) and first.dim() >= 1 and first.shape[0] == 1:
            out[key] = torch.cat([contexts[int(i)][key] for i in index.tolist()])
        else:
            out[key] = first
    return out


def _descriptor_call(desc: ModelDescriptor) -> Callable[..., Tensor]:
    """The descriptor's own inference path without its ``torch.inference_mode`` decorator.

    FeMaSR's ``forward`` calls its (decorated) ``forward_with_indices``, so that one is unwrapped instead.
    """
    cls = type(desc)
    if desc.arch == "femasr" and hasattr(cls, "forward_with_indices"):
        fwi = inspect.unwrap(cls.forward_with_indices)
        return lambda x, **ctx: fwi(desc, x)[0]
    fwd = inspect.unwrap(cls.forward)
    return lambda x, **ctx: fwd(desc, x, **ctx)


def _is_spandrel_like(model: Any) -> bool:
    return (not isinstance(model, (nn.Module, ModelDescriptor)) and isinstance(getattr(model, "model", None), nn.Module)
            and isinstance(getattr(model, "scale", None), int))


def _runner(model: SRModel, images: Sequence[Tensor], scale: int | None, device: torch.device) -> _Runner:
    """Copy ``model`` (float32, on ``device``) and build its gradient-enabled call."""
    if isinstance(model, ModelDescriptor):
        if model.purpose != "SR":
            raise InvalidInputError(f"{model.name} is not a super-resolution model (purpose {model.purpose!r})")
        desc = copy.deepcopy(model)
        _own_tensors(desc.model)
        desc.model.to(device=device, dtype=torch.float32)
        # Whole-image quantities (MM-RealSR's degradation scores) are fixed once per image, without gradients,
        # exactly as inference fixes them before tiling; the scores are not trained.
        contexts = [{k: _plain(v) for k, v in desc.prepare(img[None]).items()} for img in images]
        fwd = _descriptor_call(desc)

        def call(x: Tensor, index: Tensor) -> Tensor:
            return fwd(x, **_gather_context(contexts, index))

        return _Runner(desc, desc.model, call, scale or desc.scale, max(desc.min_size, 1))
    if _is_spandrel_like(model):
        desc = copy.deepcopy(model)
        _own_tensors(desc.model)
        desc.model.to(device=device, dtype=torch.float32)

        def call_sp(x: Tensor, index: Tensor) -> Tensor:
            out = desc(x)  # spandrel's own path: pads to the size requirements and crops
            # Some versions run it without autograd or clamp in place; then call the network itself.
            return out if out.requires_grad else desc.model(x)

        minimum = int(getattr(getattr(desc, "size_requirements", None), "minimum", 1) or 1)
        return _Runner(desc, desc.model, call_sp, scale or desc.scale, minimum)
    if isinstance(model, nn.Module):
        net = copy.deepcopy(model)
        _own_tensors(net)
        net.to(device=device, dtype=torch.float32)
        return _Runner(net, net, lambda x, index: net(x), scale or 0)
    raise InvalidInputError(
        f"expected an nn.Module, a realsr_core ModelDescriptor or a spandrel model descriptor, got {type(model).__name__}"
    )


def _model_device(model: SRModel) -> torch.device:
    net = model.model if not isinstance(model, nn.Module) else model
    p = next(iter(net.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _model_dtype(net: nn.Module) -> torch.dtype:
    p = next((p for p in net.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else torch.float32


# --------------------------------------------------------------------------------------------- parameters
def select_parameters(named: Sequence[tuple[str, nn.Parameter]], spec: str) -> list[str]:
    """The names of the parameters ``spec`` chooses among ``named`` (registration order).

    Args:
        named: ``(name, parameter)`` pairs, in the model's registration order.
        spec: ``"all"``; ``"last:<fraction>"`` (0 < fraction <= 1): the last parameters in registration
            order holding that fraction of the elements (whole tensors, counted from the end until the
            fraction is reached, so at least that fraction is trained); or a regular expression searched
            in each name (``re.search``).

    Raises:
        InvalidInputError: a malformed fraction, or a pattern that selects nothing.
    """
    if spec == "all":
        return [n for n, _ in named]
    if spec.startswith("last:"):
        try:
            frac = float(spec[5:])
        except ValueError:
            frac = float("nan")
        if not 0.0 < frac <= 1.0:
            raise InvalidInputError(f"params {spec!r}: the fraction after 'last:' must be in (0, 1], e.g. 'last:0.35'")
        total = sum(p.numel() for _, p in named)
        chosen: list[str] = []
        acc = 0
        for name, p in reversed(named):
            if acc >= frac * total:
                break
            chosen.append(name)
            acc += p.numel()
        return chosen[::-1]
    try:
        rx = re.compile(spec)
    except re.error as e:
        raise InvalidInputError(f"params {spec!r}: not 'all', 'last:<fraction>' or a valid regular expression ({e})") from e
    chosen = [n for n, _ in named if rx.search(n)]
    if not chosen:
        examples = ", ".join(n for n, _ in named[:6])
        raise InvalidInputError(f"params {spec!r} matches no parameter name (names look like: {examples}, ...)")
    return chosen


def _used_parameters(runner: _Runner, lr: Tensor) -> list[tuple[str, nn.Parameter]]:
    """The parameters the SR path actually uses (one batch-1 forward and backward with every one trainable).

    Excludes parts a network holds but does not run here (e.g. MM-RealSR's degradation estimator once the
    scores are fixed), so ``"last:f"`` counts only what fine-tuning can change.
    """
    params = [(n, p) for n, p in runner.module.named_parameters() if p.is_floating_point()]
    for _, p in params:
        p.requires_grad_(True)
        p.grad = None
    runner.call(lr[:1], torch.zeros(1, dtype=torch.long)).float().mean().backward()
    used = [(n, p) for n, p in params if p.grad is not None]
    for _, p in params:
        p.grad = None
        p.requires_grad_(False)
    return used


# --------------------------------------------------------------------------------------------- patches
def _as_images(images: Tensor | Sequence[Tensor], device: torch.device) -> list[Tensor]:
    """A list of (3, H, W) float32 ordinary tensors on ``device`` (gray is repeated, alpha dropped)."""
    if isinstance(images, Tensor):
        if images.dim() == 3:
            images = images[None]
        if images.dim() != 4:
            raise InvalidInputError(f"expected images (B, C, H, W) or a list of (C, H, W), got {tuple(images.shape)}")
        seq: list[Tensor] = list(images)
    else:
        seq = [t[0] if isinstance(t, Tensor) and t.dim() == 4 and t.shape[0] == 1 else t for t in images]
    if not seq:
        raise InvalidInputError("no image to fine-tune on")
    out = []
    for t in seq:
        if not isinstance(t, Tensor) or t.dim() != 3 or t.shape[0] not in (1, 3, 4) or not t.is_floating_point():
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise InvalidInputError(f"expected float images (C, H, W) with C in 1, 3, 4 and values in [0, 1], got {shape}")
        t = t.detach().to(device=device, dtype=torch.float32).clone()  # clone: never an inference tensor
        t = t.expand(3, -1, -1).contiguous() if t.shape[0] == 1 else t[:3].contiguous()
        if not torch.isfinite(t).all():
            raise InvalidInputError("an image contains NaN or infinite values")
        out.append(t)
    return out


class _Patches:
    """Seeded random LR patches of a fixed size, drawn with probability proportional to image area."""

    def __init__(self, images: list[Tensor], size: int, seed: int) -> None:
        self.images, self.size = images, size
        areas = torch.tensor([float(t.shape[-2] * t.shape[-1]) for t in images], dtype=torch.float64)
        self.weights = areas / areas.sum()
        self.generator = torch.Generator().manual_seed(seed)

    def batch(self, n: int) -> tuple[Tensor, Tensor]:
        """``(patches (n, 3, p, p), image index (n,) int64)``."""
        g, p = self.generator, self.size
        which = torch.multinomial(self.weights, n, replacement=True, generator=g)
        out = []
        for i in which.tolist():
            img = self.images[i]
            top = int(torch.randint(0, img.shape[-2] - p + 1, (1,), generator=g))
            left = int(torch.randint(0, img.shape[-1] - p + 1, (1,), generator=g))
            out.append(img[:, top : top + p, left : left + p])
        return torch.stack(out), which


def _frozen_reconstruction(reconstruction: LWayReconstruction | ModelDescriptor, device: torch.device) -> LWayReconstruction:
    rec = reconstruction.model if isinstance(reconstruction, ModelDescriptor) else reconstruction
    if not isinstance(rec, LWayReconstruction):
        raise InvalidInputError(f"reconstruction must be an LWayReconstruction (E and R), got {type(rec).__name__}")
    # A private copy: freezing it (and any gradient bookkeeping) must not touch the caller's module.
    rec = copy.deepcopy(rec)
    _own_tensors(rec)
    return rec.to(device=device, dtype=torch.float32).eval().requires_grad_(False)


def _step_loss(runner: _Runner, rec: LWayReconstruction, lr: Tensor, index: Tensor,
               compute_dtype: torch.dtype = torch.float32) -> Tensor:
    """The self-supervised loss of one patch batch (gradients flow to the SR model's trainable parameters).

    With a reduced ``compute_dtype`` only the SR model runs under autocast: R, E and the loss stay float32,
    because the residual ``recon - lr_up`` the loss measures (~2e-3 for a good model) is as small as
    bfloat16's rounding of a [0, 1] image (~2e-3), and R's downscaling averages the SR output's rounding away.
    """
    s = runner.scale
    size = (lr.shape[-2] * s, lr.shape[-1] * s)
    with torch.no_grad():
        lr_up = bicubic_resize(lr, size)
        emb = rec.embed(lr_up)
        weight = hf_weight_map(lr_up)
    with torch.autocast(lr.device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
        sr = runner.call(lr, index)
    if tuple(sr.shape[-2:]) != size:
        raise RealSRError(f"the SR model turned a {lr.shape[-1]}x{lr.shape[-2]} patch into {sr.shape[-1]}x{sr.shape[-2]}, "
                          f"expected x{s} ({size[1]}x{size[0]}); pass the right scale")
    recon = rec.reconstructor(sr[:, :3].float(), emb)
    return lway_loss(recon, lr_up, weight)


def _prepare(
    model: SRModel,
    images: Tensor | Sequence[Tensor],
    reconstruction: LWayReconstruction | ModelDescriptor,
    scale: int | None,
    patch_size: int,
    device: torch.device | str | None,
) -> tuple[_Runner, LWayReconstruction, list[Tensor], int]:
    dev = torch.device(device) if device is not None else _model_device(model)
    imgs = _as_images(images, dev)
    runner = _runner(model, imgs, scale, dev)
    p = min(patch_size, *(min(t.shape[-2:]) for t in imgs))
    if p < runner.min_size:
        raise InvalidInputError(f"the images (smallest side {p}) are smaller than the model's minimum {runner.min_size}")
    if not runner.scale:
        # A plain module does not say its scale: measure it on one patch.
        with torch.no_grad():
            out = runner.call(imgs[0][None, :, :p, :p], torch.zeros(1, dtype=torch.long))
        runner.scale = int(round(out.shape[-1] / p))
        if runner.scale < 1 or out.shape[-1] != p * runner.scale:
            raise InvalidInputError(f"could not tell the model's scale ({p} px in, {out.shape[-1]} px out); pass scale=")
    rec = _frozen_reconstruction(reconstruction, dev)
    if rec.config.kernel_size and rec.config.scale not in (0, runner.scale):
        # R's base path resamples by the factor it was trained for; another factor mis-models the degradation.
        warnings.warn(f"the LWay module was trained for x{rec.config.scale} and the SR model is x{runner.scale}: "
                      "its reconstruction (and so the fine-tuning) is only approximate", stacklevel=3)
    return runner, rec, imgs, p


# --------------------------------------------------------------------------------------------- API
@dataclass
class FinetuneResult:
    """What :func:`finetune` returns.

    Attributes:
        model: the adapted deep copy, of the type passed in (nn.Module, realsr_core ModelDescriptor or
            spandrel descriptor), in eval mode, on the input model's device and dtype.
        losses: the self-supervised loss of every iteration (each on its own random patches, so noisy).
        trained_params: number of parameter elements that were optimised.
        trained_names: their names.
    """

    model: Any
    losses: list[float]
    trained_params: int
    trained_names: list[str] = field(default_factory=list)


def finetune(
    model: SRModel,
    images: Tensor | Sequence[Tensor],
    reconstruction: LWayReconstruction | ModelDescriptor,
    *,
    scale: int | None = None,
    iterations: int = 100,
    lr: float = 5e-5,
    patch_size: int = 64,
    batch_size: int = 4,
    params: str = "all",
    seed: int = 0,
    device: torch.device | str | None = None,
    compute_dtype: torch.dtype = torch.float32,
    progress: LossProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> FinetuneResult:
    """Adapt an SR model to the given LR image(s) by LWay's self-supervised loss.

    Works inside ``torch.inference_mode()`` / ``torch.no_grad()`` (as ComfyUI runs nodes): gradients are
    switched back on locally, and weights or images created in inference mode are copied first.

    Args:
        model: an ``nn.Module`` (e.g. a spandrel descriptor's ``.model``), a realsr_core
            :class:`ModelDescriptor` (FeMaSR, MM-RealSR, CRL-SR: its own inference path runs, with
            gradients; MM-RealSR's scores are estimated once per image and kept fixed), or a spandrel
            ``ImageModelDescriptor``.  Never modified.
        images: LR image(s): (B, 3, H, W) or a list of (3, H, W) / (1, 3, H, W), in [0, 1].
        reconstruction: the trained LR-reconstruction branch (frozen here; a private copy is used).
        scale: the SR factor (default: the descriptor's; a plain module's is measured on one patch).
        iterations: optimiser steps (the authors use 100-700).
        lr: Adam learning rate (the authors: 2e-6 to 5e-5).
        patch_size: LR patch side (capped by the smallest image side).
        batch_size: patches per step.
        params: which parameters to train: ``"all"``, ``"last:<fraction>"`` or a regex on parameter names
            (see :func:`select_parameters`); only parameters the SR path uses are counted.
        seed: seeds the patch positions.
        device: where to train (default: the model's device); the result goes back to the model's device.
        compute_dtype: precision of the passes: ``torch.float32``, or ``torch.bfloat16`` / ``torch.float16``
            for mixed precision (autocast; weights and optimiser state stay float32; float16 with loss
            scaling).  bfloat16 suits CPUs with native bfloat16 (AVX-512 BF16, AMX) and recent GPUs.
        progress: called after every iteration as ``progress(done, iterations, loss)``.
        cancel: polled before every iteration; when it returns True, :class:`Cancelled` is raised (the
            input model is untouched, the partial copy is dropped).

    Returns:
        :class:`FinetuneResult`.

    Raises:
        InvalidInputError: bad images, options or model type.
        Cancelled: ``cancel()`` returned True.
        RealSRError: the loss became NaN or infinite (lower ``lr``).
    """
    if iterations < 0 or batch_size < 1 or patch_size < 1 or not (lr > 0 and math.isfinite(lr)):
        raise InvalidInputError(
            f"need iterations >= 0, batch_size >= 1, patch_size >= 1 and lr > 0; got {iterations}, {batch_size}, "
            f"{patch_size}, {lr}"
        )
    if compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise InvalidInputError(f"compute_dtype must be torch.float32, torch.bfloat16 or torch.float16, got {compute_dtype}")
    home = _model_device(model)
    home_dtype = _model_dtype(model.model if not isinstance(model, nn.Module) else model)
    with torch.inference_mode(False), torch.enable_grad():
        runner, rec, imgs, p = _prepare(model, images, reconstruction, scale, patch_size, device)
        net = runner.module
        original_flags = {n: q.requires_grad for n, q in net.named_parameters()}
        patches = _Patches(imgs, p, seed)
        net.eval()
        used = _used_parameters(runner, imgs[0][None, :, :p, :p])
        names = set(select_parameters(used, params))
        chosen = [q for n, q in used if n in names]
        for q in chosen:
            q.requires_grad_(True)
        # With only a suffix of the network trainable, the input is marked as needing gradients so every
        # layer runs on the autograd path: inference-only fast paths of foreign models may decide per layer
        # from requires_grad and skip the gradient of a trainable layer that follows a frozen one (our own
        # fused residual blocks check all their convs).
        partial = len(chosen) < len(used)
        optimizer = torch.optim.Adam(chosen, lr=lr)
        dev_type = imgs[0].device.type
        # float16's 5-bit exponent flushes small gradients to zero; the scaler multiplies the loss up and skips
        # a step whose gradients overflowed.  bfloat16 has float32's range and needs none.
        scaler = torch.amp.GradScaler(dev_type) if compute_dtype == torch.float16 else None
        losses: list[float] = []
        for it in range(iterations):
            if cancel is not None and cancel():
                raise Cancelled(f"LWay fine-tuning cancelled after {it} of {iterations} iterations; "
                                "the input model is unchanged")
            lr_patch, index = patches.batch(batch_size)
            if partial:
                lr_patch.requires_grad_(True)
            loss = _step_loss(runner, rec, lr_patch, index, compute_dtype)
            if not torch.isfinite(loss):
                raise RealSRError(f"LWay fine-tuning: the loss is not finite at iteration {it + 1}; lower lr (now {lr})")
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(it + 1, iterations, losses[-1])
        optimizer.zero_grad(set_to_none=True)
        for n, q in net.named_parameters():
            q.requires_grad_(original_flags.get(n, q.requires_grad))
        net.to(device=home, dtype=home_dtype).eval()
    return FinetuneResult(runner.result, losses, sum(q.numel() for q in chosen), [n for n, _ in used if n in names])


def self_supervised_loss(
    model: SRModel,
    images: Tensor | Sequence[Tensor],
    reconstruction: LWayReconstruction | ModelDescriptor,
    *,
    scale: int | None = None,
    patch_size: int = 64,
    batch_size: int = 4,
    batches: int = 1,
    seed: int = 1234,
    device: torch.device | str | None = None,
) -> float:
    """LWay's loss on fixed patches (``seed``), without gradients: compare a model before and after.

    Args: as :func:`finetune`; ``batches`` batches of ``batch_size`` patches are averaged.

    Returns:
        the mean weighted loss (a float).
    """
    with torch.inference_mode(False), torch.no_grad():
        runner, rec, imgs, p = _prepare(model, images, reconstruction, scale, patch_size, device)
        runner.module.eval()
        patches = _Patches(imgs, p, seed)
        total = 0.0
        for _ in range(batches):
            lr_patch, index = patches.batch(batch_size)
            total += float(_step_loss(runner, rec, lr_patch, index))
    return total / batches
