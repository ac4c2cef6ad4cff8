"""Safe reading of checkpoint files and their containers.

Nothing here executes code from a file: ``.safetensors`` go through safetensors, every pickle-based
format (``.pth``, ``.pt``, ``.ckpt``, ``.bin``) through ``torch.load(weights_only=True)``, whose
restricted unpickler refuses any global that is not a plain tensor/container type.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

from .catalog import missing_file_message
from .errors import CheckpointError

SAFETENSORS_EXT = (".safetensors", ".sft")
PICKLE_EXT = (".pth", ".pt", ".ckpt", ".bin")
NCNN_EXT = (".param",)  # an ncnn graph; its weights are the .bin beside it (realsr_core.ncnn)
SUPPORTED_EXT = SAFETENSORS_EXT + PICKLE_EXT + NCNN_EXT

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


# How torch names a refused global ("Trying to load unsupported GLOBAL posix.system ...",
# "Unsupported global: GLOBAL eval was not ...").
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")
# Implementation modules that pickles name instead of the public one (os.system pickles as posix.system).
_MODULE_ALIASES = {"posix": "os", "nt": "os", "__builtin__": "builtins"}
# Modules of the globals a plain weights pickle uses (tensor rebuilding, OrderedDict, bytes).
_WEIGHT_PICKLE_MODULES = ("torch", "collections", "_codecs")
_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING",
                         "STRING"})


def _public_name(name: str) -> str:
    """``posix.system`` -> ``os.system``, ``eval`` -> ``builtins.eval``: the name a user recognises."""
    module, dot, attr = name.partition(".")
    if not dot:
        return f"builtins.{name}"
    return f"{_MODULE_ALIASES.get(module, module)}.{attr}"


def _foreign_global(stream: IO[bytes]) -> str | None:
    """The first global a pickle stream references outside the weight-pickle modules, or None.

    Reads opcodes with ``pickletools.genops`` (a disassembler: nothing is imported or called).  Handles
    ``GLOBAL`` (protocols 0-3, ``"module name"``) and ``STACK_GLOBAL`` (protocol 4+, the two strings
    pushed before it, possibly through the memo).  Scans the consecutive pickles of a legacy torch file.
    """
    for _pickle in range(4):  # legacy torch files: magic number, protocol, sys info, then the object
        memo: dict[int, Any] = {}
        pushed: list[Any] = []
        for op, arg, _pos in pickletools.genops(stream):
            if op.name == "GLOBAL":
                module, _, attr = str(arg).partition(" ")
            elif op.name == "STACK_GLOBAL" and len(pushed) >= 2:
                module, attr = str(pushed[-2]), str(pushed[-1])
            else:
                if op.name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[int(arg)] = pushed[-1] if pushed else None
                elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed.append(memo.get(int(arg)))
                else:
                    pushed.append(arg if op.name in _STRING_OPS else None)
                continue
            if module.split(".")[0] not in _WEIGHT_PICKLE_MODULES:
                return f"{module}.{attr}"
            pushed.append(None)
    return None


def _requested_global(path: Path, message: str) -> str | None:
    """What a refused pickle asked for, as ``module.name``: from torch's message, else from the pickle itself."""
    m = _GLOBAL_RE.search(message)
    if m:
        return _public_name(m.group(1))
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                pkl = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                if pkl is None:
                    return None
                found = _foreign_global(io.BytesIO(z.read(pkl)))  # structure only: storages are other members
        else:
            with open(path, "rb") as f:
                found = _foreign_global(f)
    except Exception:  # a malformed pickle: the refusal stands, only the name is unknown
        return None
    return _public_name(found) if found else None


def _unreadable(p: Path, e: OSError) -> CheckpointError:
    """The error for a file that exists but cannot be opened or read (permissions, I/O)."""
    if isinstance(e, PermissionError):
        return CheckpointError(
            f"{p.name}: permission denied: this process may not read {p}; check the file's permissions"
        )
    return CheckpointError(f"{p.name}: could not be read ({e.strerror or e}): {p}")


