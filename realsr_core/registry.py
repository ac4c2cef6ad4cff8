"""Architecture registry: detect a state dict's method, infer its configuration, build it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from .checkpoint import Checkpoint, load_checkpoint
from .descriptor import Architecture, ModelDescriptor, StateDict
from .errors import CheckpointError, RealSRError, UnsupportedModelError


def architectures() -> list[Architecture]:
    """All architectures, in detection order (more specific key sets first)."""
    from .models import crlsr, esrgan, femasr, lway, mmrealsr, stablesr
    from .models.stablesr import cfw as stablesr_cfw

    # MM-RealSR before RRDBNet (its generator has RRDBNet's keys and more); the VAEs last: "sd_vae" takes any
    # LDM-layout VAE that has no CFW layers.
    return [stablesr.ARCHITECTURE, mmrealsr.ARCHITECTURE, crlsr.ARCHITECTURE, femasr.ARCHITECTURE, lway.ARCHITECTURE,
            esrgan.ESRGAN, esrgan.COMPACT, *stablesr_cfw.ARCHITECTURES]


def detect(state_dict: StateDict) -> Architecture | None:
    """The first architecture whose key rule matches, or None."""
    for arch in architectures():
        if arch.detect(state_dict):
            return arch
    return None


# Key families of models this pack does not run itself, so the error can say what the file is.
_FOREIGN_HINTS: tuple[tuple[str, str], ...] = (
    ("model.diffusion_model.input_blocks.0.0.weight", "a Stable Diffusion checkpoint (load it with ComfyUI's checkpoint loader)"),
    ("model.0.weight|model.1.sub.0.RDB1.conv1.0.weight", "an old-style ESRGAN upscaler (ComfyUI's 'Load Upscale Model' runs it)"),
    ("layers.0.residual_group.blocks.0.norm1.weight", "a SwinIR upscaler (ComfyUI's 'Load Upscale Model' runs it)"),
    ("encoder.down.0.block.0.conv1.weight", "a VAE / autoencoder"),
)


def _guess(sd: StateDict) -> str:
    for pattern, what in _FOREIGN_HINTS:
        if all(k in sd for k in pattern.split("|")):
            return what
    return "an unknown architecture"


def _prefixes(sd: StateDict, n: int = 8) -> list[str]:
    seen: dict[str, None] = {}
    for k in sd:
        seen.setdefault(k.split(".")[0], None)
    return list(seen)[:n]


def supported_names() -> str:
    return ", ".join(a.name for a in architectures())


def _build(arch: Architecture, ckpt: Checkpoint) -> ModelDescriptor:
    """``arch.load`` on the checkpoint's tensors, with the file named in every refusal.

    The architectures' own errors (which name the tensor) get the file name in front.  Anything else a
    malformed file can still provoke in an architecture's inference or load (IndexError, ValueError,
    RuntimeError ...) becomes an UnsupportedModelError instead of a traceback: a safety net, the
    per-tensor checks (``shape_of``, ``check_layout``, ``check_weights``) are meant to catch it first.
    """
    named = ckpt.source != "<state dict>"
    try:
        return arch.load(ckpt.state_dict)
    except (CheckpointError, UnsupportedModelError) as e:
        if not named or str(e).startswith(ckpt.source):
            raise
        raise type(e)(f"{ckpt.source}: {e}") from e
    except torch.OutOfMemoryError:
        raise
    except (IndexError, KeyError, ValueError, TypeError, RuntimeError, ZeroDivisionError) as e:
        if isinstance(e, RealSRError):  # InvalidInputError is a ValueError: already a message for the user
            raise
        detail = str(e).splitlines()[0][:300] if str(e) else ""
        raise UnsupportedModelError(
            f"{ckpt.source}: looks like {arch.name}, but its tensors do not form a model this pack can build "
            f"({type(e).__name__}: {detail}); the file is damaged or a variant that is not supported"
        ) from e


def load_model(
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    param_key: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> ModelDescriptor:
    """Load a checkpoint file or state dict and build its model.

    Args:
        source: a path (``.safetensors``, ``.pth``, ``.pt``, ``.ckpt``, ``.bin``) or a dict.
        param_key: force a BasicSR wrapper (``"params"`` / ``"params_ema"``); by default the
            architecture's preference (the official scripts' choice).
        device, dtype: where to put the model (CPU float32 by default).

    Returns:
        the model's descriptor, in eval mode.

    Raises:
        CheckpointError: unreadable or unsafe file, or weights that are NaN/inf or stored as integers
            where the model needs floating point (naming the tensors).
        UnsupportedModelError: no known architecture, or tensors that do not fit it (naming the
            tensor, its shape and what was expected); the message names the file.
    """
    ckpt: Checkpoint = load_checkpoint(source, prefer=param_key or "params")
    arch = detect(ckpt.state_dict)
    if arch is None:
        # Another wrapper in the same file may hold the model (rare, but cheap to check).
        for name in list(ckpt.alternatives):
            ckpt.use(name)
            arch = detect(ckpt.state_dict)
            if arch is not None:
                break
    if arch is None:
        sd = ckpt.state_dict
        raise UnsupportedModelError(
            f"{ckpt.source}: not a model this pack supports. Found {len(sd)} tensors "
            f"(top-level keys {ckpt.top_keys[:6]}, key prefixes {_prefixes(sd)}); it looks like {_guess(sd)}. "
            f"Supported: {supported_names()}."
        )
    if param_key is None and arch.wrapper_preference != ckpt.wrapper:
        ckpt.use(arch.wrapper_preference)
    desc = _build(arch, ckpt)
    if device is not None or dtype is not None:
        desc.to(device, dtype)
    return desc
