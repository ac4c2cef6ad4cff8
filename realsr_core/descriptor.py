"""The loaded-model description every architecture returns, and the architecture record.

A ``ModelDescriptor`` wraps a built ``nn.Module`` with what callers need to run it without knowing
the method: scale, size requirements, precision support and the model's own inference path
(padding and cropping as the official code does it).  Architectures subclass it to add
whole-image quantities (``prepare``) such as MM-RealSR's degradation scores.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .errors import CheckpointError, UnsupportedModelError

StateDict = Mapping[str, Tensor]
Purpose = Literal["SR", "Restoration", "Module"]


class ModelDescriptor:
    """A built model plus the facts needed to run it.

    Attributes:
        model: the network, in eval mode.
        arch: registry id of the architecture (``"femasr"``, ``"mmrealsr"``, ...).
        name: a human-readable name, e.g. ``"FeMaSR x4"``.
        purpose: ``"SR"`` (upscaler), ``"Restoration"`` (same-size image model, e.g. FeMaSR's
            HRP autoencoder) or ``"Module"`` (not an image-to-image model on its own).
        scale: output size / input size.
        in_channels, out_channels: image channels (3 for RGB).
        size_multiple: the network's own input multiple; ``forward`` pads to it itself.
        min_size: the smallest input height or width ``forward`` accepts.
        supports_half, supports_bf16: whether float16 / bfloat16 give usable results.
        config: hyper-parameters inferred from the tensor shapes.
        ignored_keys: state-dict keys that were present but not used (leftover families).
        bytes_per_px: rough peak activation bytes per *input* pixel in float32, used to pick a
            tile size that fits a memory budget.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        arch: str,
        name: str,
        purpose: Purpose = "SR",
        scale: int,
        in_channels: int = 3,
        out_channels: int = 3,
        size_multiple: int = 1,
        min_size: int = 1,
        supports_half: bool = True,
        supports_bf16: bool = True,
        config: dict[str, Any] | None = None,
        ignored_keys: list[str] | None = None,
        bytes_per_px: float = 16384.0,
    ) -> None:
        self.model = model.eval()
        self.arch = arch
        self.name = name
        self.purpose = purpose
        self.scale = int(scale)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.size_multiple = size_multiple
        self.min_size = min_size
        self.supports_half = supports_half
        self.supports_bf16 = supports_bf16
        self.config = dict(config or {})
        self.ignored_keys = list(ignored_keys or [])
        self.bytes_per_px = bytes_per_px

    # ------------------------------------------------------------------ running
    def prepare(self, image: Tensor) -> dict[str, Any]:
        """Whole-image quantities computed once before tiling.

        Subclasses add their user options as keyword parameters (e.g. MM-RealSR ``blur``/``noise``);
        :meth:`option_names` reads them from the signature, so callers can refuse unknown ones.

        Args:
            image: (B, C, H, W) in [0, 1], on any device.

        Returns:
            keyword arguments passed unchanged to every ``forward`` call (empty by default).
        """
        return {}

    def option_names(self) -> tuple[str, ...]:
        """The user options :meth:`prepare` takes (keyword parameters after the image)."""
        params = list(inspect.signature(self.prepare).parameters.values())[1:]
        return tuple(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))

    def with_dtype(self, dtype: torch.dtype) -> ModelDescriptor:
        """This descriptor on a copy of the model cast to ``dtype``; the loaded model itself is never rounded."""
        if dtype == self.dtype:
            return self
        clone = copy.copy(self)
        clone.model = copy.deepcopy(self.model)
        return clone.to(dtype=dtype)

    def forward(self, x: Tensor, **context: Any) -> Tensor:
        """Run the model on one image or tile, following the official inference path.

        Args:
            x: (B, in_channels, H, W) in [0, 1] on the model's device and dtype, H, W >= min_size.
            context: what ``prepare`` returned.

        Returns:
            (B, out_channels, H*scale, W*scale), not clamped.
        """
        return self.model(x)

    __call__ = forward

    # ------------------------------------------------------------------ placement
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ModelDescriptor:
        """Move the model in place (like ``nn.Module.to``); refuses a dtype it does not support."""
        if dtype == torch.float16 and not self.supports_half:
            raise ValueError(f"{self.name} does not support float16")
        if dtype == torch.bfloat16 and not self.supports_bf16:
            raise ValueError(f"{self.name} does not support bfloat16")
        self.model.to(device=device, dtype=dtype)
        return self

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary (what loaders show to users)."""
        return {
            "arch": self.arch,
            "name": self.name,
            "purpose": self.purpose,
            "scale": self.scale,
            "size_multiple": self.size_multiple,
            "min_size": self.min_size,
            "params": self.num_params,
            "supports_half": self.supports_half,
            "config": self.config,
            "ignored_keys": len(self.ignored_keys),
        }

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} x{self.scale} {self.num_params / 1e6:.2f}M params>"


@dataclass(frozen=True)
class Architecture:
    """One entry of the registry.

    Attributes:
        id: stable identifier (used in file names, node types and errors).
        name: human-readable name.
        detect: True when a canonical state dict belongs to this architecture.
            Must have no false negatives; checked in registry order.
        load: builds the descriptor from a state dict, inferring the configuration from shapes.
        wrapper_preference: which BasicSR wrapper to take when a file has both
            (``"params"`` or ``"params_ema"``).
    """

    id: str
    name: str
    detect: Callable[[StateDict], bool]
    load: Callable[[StateDict], ModelDescriptor]
    wrapper_preference: str = "params"
    key_hints: tuple[str, ...] = field(default_factory=tuple)


def has_all(state_dict: StateDict, *keys: str) -> bool:
    """True when every key is present (the usual detection rule)."""
    return all(k in state_dict for k in keys)


def count_indexed(state_dict: StateDict, pattern: str, start: int = 0) -> int:
    """Number of consecutive indices ``i`` from ``start`` such that ``pattern.format(i)`` is a key (block counts)."""
    n = start
    while pattern.format(n) in state_dict:
        n += 1
    return n - start


def own_weight(t: Tensor) -> Tensor:
    """A fresh float32 CPU copy of a checkpoint tensor (4-D conv weights channels_last, the layout the fused CPU
    convolutions run in), so a loaded model never shares memory with the file's (possibly memory-mapped) tensors."""
    fmt = torch.channels_last if t.dim() == 4 else torch.contiguous_format
    return t.detach().to(device="cpu", dtype=torch.float32, memory_format=fmt, copy=True)


