"""Config-driven, resumable trainer for the pack's super-resolution networks.

A run is described by a TOML file with four sections (see ``configs/crlsr_x4.toml``)::

    [model]  arch = "crlsr" plus the network's constructor arguments
    [data]   split, patch_size (HR), scale, degradation (a name, a list, or a {name = probability} table)
    [train]  steps, batch_size, lr and its schedule, grad_clip, seed, contrastive, ema_decay, intervals, amp, ...
    [eval]   a small fixed validation set: centre crops of the held-out photos, fixed degradations and seed

and trains with ``python -m realsr_core train CONFIG.toml [--out DIR] [--resume] [--steps N] [--device cuda]``.
The output folder holds:

* ``model.safetensors``: the whole module's weights (the EMA copy when ``ema_decay > 0``), with metadata
  ``{"arch", "config" (json), "step"}``; ``realsr_core.load_model`` reads it like any released checkpoint.
* ``state.pt``: everything needed to continue bit-exactly: raw (and EMA) weights, optimizer, scheduler,
  grad scaler, step, and the data / torch / CUDA / numpy / python random states.
* ``train.log`` (human-readable) and ``metrics.jsonl`` (one JSON object per log or eval interval).

Both checkpoint files are written to a temporary file in the same folder and moved into place with
``os.replace``, so an interruption never leaves a half-written model behind.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import RealSRError
from ..files import atomic_write

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
STATE_FORMAT = 1


class ConfigError(RealSRError, ValueError):
    """A training configuration is malformed: unknown section or key, wrong type, unknown name."""


class TrainingError(RealSRError):
    """Training cannot go on (e.g. the loss stays non-finite, or the output folder is already used)."""


# --------------------------------------------------------------------------------------------- builders
# arch name -> a function returning the network's constructor.  The indirection keeps the import lazy and
# lets the config check see the constructor's signature before anything is built.
ModelFactory = Callable[..., nn.Module]
BUILDERS: dict[str, Callable[[], ModelFactory]] = {}


def register_builder(arch: str) -> Callable[[Callable[[], ModelFactory]], Callable[[], ModelFactory]]:
    """Register ``fn`` (no arguments, returns the constructor) as the builder of ``arch``.

    The constructor is called with the ``[model]`` section minus ``arch``; it must return an
    ``nn.Module`` with ``training_losses(lr, hr, *, contrastive) -> dict[str, Tensor]`` (with ``"total"``).
    Its signature names the keys ``[model]`` accepts; an optional ``check_config(section)`` attribute
    checks nested tables when the config is read.
    """

    def deco(fn: Callable[[], ModelFactory]) -> Callable[[], ModelFactory]:
        BUILDERS[arch] = fn
        return fn

    return deco


@register_builder("crlsr")
def _crlsr() -> ModelFactory:
    from dataclasses import fields

    from ..models.crlsr import CRLSR, CRLSRLossConfig

    allowed = [f.name for f in fields(CRLSRLossConfig)]

    def check(cfg: Mapping[str, Any]) -> None:
        losses = cfg.get("losses", {})
        if not isinstance(losses, Mapping):
            raise ConfigError(f"model.losses: expected a table of {', '.join(allowed)}, got {losses!r}")
        for key in losses:
            if key not in allowed:
                raise _unknown("[model.losses] (crlsr)", key, allowed)

    def build(**kwargs: Any) -> nn.Module:
        # TOML gives the loss settings as a [model.losses] table; the network takes a CRLSRLossConfig.
        check(kwargs)
        if "losses" in kwargs:
            kwargs["losses"] = CRLSRLossConfig(**kwargs["losses"])
        return CRLSR(**kwargs)

    build.__signature__ = inspect.signature(CRLSR)  # type: ignore[attr-defined]  # what the config check reads
    build.check_config = check  # type: ignore[attr-defined]
    return build


@register_builder("lway_rec")
def _lway_rec() -> ModelFactory:
    # LWay step 1: the LR-reconstruction branch (E, R) trained on (HR, degraded) pairs.
    from ..models.lway import LWayReconstruction

    return LWayReconstruction


def _constructor_keys(factory: ModelFactory) -> tuple[list[str], bool]:
    """The keyword names ``factory`` accepts, and whether it takes ``**kwargs``."""
    params = inspect.signature(factory).parameters.values()
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"]
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def build_model(model_cfg: Mapping[str, Any]) -> nn.Module:
    """Build the network a ``[model]`` section describes (``arch`` plus constructor arguments)."""
    cfg = dict(model_cfg)
    arch = cfg.pop("arch")
    if arch not in BUILDERS:
        raise ConfigError(f"model.arch: unknown architecture {arch!r}; known: {', '.join(sorted(BUILDERS))}")
    return BUILDERS[arch]()(**cfg)


# --------------------------------------------------------------------------------------------- config
# Every key a section accepts, with its default; the default's type is the key's type (an int is accepted
# where a float is expected).  [model] is open: its keys are checked against the constructor's signature.
DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {
        "split": "train",
        "patch_size": 128,  # HR patch side; the LR patch is patch_size // scale
        "scale": 4,
        "degradation": "classical_iso",  # name | [names] (uniform) | {name = probability}
        "photos": [],  # train on exactly these photo names instead of the split (e.g. a small test set)
    },
    "train": {
        "steps": 20000,
        "batch_size": 16,
        "lr": 1e-4,
        "betas": [0.9, 0.999],  # Adam as in CRL-SR Sec. 4.1
        "eps": 1e-8,
        "weight_decay": 0.0,
        "lr_schedule": "cosine",  # cosine | step | constant
        "lr_min": 1e-6,  # cosine: final learning rate
        "lr_step": 5000,  # step: multiply by lr_gamma every lr_step steps
        "lr_gamma": 0.5,
        "warmup_steps": 0,
        "grad_clip": 0.0,  # max global grad norm; 0 = off
        "seed": 0,
        "contrastive": True,  # passed to training_losses; false = the paper's Table 1 model (a)
        "ema_decay": 0.0,  # 0 = no EMA copy
        "log_every": 50,
        "save_every": 500,
        "eval_every": 1000,  # 0 = no evaluation
        "amp": "auto",  # auto | off | bf16 | fp16 (CUDA only; CPU always trains in float32)
        "num_threads": 0,  # torch CPU threads; 0 = torch's default
    },
    "eval": {
        "degradations": ["classical"],  # "classical" = isotropic kernel `sigma` + noise `noise`; or DEGRADATIONS names
        "sigma": 2.0,
        "noise": 15.0,  # 0..255 units
        "crop": 256,  # HR centre crop side
        "max_photos": 0,  # 0 = every held-out photo
        "seed": 0,
    },
}
SCHEDULES = ("cosine", "step", "constant")
AMP_MODES = ("auto", "off", "bf16", "fp16")


def _type_name(default: Any) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list"}[type(default)]


def _check_value(where: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, list):
        ok = isinstance(value, list)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{where}: expected {_type_name(default)}, got {value!r}")
    return value


def _unknown(where: str, key: str, allowed: Sequence[str]) -> ConfigError:
    return ConfigError(f"{where}: unknown key {key!r}; allowed keys: {', '.join(allowed)}")


def _degradation_names() -> list[str]:
    from .degradations import DEGRADATIONS

    return list(DEGRADATIONS)


def _parse_mix(value: Any) -> dict[str, float]:
    """``data.degradation`` as {name: probability} (probabilities normalised to sum 1)."""
    if isinstance(value, str):
        mix = {value: 1.0}
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        mix = {v: 1.0 for v in value}
    elif isinstance(value, dict) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   for v in value.values()):
        mix = {str(k): float(v) for k, v in value.items()}
    else:
        raise ConfigError("data.degradation: expected a name, a list of names or a {name = probability} table, "
                          f"got {value!r}")
    known = _degradation_names()
    for name, p in mix.items():
        if name not in known:
            raise ConfigError(f"data.degradation: unknown degradation {name!r}; known: {', '.join(known)}")
        if not (p >= 0 and math.isfinite(p)):
            raise ConfigError(f"data.degradation: probability of {name!r} must be >= 0, got {p}")
    total = sum(mix.values())
    if total <= 0:
        raise ConfigError("data.degradation: the probabilities sum to 0")
    return {k: v / total for k, v in mix.items()}


def load_config(source: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Read and check a training configuration; every missing key gets its default.

    Args:
        source: a TOML file, the name of a shipped config (``"crlsr_x4"`` = ``configs/crlsr_x4.toml``),
            or an already parsed dict.

    Returns:
        the full configuration: ``{"model": {...}, "data": {...}, "train": {...}, "eval": {...}}``.

    Raises:
        ConfigError: unknown section or key (the message names it and lists the allowed ones), a value
            of the wrong type or out of range, an unknown architecture or degradation.
    """
    if isinstance(source, Mapping):
        raw: dict[str, Any] = copy.deepcopy(dict(source))
    else:
        path = Path(source)
        if not path.is_file() and (CONFIG_DIR / f"{path.name}.toml").is_file() and path.suffix == "":
            path = CONFIG_DIR / f"{path.name}.toml"
        if not path.is_file():
            shipped = ", ".join(p.stem for p in sorted(CONFIG_DIR.glob("*.toml")))
            raise ConfigError(f"config not found: {path} (shipped configs: {shipped})")
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ModuleNotFoundError as e:
                raise ConfigError("reading TOML needs Python 3.11+ or the 'tomli' package") from e
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from e

    sections = ["model", *DEFAULTS]
    for name in raw:
        if name not in sections:
            raise ConfigError(f"config: unknown section [{name}]; allowed sections: {', '.join(sections)}")
        if not isinstance(raw[name], dict):
            raise ConfigError(f"config: [{name}] must be a table, got {raw[name]!r}")
    cfg: dict[str, Any] = {}
    for name, defaults in DEFAULTS.items():
        section = dict(defaults)
        for key, value in raw.get(name, {}).items():
            if key not in defaults:
                raise _unknown(f"[{name}]", key, list(defaults))
            section[key] = value if (name, key) == ("data", "degradation") else _check_value(f"{name}.{key}", value,
                                                                                              defaults[key])
        cfg[name] = section

    model = dict(raw.get("model", {}))
    arch = model.get("arch")
    if not isinstance(arch, str):
        raise ConfigError(f"[model]: 'arch' is required (one of {', '.join(sorted(BUILDERS))})")
    if arch not in BUILDERS:
        raise ConfigError(f"model.arch: unknown architecture {arch!r}; known: {', '.join(sorted(BUILDERS))}")
    factory = BUILDERS[arch]()
    names, open_kwargs = _constructor_keys(factory)
    if not open_kwargs:
        for key in model:
            if key != "arch" and key not in names:
                raise _unknown(f"[model] ({arch})", key, ["arch", *names])
    if callable(getattr(factory, "check_config", None)):
        factory.check_config(model)
    # The network's scale follows [data] unless given; a contradiction is an error, not a silent choice.
    scale = cfg["data"]["scale"]
    if "scale" in model and model["scale"] != scale:
        raise ConfigError(f"model.scale = {model['scale']} but data.scale = {scale}; they must agree")
    if "scale" in names and "scale" not in model:
        model["scale"] = scale
    cfg["model"] = model

    d, t, e = cfg["data"], cfg["train"], cfg["eval"]
    d["degradation"] = _parse_mix(d["degradation"])
    if d["split"] not in ("train", "heldout"):
        raise ConfigError(f"data.split: expected 'train' or 'heldout', got {d['split']!r}")
    if d["photos"]:
        from .data import HELDOUT, photo_names

        available = photo_names()
        for name in d["photos"]:
            if name not in available:
                raise ConfigError(f"data.photos: unknown or unavailable photo {name!r}; available: "
                                  f"{', '.join(available)}")
            if name in HELDOUT and d["split"] == "train":
                raise ConfigError(f"data.photos: {name!r} is a held-out evaluation photo and is never trained on")
    if scale < 1 or d["patch_size"] % scale or d["patch_size"] < scale:
        raise ConfigError(f"data.patch_size ({d['patch_size']}) must be a positive multiple of data.scale ({scale})")
    for key in ("steps", "batch_size", "log_every", "save_every"):
        if t[key] < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {t[key]}")
    if t["eval_every"] < 0 or t["num_threads"] < 0 or t["warmup_steps"] < 0 or t["lr_step"] < 1:
        raise ConfigError("train.eval_every, num_threads and warmup_steps must be >= 0 and lr_step >= 1")
    if t["lr_schedule"] not in SCHEDULES:
        raise ConfigError(f"train.lr_schedule: expected one of {', '.join(SCHEDULES)}, got {t['lr_schedule']!r}")
    if t["amp"] not in AMP_MODES:
        raise ConfigError(f"train.amp: expected one of {', '.join(AMP_MODES)}, got {t['amp']!r}")
    if not 0.0 <= t["ema_decay"] < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1), got {t['ema_decay']}")
    if len(t["betas"]) != 2 or not all(isinstance(b, (int, float)) for b in t["betas"]):
        raise ConfigError(f"train.betas: expected two numbers, got {t['betas']!r}")
    t["betas"] = [float(b) for b in t["betas"]]
    known = _degradation_names()
    for name in e["degradations"]:
        if name != "classical" and name not in known:
            raise ConfigError(f"eval.degradations: unknown {name!r}; use 'classical' or one of {', '.join(known)}")
    if e["crop"] < scale or e["max_photos"] < 0:
        raise ConfigError(f"eval.crop must be >= data.scale and eval.max_photos >= 0, got {e['crop']}, "
                          f"{e['max_photos']}")
    return {"model": cfg.pop("model"), **cfg}


