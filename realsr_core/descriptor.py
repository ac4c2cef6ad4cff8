"""The loaded-model description every architecture returns, and the architecture record.

A ``ModelDescriptor`` wraps a built ``nn.Module`` with what callers need to run it without knowing
the method: scale, size requirements, precision support and the model's own inference path
(padding and cropping as the official code does it).  Architectures subclass it to add
whole-image quantities (``prepare``) such as MM-RealSR's degradation scores.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .errors import UnsupportedModelError

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
    def prepare(self, image: Tensor, **options: Any) -> dict[str, Any]:
        """Whole-image quantities computed once before tiling.

        Args:
            image: (B, C, H, W) in [0, 1], on any device.
            options: architecture-specific user options (e.g. MM-RealSR ``blur``/``noise``).

        Returns:
            keyword arguments passed unchanged to every ``forward`` call (empty by default).
        """
        if options:
            raise TypeError(f"{self.name} takes no options, got {sorted(options)}")
        return {}

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


def shape_of(state_dict: StateDict, key: str, what: str = "the") -> tuple[int, ...]:
    """A tensor's shape as ints; a missing key is an UnsupportedModelError naming it."""
    if key not in state_dict:
        raise UnsupportedModelError(f"{what} state dict lacks {key!r}")
    return tuple(int(s) for s in state_dict[key].shape)