def check_layout(what: str, layout: str, expected: Mapping[str, Tensor], state_dict: StateDict,
                 unexpected: list[str]) -> None:
    """Refuse a state dict that does not fill ``expected`` (a model's ``state_dict()``) exactly.

    Args:
        what: the method's name, for the message.
        layout: the inferred configuration, in words.
        expected: the built model's tensors (meta tensors are fine: only shapes are read).
        state_dict: the checkpoint's tensors.
        unexpected: keys of the model's own families that the model does not have.

    Raises:
        UnsupportedModelError: naming up to 5 missing / unexpected keys, or the first tensor of another shape.
    """
    missing = [k for k in expected if k not in state_dict]
    if missing or unexpected:
        raise UnsupportedModelError(
            f"{what} state dict does not match the inferred layout ({layout}): "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for k, v in expected.items():
        if tuple(state_dict[k].shape) != tuple(v.shape):
            raise UnsupportedModelError(
                f"{what} tensor {k!r} has shape {tuple(state_dict[k].shape)}, the inferred layout needs {tuple(v.shape)}"
            )


# What a configuration reader needs, by number of dimensions (for the messages of ``shape_of``).
_NDIM_MEANING: dict[int, str] = {
    0: "a 0-D scalar",
    1: "a 1-D vector (C,)",
    2: "a 2-D (out, in) matrix",
    3: "a 3-D tensor",
    4: "a 4-D (out, in, kh, kw) convolution weight",
}


def shape_of(
    state_dict: StateDict, key: str, what: str = "the", ndim: int | None = None, file_prefix: str = ""
) -> tuple[int, ...]:
    """A tensor's shape as ints, the one checked path through which configuration inference reads shapes.

    Args:
        state_dict: the checkpoint's tensors.
        key: the tensor to read.
        what: the method's name, for the message.
        ndim: the number of dimensions the reader relies on (4 for a conv weight, 2 for a linear one...).
            With it, a tensor of another rank or with an empty dimension is refused here, instead of
            surfacing as an IndexError / unpacking error deep in the inference.
        file_prefix: the prefix ``key`` has in the file when the reader was given prefix-free keys
            (e.g. ``structcond_stage_model.``), so that the message names the tensor as the file does.

    Raises:
        UnsupportedModelError: the key is missing, or (with ``ndim``) the tensor is not such a tensor;
            the message names the tensor, its shape and what was expected.
    """
    name = file_prefix + key
    if key not in state_dict:
        raise UnsupportedModelError(f"{what} state dict lacks {name!r}")
    raw = getattr(state_dict[key], "shape", None)
    if raw is None:
        kind = type(state_dict[key]).__name__
        raise UnsupportedModelError(f"{what} state dict entry {name!r} is a {kind}, not a tensor")
    shape = tuple(int(s) for s in raw)
    if ndim is not None and (len(shape) != ndim or 0 in shape):
        meaning = _NDIM_MEANING.get(ndim, f"a {ndim}-D tensor") + (" with no empty dimension" if ndim else "")
        raise UnsupportedModelError(
            f"{what} tensor {name!r} has shape {shape}, expected {meaning}; "
            "the file is damaged or holds another model's tensors under these names"
        )
    return shape


def _listed(items: list[str], limit: int = 5) -> str:
    """Up to ``limit`` items joined for a message, with how many more were left out."""
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_weights(
    what: str,
    expected: Mapping[str, Tensor],
    given: StateDict,
    file_key: Callable[[str], str] | None = None,
) -> None:
    """Refuse checkpoint tensors whose values would make the model lie: wrong kind or not finite.

    Called by every architecture right before it loads ``given`` into its model, because a model
    built from such tensors does not fail: NaN weights give an all-black image, one ``inf`` gives NaN
    pixels, integer "weights" are silently cast and change the result.  Cost: one ``aminmax`` pass per
    floating tensor the model uses (tensors the model does not use are not read); NaN/inf are counted
    only in a tensor that has some.

    Args:
        what: the method's name, for the message.
        expected: the model's ``state_dict()`` (meta tensors are fine: only dtypes are read); it says
            which tensors are floating point.  Integer buffers the model itself has (Swin
            ``relative_position_index``, ``num_batches_tracked``) keep their integer file tensors.
        given: the checkpoint's tensors under the model's key names (every key of ``expected``).
        file_key: maps a model key to its name in the file, when the architecture renamed it.

    Raises:
        CheckpointError: naming up to 5 tensors: those stored as integer/bool where the model has a
            floating-point parameter or buffer (with their dtype), else those holding NaN or infinite
            values (with the counts).  Float64 tensors are checked as the float32 the model stores.
    """
    name = file_key or (lambda k: k)
    wrong = [
        f"{name(k)!r} ({given[k].dtype})"
        for k, v in expected.items()
        if v.is_floating_point() and not given[k].is_floating_point()
    ]
    if wrong:
        raise CheckpointError(
            f"{what} weights are not usable: {len(wrong)} tensor(s) that must hold floating-point weights are "
            f"not floating point: {_listed(wrong)}. The file is damaged or was converted wrongly "
            "(such values would silently change the result); download it again (weights are float32, float16 "
            "or bfloat16)."
        )
    bad: list[str] = []
    for k in expected:
        t = given[k]
        if not t.is_floating_point() or t.device.type == "meta" or t.numel() == 0:
            continue
        # One reduction pass, no temporary: min/max propagate NaN and show +-inf.  Read as float32, the
        # model's dtype, so that a float64 beyond float32's range counts as the inf it would become.
        lo, hi = torch.aminmax(t)
        if bool(torch.isfinite(lo.float())) and bool(torch.isfinite(hi.float())):
            continue
        t32 = t.float()
        nan = int(torch.isnan(t32).sum())
        inf = int(torch.isinf(t32).sum())
        counts = ", ".join(c for c in (f"{nan} NaN" if nan else "", f"{inf} inf" if inf else "") if c)
        bad.append(f"{name(k)!r} ({counts} of {t.numel()} values)")
    if bad:
        raise CheckpointError(
            f"{what} weights are not usable: {len(bad)} tensor(s) contain NaN or infinite values: {_listed(bad)}. "
            "The file is damaged or was saved from a diverged training run; download it again (or use an "
            "earlier checkpoint of the training)."
        )