# --------------------------------------------------------------------------------------------- pieces
def lr_factor(step: int, train_cfg: Mapping[str, Any]) -> float:
    """Learning-rate multiplier after ``step`` completed steps (warm-up, then the schedule)."""
    warm = train_cfg["warmup_steps"]
    if warm and step < warm:
        return (step + 1) / warm
    kind = train_cfg["lr_schedule"]
    if kind == "constant":
        return 1.0
    if kind == "step":
        return train_cfg["lr_gamma"] ** (step // train_cfg["lr_step"])
    span = max(train_cfg["steps"] - warm, 1)
    progress = min(max(step - warm, 0) / span, 1.0)
    floor = train_cfg["lr_min"] / train_cfg["lr"] if train_cfg["lr"] > 0 else 0.0
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class DegradationMix:
    """Applies a random degradation per sample, drawn from ``{name: probability}``.

    Samples that drew the same degradation are degraded together, so the batched pipelines stay batched.
    """

    def __init__(self, mix: Mapping[str, float], scale: int) -> None:
        from .degradations import DEGRADATIONS

        self.names = list(mix)
        self.fns = [DEGRADATIONS[n] for n in self.names]
        self.probs = torch.tensor([mix[n] for n in self.names], dtype=torch.float64)
        self.scale = scale

    def __call__(self, hr: Tensor, generator: torch.Generator) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, H/scale, W/scale) in [0, 1]."""
        if len(self.fns) == 1:
            return self.fns[0](hr, self.scale, generator)
        choice = torch.multinomial(self.probs, hr.shape[0], replacement=True, generator=generator)
        out: Tensor | None = None
        for i, fn in enumerate(self.fns):
            idx = (choice == i).nonzero().flatten()
            if idx.numel() == 0:
                continue
            lr = fn(hr[idx.to(hr.device)], self.scale, generator)
            if out is None:
                out = lr.new_empty((hr.shape[0], *lr.shape[1:]))
            out[idx.to(hr.device)] = lr
        assert out is not None
        return out


@dataclass
class EvalItem:
    setting: str
    photo: str
    lr: Tensor  # (1, 3, h, w) in [0, 1]
    hr: Tensor  # (1, 3, h*s, w*s) in [0, 1]


def build_eval_set(eval_cfg: Mapping[str, Any], scale: int) -> list[EvalItem]:
    """The fixed validation set: centre crops of the held-out photos, each degraded once with a fixed seed.

    Each setting gets its own generator seeded with ``eval.seed``, so adding a setting or a photo list
    change never alters the LR images of another setting.
    """
    from .data import photos
    from .degradations import DEGRADATIONS, classical

    held = photos("heldout")
    if eval_cfg["max_photos"]:
        held = held[: eval_cfg["max_photos"]]
    items: list[EvalItem] = []
    for setting in eval_cfg["degradations"]:
        g = torch.Generator().manual_seed(eval_cfg["seed"])
        for name, img in held:
            h, w = img.shape[-2:]
            side = min(eval_cfg["crop"], h, w) // scale * scale
            top, left = (h - side) // 2, (w - side) // 2
            hr = img[None, :, top:top + side, left:left + side].contiguous()
            if setting == "classical":
                lr = classical(hr, scale, sigma=eval_cfg["sigma"], noise=eval_cfg["noise"], generator=g)
            else:
                lr = DEGRADATIONS[setting](hr, scale, g)
            items.append(EvalItem(setting, name, lr.clamp(0, 1), hr))
    return items


@torch.no_grad()
def evaluate(model: nn.Module, items: Sequence[EvalItem], scale: int, device: torch.device) -> dict[str, float]:
    """Mean PSNR-Y / SSIM-Y (border ``scale`` cropped) per setting: ``{"psnr_y/<setting>": dB, ...}``.

    A network that is not an SR model (``model(lr)`` is not an upscaled image) defines
    ``eval_metrics(lr, hr) -> {name: value}`` instead; those are averaged per setting as ``"<name>/<setting>"``.
    """
    from .metrics import psnr_y, ssim_y

    custom = getattr(model, "eval_metrics", None)
    was_training = model.training
    model.eval()
    sums: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    try:
        for it in items:
            if callable(custom):
                values = custom(it.lr.to(device), it.hr.to(device))
            else:
                sr = model(it.lr.to(device)).float().clamp(0, 1).cpu()
                values = {"psnr_y": float(psnr_y(sr, it.hr, crop_border=scale).mean()),
                          "ssim_y": float(ssim_y(sr, it.hr, crop_border=scale).mean())}
            acc = sums.setdefault(it.setting, {})
            for k, v in values.items():
                acc[k] = acc.get(k, 0.0) + v
            counts[it.setting] = counts.get(it.setting, 0) + 1
    finally:
        model.train(was_training)
    return {f"{k}/{setting}": v / counts[setting] for setting, acc in sums.items() for k, v in acc.items()}


def bicubic_baseline(items: Sequence[EvalItem], scale: int) -> dict[str, float]:
    """PSNR-Y of plain bicubic upsampling on the validation set, the floor a model must beat."""
    from .metrics import psnr_y

    sums: dict[str, list[float]] = {}
    for it in items:
        up = F.interpolate(it.lr, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)
        acc = sums.setdefault(it.setting, [0.0, 0.0])
        acc[0] += float(psnr_y(up, it.hr, crop_border=scale).mean())
        acc[1] += 1
    return {f"psnr_y/{k}": p / n for k, (p, n) in sums.items()}


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` for float parameters; buffers are copied."""
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        if e.dtype.is_floating_point:
            e.lerp_(p.detach(), 1.0 - decay)
        else:
            e.copy_(p)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


