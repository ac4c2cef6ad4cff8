"""Safe reading of checkpoint files and their containers.

Nothing here executes code from a file: ``.safetensors`` go through safetensors, every pickle-based
format (``.pth``, ``.pt``, ``.ckpt``, ``.bin``) through ``torch.load(weights_only=True)``, whose
restricted unpickler refuses any global that is not a plain tensor/container type.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import CheckpointError

SAFETENSORS_EXT = (".safetensors", ".sft")
PICKLE_EXT = (".pth", ".pt", ".ckpt", ".bin")
SUPPORTED_EXT = SAFETENSORS_EXT + PICKLE_EXT

# Containers the official releases use, in the order they are tried.  BasicSR writes
# {'params': ...} and, with EMA, 'params_ema' too; Lightning writes {'state_dict': ...}.
WRAPPER_KEYS = ("params", "params_ema", "params-ema", "state_dict", "model_state_dict", "model", "net", "netG", "generator")
DATA_PARALLEL_PREFIXES = ("module.", "netG.")


@dataclass
class Checkpoint:
    """A canonical state dict plus where it came from.

    Attributes:
        state_dict: name -> tensor, wrapper removed, ``module.`` prefix stripped.
        source: the file path, or ``"<state dict>"``.
        wrapper: the container key the tensors were taken from (``None`` for a flat dict).
        alternatives: other tensor dicts found beside it, by wrapper key (e.g. ``params_ema``).
        top_keys: the file's top-level keys, for error messages.
    """

    state_dict: dict[str, Tensor]
    source: str = "<state dict>"
    wrapper: str | None = None
    alternatives: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    top_keys: list[str] = field(default_factory=list)

    def use(self, wrapper: str) -> bool:
        """Switch to another wrapper's tensors if the file has it; True when switched."""
        if wrapper == self.wrapper or wrapper not in self.alternatives:
            return False
        if self.wrapper is not None:
            self.alternatives[self.wrapper] = self.state_dict
        self.state_dict = self.alternatives.pop(wrapper)
        self.wrapper = wrapper
        return True


def read_file(path: str | os.PathLike[str]) -> Any:
    """Read a checkpoint file's top-level object without executing code from it.

    Raises:
        CheckpointError: missing file, unknown extension, truncated/corrupt file, or a pickle that
            asks for anything but tensors and plain containers (it is refused, never run).
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    ext = p.suffix.lower()
    if ext not in SUPPORTED_EXT:
        raise CheckpointError(f"{p.name}: unsupported file type {ext!r}; expected one of {', '.join(SUPPORTED_EXT)}")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p.name}: the file is empty (0 bytes); download it again")
    if ext in SAFETENSORS_EXT:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{p.name}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    try:
        try:
            # mmap: multi-GB Lightning checkpoints are read lazily, so the tensors a loader drops are never copied.
            return torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # only the legacy (pre-zip) format lacks mmap support
                raise
            return torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses globals it does not know: this is where a malicious pickle stops.
        lines = [ln.strip() for ln in str(e).splitlines() if "global" in ln.lower()]
        first = lines[0] if lines else type(e).__name__
        raise CheckpointError(
            f"{p.name}: refused to load: the file asks to run code or build objects that are not tensors "
            f"({first}). Only weights are read (safetensors or torch.load(weights_only=True)); "
            "convert the file to .safetensors from a trusted source."
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{p.name}: could not be read (truncated or corrupt file?): {e}") from e


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and any(isinstance(v, Tensor) for v in obj.values())


def _strip_prefix(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in DATA_PARALLEL_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def canonicalize(obj: Any, source: str = "<state dict>", prefer: str = "params") -> Checkpoint:
    """Find the tensor dict inside a checkpoint object.

    Args:
        obj: what ``read_file`` returned, or a state dict.
        source: a name for messages.
        prefer: wrapper taken when several BasicSR wrappers are present (``params`` like the
            official FeMaSR / MM-RealSR scripts, or ``params_ema``).

    Returns:
        a ``Checkpoint``; the other wrappers' tensors are kept in ``alternatives``.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a dict of tensors, found {type(obj).__name__}")
    top_keys = [str(k) for k in obj.keys()]
    wrappers = {k: obj[k] for k in WRAPPER_KEYS if k in obj and _is_tensor_dict(obj[k])}
    node: Any = obj
    chosen: str | None = None
    if wrappers:
        chosen = prefer if prefer in wrappers else next(iter(wrappers))
        node = wrappers[chosen]
    else:
        # Unwrap single-key dicts ({'model': {...}}) until tensors appear.
        while isinstance(node, Mapping) and len(node) == 1 and not _is_tensor_dict(node):
            chosen, node = next(iter(node.items()))
    if not _is_tensor_dict(node):
        raise CheckpointError(
            f"{source}: no tensors found; top-level keys: {top_keys[:12]}. "
            f"Expected a state dict, or one wrapped in {', '.join(repr(k) for k in WRAPPER_KEYS[:4])}."
        )
    sd = _strip_prefix({str(k): v for k, v in node.items() if isinstance(v, Tensor)})
    alternatives = {
        k: _strip_prefix({str(n): t for n, t in v.items() if isinstance(t, Tensor)})
        for k, v in wrappers.items()
        if k != chosen
    }
    return Checkpoint(sd, source=source, wrapper=chosen, alternatives=alternatives, top_keys=top_keys)


def load_checkpoint(source: str | os.PathLike[str] | Mapping[str, Any], prefer: str = "params") -> Checkpoint:
    """Read a file (or take an in-memory dict) and return its canonical state dict."""
    if isinstance(source, Mapping):
        return canonicalize(source, prefer=prefer)
    return canonicalize(read_file(source), source=Path(source).name, prefer=prefer)