def _check_path(p: Path) -> None:
    """Refuse, with a message that says what the path is, anything but a readable, non-empty weights file."""
    if p.is_dir():
        try:
            inside = sorted(c.name for c in p.iterdir() if c.suffix.lower() in SUPPORTED_EXT)
        except OSError:
            inside = []
        more = f" and {len(inside) - 3} more" if len(inside) > 3 else ""
        hint = f"; it contains {', '.join(inside[:3])}{more}" if inside else ""
        raise CheckpointError(
            f"{p}: this is a folder, not a checkpoint file{hint}. Give the path of the weights file itself "
            f"({', '.join(SUPPORTED_EXT)})."
        )
    if not p.exists():
        # An official file: what it is and where to download it; any other: where the official ones are listed.
        raise CheckpointError(missing_file_message(p.name, "cli", [str(p)]))
    if not p.is_file():
        raise CheckpointError(f"{p}: not a regular file (a device, pipe or socket?); expected a checkpoint file")
    ext = p.suffix.lower()
    if ext not in SUPPORTED_EXT:
        raise CheckpointError(f"{p.name}: unsupported file type {ext!r}; expected one of {', '.join(SUPPORTED_EXT)}")
    try:
        with open(p, "rb") as f:
            empty = f.read(1) == b""
    except OSError as e:
        raise _unreadable(p, e) from None
    if empty:
        raise CheckpointError(f"{p.name}: the file is empty (0 bytes); download it again")


def read_file(path: str | os.PathLike[str]) -> Any:
    """Read a checkpoint file's top-level object without executing code from it.

    Raises:
        CheckpointError: missing file, a folder, unreadable (permissions), unknown extension,
            truncated/corrupt file, or a pickle that asks for anything but tensors and plain containers
            (it is refused, never run; the message names what it asked for).
    """
    p = Path(path)
    _check_path(p)
    if p.suffix.lower() in SAFETENSORS_EXT:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except PermissionError as e:
            raise _unreadable(p, e) from None
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{p.name}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    try:
        try:
            # mmap: multi-GB Lightning checkpoints are read lazily, so the tensors a loader drops are never copied.
            # torch.serialization.load, not torch.load: AUTOMATIC1111 replaces torch.load process-wide with a
            # checker that refuses files saved by torch >= 2.1 (their ".format_version" entry) and returns None;
            # weights_only=True is the safe reader already.
            return torch.serialization.load(str(p), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # only the legacy (pre-zip) format lacks mmap support
                raise
            return torch.serialization.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses globals it does not know: this is where a malicious pickle stops.  torch's own
        # message advises ways to load it anyway; it is not passed on (``from None``).
        wanted = _requested_global(p, str(e))
        asks = f"it asks for {wanted}" if wanted else "it asks for objects that are not tensors"
        raise CheckpointError(
            f"{p.name}: not loaded: this file contains Python code ({asks}), which model weights never need. "
            "Only weights are read; use a .safetensors file from the model's authors."
        ) from None
    except PermissionError as e:
        raise _unreadable(p, e) from None
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


def read_tensors(path: str | os.PathLike[str], prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    """The tensors of a checkpoint file whose keys start with one of ``prefixes`` (a Lightning ``state_dict``
    wrapper is looked into); only those are read from a ``.safetensors`` file, and a pickle is memory-mapped,
    so taking the VAE out of a 5 GB Stable Diffusion file reads about 300 MB.

    Raises:
        CheckpointError: as :func:`read_file`.
    """
    p = Path(path)
    _check_path(p)
    if p.suffix.lower() in SAFETENSORS_EXT:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(p), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefixes)}
        except PermissionError as e:
            raise _unreadable(p, e) from None
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{p.name}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    obj = read_file(p)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{p.name}: holds a {type(obj).__name__}, not a dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(k, str) and k.startswith(prefixes) and isinstance(v, Tensor)}


def load_checkpoint(source: str | os.PathLike[str] | Mapping[str, Any], prefer: str = "params") -> Checkpoint:
    """Read a file (or take an in-memory dict) and return its canonical state dict."""
    if isinstance(source, Mapping):
        return canonicalize(source, prefer=prefer)
    if Path(source).suffix.lower() in NCNN_EXT:
        from .ncnn import read_ncnn

        _check_path(Path(source))
        return canonicalize(read_ncnn(source), source=Path(source).name, prefer=prefer)
    return canonicalize(read_file(source), source=Path(source).name, prefer=prefer)