# --------------------------------------------------------------------------------------------- files
def save_weights(path: str | os.PathLike[str], state_dict: Mapping[str, Tensor], metadata: Mapping[str, str]) -> None:
    """Write ``state_dict`` as safetensors (atomically) with string ``metadata``."""
    from safetensors.torch import save

    # clone: safetensors refuses tensors that share storage (tied weights, views).
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    blob = save(tensors, metadata={k: str(v) for k, v in metadata.items()})
    atomic_write(path, lambda f: f.write(blob))


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata of a safetensors file (``arch``, ``config``, ``step`` for trainer outputs)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _rng_state(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "data": generator.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": list(_tuples_to_lists(random.getstate())),
    }


def _tuples_to_lists(obj: Any) -> Any:
    return [_tuples_to_lists(o) for o in obj] if isinstance(obj, (tuple, list)) else obj


def _lists_to_tuples(obj: Any) -> Any:
    return tuple(_lists_to_tuples(o) for o in obj) if isinstance(obj, list) else obj


def _set_rng_state(state: Mapping[str, Any], generator: torch.Generator, device: torch.device) -> None:
    generator.set_state(state["data"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_lists_to_tuples(state["python"]))


# --------------------------------------------------------------------------------------------- progress
class TrainProgress:
    """A one-line text progress bar with the loss on stderr (no dependency), plus full log lines.

    On a terminal the bar is redrawn at most 4 times a second; elsewhere (a log file) only the full
    lines are written, so the file does not fill with carriage returns.
    """

    def __init__(self, total: int, start: int, stream: TextIO | None = None) -> None:
        self.total, self.start_step, self.stream = total, start, stream or sys.stderr
        self.t0 = self.last_draw = time.perf_counter()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.drawn = False

    def rate(self, step: int) -> float:
        return (step - self.start_step) / max(time.perf_counter() - self.t0, 1e-9)

    def update(self, step: int, loss: float, lr: float) -> None:
        now = time.perf_counter()
        if not self.tty or (now - self.last_draw < 0.25 and step < self.total):
            return
        self.last_draw = now
        width = 24
        filled = int(width * step / max(self.total, 1))
        rate = self.rate(step)
        eta = (self.total - step) / rate if rate > 0 else 0.0
        self.stream.write(f"\rtrain [{'#' * filled}{'.' * (width - filled)}] {step}/{self.total} loss {loss:.4f} "
                          f"lr {lr:.2e} {rate:.2f} it/s eta {_hms(eta)} ")
        self.stream.flush()
        self.drawn = True

    def line(self, text: str) -> None:
        if self.drawn:
            self.stream.write("\r\033[K")
            self.drawn = False
        self.stream.write(text + "\n")
        self.stream.flush()


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class _StopRequest:
    """Turns the first Ctrl-C into a request honoured at the next step boundary (a second one aborts).

    Stopping between steps keeps model, optimizer and step counter consistent in the saved checkpoint.
    Outside the main thread no handler can be installed; a KeyboardInterrupt is then caught by the loop.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# --------------------------------------------------------------------------------------------- trainer
@dataclass
class TrainResult:
    """What a call to :func:`train` did.

    Attributes:
        step: steps completed (the checkpoint's step).
        out_dir: the run folder; ``model_path`` is its ``model.safetensors``.
        stopped: ``"done"`` (reached the total), ``"interrupted"`` (Ctrl-C), ``"time"`` (``max_minutes``)
            or ``"stop_at"``.
        last_eval: the last evaluation's metrics (empty when none ran).
    """

    step: int
    out_dir: Path
    model_path: Path
    stopped: str
    last_eval: dict[str, float] = field(default_factory=dict)


class Trainer:
    """One training run in one output folder (see the module docstring for the files it writes)."""

    def __init__(
        self,
        config: Mapping[str, Any] | str | os.PathLike[str],
        out_dir: str | os.PathLike[str],
        *,
        steps: int | None = None,
        device: str | torch.device | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.cfg = load_config(config)
        if steps is not None:
            if steps < 1:
                raise ConfigError(f"--steps must be >= 1, got {steps}")
            self.cfg["train"]["steps"] = int(steps)
        self.out = Path(out_dir)
        self.device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise TrainingError("device 'cuda' requested but CUDA is not available")
        self.stream = stream or sys.stderr
        t = self.cfg["train"]
        self.scale = self.cfg["data"]["scale"]

        self.amp_dtype: torch.dtype | None = None
        if self.device.type == "cuda" and t["amp"] != "off":
            if t["amp"] == "bf16" or (t["amp"] == "auto" and torch.cuda.is_bf16_supported()):
                self.amp_dtype = torch.bfloat16
            else:
                self.amp_dtype = torch.float16

        self.generator = torch.Generator().manual_seed(t["seed"])
        torch.manual_seed(t["seed"])  # model initialisation and any randomness inside the losses
        self.model = build_model(self.cfg["model"]).to(self.device).train()
        if not callable(getattr(self.model, "training_losses", None)):
            raise ConfigError(f"model.arch {self.cfg['model']['arch']!r}: the network has no training_losses()")
        # Randomness inside the losses (e.g. sampled contrastive positions) comes from the data generator
        # when the network accepts one, so a seed fixes it independently of the device.
        self.loss_kwargs: dict[str, Any] = {"contrastive": t["contrastive"]}
        if "generator" in inspect.signature(self.model.training_losses).parameters:
            self.loss_kwargs["generator"] = self.generator
        self.ema: nn.Module | None = None
        if t["ema_decay"] > 0:
            self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=t["lr"], betas=tuple(t["betas"]), eps=t["eps"],
                                          weight_decay=t["weight_decay"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, self.cfg["train"]))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.step = 0
        self.last_eval: dict[str, float] = {}

    # ----------------------------------------------------------------- checkpoint
    @property
    def model_path(self) -> Path:
        return self.out / "model.safetensors"

    @property
    def state_path(self) -> Path:
        return self.out / "state.pt"

    def save(self) -> None:
        """Write ``model.safetensors`` then ``state.pt``, each atomically."""
        self.out.mkdir(parents=True, exist_ok=True)
        weights = (self.ema if self.ema is not None else self.model).state_dict()
        meta = {"arch": self.cfg["model"]["arch"], "config": json.dumps(self.cfg), "step": str(self.step),
                "ema": str(self.ema is not None).lower()}
        save_weights(self.model_path, weights, meta)
        state = {
            "format": STATE_FORMAT,
            "step": self.step,
            "config": json.dumps(self.cfg),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(self.generator, self.device),
            "last_eval": self.last_eval,
        }

        def write(f: BinaryIO) -> None:
            buf = io.BytesIO()
            torch.save(state, buf)
            f.write(buf.getbuffer())

        atomic_write(self.state_path, write)

    def load_state(self) -> None:
        """Continue from ``state.pt``: weights, optimizer, scheduler, scaler, step and random states."""
        if not self.state_path.is_file():
            raise TrainingError(f"--resume: no {self.state_path.name} in {self.out}")
        state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        if state.get("format") != STATE_FORMAT:
            raise TrainingError(f"{self.state_path}: unknown state format {state.get('format')!r}")
        saved = json.loads(state["config"])
        if saved["model"] != self.cfg["model"]:
            diff = sorted(k for k in set(saved["model"]) | set(self.cfg["model"])
                          if saved["model"].get(k) != self.cfg["model"].get(k))
            raise TrainingError(f"--resume: the [model] section differs from the checkpoint's (keys {diff}); "
                                "the saved weights would not fit")
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            # Switching EMA on while resuming starts the average from the current weights.
            self.ema.load_state_dict(state["ema"] if state["ema"] is not None else state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"], self.generator, self.device)
        self.step = int(state["step"])
        self.last_eval = dict(state.get("last_eval") or {})

    # ----------------------------------------------------------------- logging
    def _log(self, record: Mapping[str, Any], text: str, progress: TrainProgress) -> None:
        progress.line(text)
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        with open(self.out / "train.log", "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")

    def _truncate_metrics(self) -> None:
        """On resume, drop records written after the checkpoint by the run that was cut off."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return
        keep = [ln for ln in path.read_text(encoding="utf-8").splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
        path.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def _eval(self, items: list[EvalItem], progress: TrainProgress) -> None:
        # fork_rng: evaluation must not shift the training random streams (bit-exact resume).
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            self.last_eval = evaluate(self.ema if self.ema is not None else self.model, items, self.scale,
                                      self.device)
        text = " ".join(f"{k} {v:.4f}" if k.startswith("ssim") else f"{k} {v:.2f}" for k, v in self.last_eval.items())
        self._log({"step": self.step, "kind": "eval", **self.last_eval}, f"eval step {self.step}: {text}", progress)

    # ----------------------------------------------------------------- loop
    def _batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        from .data import PatchDataset

        d = self.cfg["data"]
        dataset = PatchDataset(split=d["split"], patch_size=d["patch_size"], scale=self.scale,
                               names=d["photos"] or None)
        degrade = DegradationMix(d["degradation"], self.scale)
        batch_size = self.cfg["train"]["batch_size"]
        while True:
            hr = dataset.batch(batch_size, self.generator).to(self.device, non_blocking=True)
            lr = degrade(hr, self.generator).clamp(0, 1)
            yield lr, hr

    def run(
        self,
        *,
        resume: bool = False,
        stop_at: int | None = None,
        max_minutes: float | None = None,
    ) -> TrainResult:
        """Train until ``train.steps`` (or ``stop_at``, or ``max_minutes``, or Ctrl-C); save and return.

        Args:
            resume: continue from ``out_dir/state.pt``; without it an existing ``state.pt`` is an error
                (a run is never overwritten silently).
            stop_at: stop after this step this time (the schedule still spans ``train.steps``), e.g. to
                train across sessions.
            max_minutes: stop after this much training time, saving a checkpoint.
        """
        t = self.cfg["train"]
        total = t["steps"]
        if not resume and self.state_path.exists():
            raise TrainingError(f"{self.out} already holds a run ({self.state_path.name}); pass --resume to continue "
                                "it or choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        threads = torch.get_num_threads()
        if t["num_threads"]:
            torch.set_num_threads(t["num_threads"])
        try:
            if resume:
                self.load_state()
                self._truncate_metrics()
            else:
                for name in ("metrics.jsonl", "train.log"):
                    (self.out / name).unlink(missing_ok=True)
            (self.out / "config.json").write_text(json.dumps(self.cfg, indent=1) + "\n", encoding="utf-8")
            return self._loop(total, stop_at, max_minutes)
        finally:
            torch.set_num_threads(threads)

    def _loop(self, total: int, stop_at: int | None, max_minutes: float | None) -> TrainResult:
        t = self.cfg["train"]
        progress = TrainProgress(total, self.step, self.stream)
        n_params = sum(p.numel() for p in self.model.parameters())
        amp = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]
        self._log({"step": self.step, "kind": "start", "device": str(self.device), "amp": amp, "params": n_params},
                  f"{'resuming at' if self.step else 'starting'} step {self.step}/{total}: "
                  f"{self.cfg['model']['arch']} {n_params / 1e6:.2f}M params on {self.device} (amp {amp}), "
                  f"batch {t['batch_size']}, HR patch {self.cfg['data']['patch_size']}", progress)
        items: list[EvalItem] = []
        if t["eval_every"]:
            items = build_eval_set(self.cfg["eval"], self.scale)
            if not callable(getattr(self.model, "eval_metrics", None)):  # not an SR model: no bicubic floor
                base = bicubic_baseline(items, self.scale)
                self._log({"step": self.step, "kind": "bicubic", **base},
                          "bicubic: " + " ".join(f"{k} {v:.2f}" for k, v in base.items()), progress)
        end = total if stop_at is None else min(total, stop_at)
        deadline = None if max_minutes is None else time.perf_counter() + 60.0 * max_minutes
        sums: dict[str, float] = {}
        count = bad = 0
        stopped = "done"
        batches = self._batches()
        last_saved = self.step if self.state_path.exists() else -1
        with _StopRequest() as stop:
            try:
                while self.step < end:
                    if stop.requested:
                        stopped = "interrupted"
                        break
                    if deadline is not None and time.perf_counter() > deadline:
                        stopped = "time"
                        break
                    lr_img, hr = next(batches)
                    with self._autocast():
                        losses = self.model.training_losses(lr_img, hr, **self.loss_kwargs)
                    loss = losses["total"]
                    self.optimizer.zero_grad(set_to_none=True)
                    if not torch.isfinite(loss):
                        # Skip the update; a run that keeps producing NaN is stopped rather than saved.
                        bad += 1
                        if bad >= 10:
                            raise TrainingError(f"step {self.step + 1}: the loss is not finite 10 times in a row "
                                                f"({ {k: float(v) for k, v in losses.items()} }); lower train.lr")
                        continue
                    bad = 0
                    self.scaler.scale(loss).backward()
                    if t["grad_clip"] > 0:
                        self.scaler.unscale_(self.optimizer)
                        gnorm = float(nn.utils.clip_grad_norm_(self.model.parameters(), t["grad_clip"]))
                        sums["grad_norm"] = sums.get("grad_norm", 0.0) + gnorm
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.scheduler.step()
                    self.step += 1
                    if self.ema is not None:
                        # Early on the average would be dominated by the random initialisation: ramp the decay.
                        ema_update(self.ema, self.model, min(t["ema_decay"], (1 + self.step) / (10 + self.step)))

                    for k, v in losses.items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach())
                    count += 1
                    lr_now = self.optimizer.param_groups[0]["lr"]
                    progress.update(self.step, sums["total"] / count, lr_now)
                    if self.step % t["log_every"] == 0 or self.step == end:
                        means = {k: v / count for k, v in sums.items()}
                        rate = progress.rate(self.step)
                        self._log({"step": self.step, "kind": "train", "lr": lr_now, "it_s": rate, **means},
                                  f"step {self.step}/{total} " + " ".join(f"{k} {v:.4f}" for k, v in means.items())
                                  + f" lr {lr_now:.2e} {rate:.2f} it/s", progress)
                        sums, count = {}, 0
                    if items and (self.step % t["eval_every"] == 0 or self.step == total):
                        self._eval(items, progress)
                    if self.step % t["save_every"] == 0:
                        self.save()
                        last_saved = self.step
            except KeyboardInterrupt:
                # Reached outside the main thread or on a second Ctrl-C; the step in flight is abandoned.
                stopped = "interrupted"
        if stopped == "done" and stop_at is not None and self.step < total:
            stopped = "stop_at"
        if last_saved != self.step:
            self.save()
        self._log({"step": self.step, "kind": "stop", "reason": stopped},
                  f"stopped ({stopped}) at step {self.step}/{total}; saved {self.model_path}", progress)
        return TrainResult(self.step, self.out, self.model_path, stopped, dict(self.last_eval))


def train(
    config: Mapping[str, Any] | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    steps: int | None = None,
    device: str | torch.device | None = None,
    stop_at: int | None = None,
    max_minutes: float | None = None,
    stream: TextIO | None = None,
) -> TrainResult:
    """Train a model from a config; see :class:`Trainer` and :meth:`Trainer.run`.

    Args:
        config: a TOML path, a shipped config name (``"crlsr_x4"``) or a dict.
        out_dir: the run folder (``model.safetensors``, ``state.pt``, ``train.log``, ``metrics.jsonl``).
        resume: continue from ``out_dir/state.pt``.
        steps: overrides ``train.steps`` (the total, which the cosine schedule spans).
        device: ``"cpu"``, ``"cuda"``, ... (default: CUDA when available).
        stop_at, max_minutes: stop early this time, saving a checkpoint.
        stream: where the progress bar and log lines go (stderr by default).
    """
    return Trainer(config, out_dir, steps=steps, device=device, stream=stream).run(
        resume=resume, stop_at=stop_at, max_minutes=max_minutes)
