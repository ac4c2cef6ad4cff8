"""MM-RealSR: key detection, configuration inference and the descriptor with the (blur, noise) scores."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ...descriptor import Architecture, ModelDescriptor, StateDict, check_weights, has_all, shape_of
from ...descriptor import count_indexed as _count
from ...errors import InvalidInputError, UnsupportedModelError
from .network import MMRealSRNet

__all__ = ["ARCHITECTURE", "MMRealSRDescriptor", "detect", "infer_config", "load"]

DETECT_KEYS: tuple[str, ...] = (
    "conv_first.weight",
    "conv_body.weight",
    "conv_up1.weight",
    "conv_up2.weight",
    "conv_hr.weight",
    "conv_last.weight",
    "body.0.rdb1.conv1.weight",
    "am_list.0.fc.0.weight",
    "dd_embed.0.weight",
    "de_net.conv_first.0.weight",
    "de_net.fc_degree.0.0.weight",
)
# Every key of the network lives under one of these; anything else in a file is ignored.
_MODEL_PREFIXES = (
    "conv_first.",
    "body.",
    "am_list.",
    "dd_embed.",
    "conv_body.",
    "conv_up1.",
    "conv_up2.",
    "conv_hr.",
    "conv_last.",
    "de_net.",
)
SCORE_NAMES = ("blur", "noise")
DEFAULT_ESTIMATE_MAX_PIXELS = 1024 * 1024
# Peak float32 activation bytes per input pixel.  Measured as peak-RSS growth of a CPU run of the
# released size (num_feat 64): 62 MiB at 128x128, 155 MiB at 256x256, 451 MiB at 512x512, i.e. about
# 1.6 KB per pixel plus ~56 MiB of banded-tail working memory.  The largest maps are now the trunk's
# (the 4x-resolution maps are computed in bands), so the cost scales with num_feat; 40 B per feature
# channel (2.5 KB/px at 64) covers tiles from 256x256 up.
_BYTES_PER_PX_PER_FEAT = 40.0


def detect(state_dict: StateDict) -> bool:
    """True for an MM-RealSR generator state dict (with its degradation estimator and modulation)."""
    return has_all(state_dict, *DETECT_KEYS)


def _infer_estimator(state_dict: StateDict) -> dict[str, Any]:
    """Stage layout of ``de_net.body.0``: residual blocks grouped by the convs that end each stage.

    A stage-closing conv is taken as stride 2 (``downscales`` 2), as in the released model: a stride-1
    channel-changing conv (an official ``downscales`` 1 between stages of different widths) has the
    same weight shape and cannot be told apart from the state dict.
    """
    feat = shape_of(state_dict, "de_net.conv_first.0.weight", "MM-RealSR", ndim=4)[0]
    feats: list[int] = []
    blocks: list[int] = []
    downs: list[int] = []
    n_blocks = 0
    k = 0
    while True:
        prefix = f"de_net.body.0.{k}."
        if prefix + "conv1.weight" in state_dict:
            w = shape_of(state_dict, prefix + "conv1.weight", "MM-RealSR", ndim=4)
            if w[:2] != (feat, feat):
                raise UnsupportedModelError(
                    f"MM-RealSR estimator block {prefix[:-1]} has shape {w}, expected {feat} channels"
                )
            n_blocks += 1
        elif prefix + "weight" in state_dict:
            w = shape_of(state_dict, prefix + "weight", "MM-RealSR", ndim=4)
            if w[1] != feat:
                raise UnsupportedModelError(
                    f"MM-RealSR estimator conv {prefix[:-1]} takes {w[1]} channels, expected {feat}"
                )
            feats.append(feat)
            blocks.append(n_blocks)
            downs.append(2)
            feat, n_blocks = w[0], 0
        else:
            break
        k += 1
    if n_blocks or not feats or feats[-1] != feat:
        feats.append(feat)
        blocks.append(n_blocks)
        downs.append(1)
    # else: the body ends with a same-width stride-2 conv, i.e. a last stage with downscale 2.
    return {
        "de_num_feats": feats,
        "de_num_blocks": blocks,
        "de_downscales": downs,
        "de_hidden_dim": shape_of(state_dict, "de_net.fc_degree.0.0.weight", "MM-RealSR", ndim=2)[0],
    }


def infer_config(state_dict: StateDict) -> dict[str, Any]:
    """Constructor arguments of :class:`MMRealSRNet` from tensor shapes.

    Raises:
        UnsupportedModelError: a scale-2/1 (pixel-unshuffle) variant, a non-RGB model, or a layout
            that does not fit MM-RealSR.
    """
    if not detect(state_dict):
        missing = [k for k in DETECT_KEYS if k not in state_dict]
        raise UnsupportedModelError(f"not an MM-RealSR state dict: missing {missing}")
    num_feat, in_ch = shape_of(state_dict, "conv_first.weight", "MM-RealSR", ndim=4)[:2]
    de_in = shape_of(state_dict, "de_net.conv_first.0.weight", "MM-RealSR", ndim=4)[1]
    if in_ch in (12, 48):
        scale = 2 if in_ch == 12 else 1
        raise UnsupportedModelError(
            f"MM-RealSR x{scale} checkpoint (conv_first takes {in_ch} pixel-unshuffled channels): only the x4 "
            "model is supported; the official x2/x1 variants cannot run (their degradation estimator expects "
            f"{de_in} channels but is given the 3-channel image) and no such weights were released"
        )
    if in_ch != 3 or de_in != 3:
        raise UnsupportedModelError(
            f"MM-RealSR expects RGB input (3 channels), but conv_first takes {in_ch} and the estimator {de_in}"
        )
    embed_dim, num_degradation = shape_of(state_dict, "dd_embed.0.weight", "MM-RealSR", ndim=2)
    if num_degradation != len(SCORE_NAMES) or _count(state_dict, "de_net.conv_first.{}.weight") != num_degradation:
        raise UnsupportedModelError(
            f"MM-RealSR with {num_degradation} degradation scores and "
            f"{_count(state_dict, 'de_net.conv_first.{}.weight')} estimator branches: only 2 (blur, noise) are supported"
        )
    config: dict[str, Any] = {
        "in_channels": in_ch,
        "out_channels": shape_of(state_dict, "conv_last.weight", "MM-RealSR", ndim=4)[0],
        "num_feat": num_feat,
        "num_block": _count(state_dict, "body.{}.rdb1.conv1.weight"),
        "num_grow_ch": shape_of(state_dict, "body.0.rdb1.conv1.weight", "MM-RealSR", ndim=4)[0],
        "num_degradation": num_degradation,
        "embed_dim": embed_dim,
        "am_hidden_dim": shape_of(state_dict, "am_list.0.fc.0.weight", "MM-RealSR", ndim=2)[0],
    }
    config.update(_infer_estimator(state_dict))
    return config


def _check_score(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidInputError(f"{name} must be None (estimate it) or a number in [0, 1], got {value!r}")
    v = float(value)
    if not 0.0 <= v <= 1.0:  # also refuses NaN
        raise InvalidInputError(f"{name} score {v} is outside the allowed range [0, 1]")
    return v


class MMRealSRDescriptor(ModelDescriptor):
    """MM-RealSR x4 with its user-controllable degradation scores.

    The scores ``[blur, noise]`` are whole-image quantities: :meth:`prepare` fixes them once (estimating
    the missing ones on the whole image) and :meth:`forward` then runs every tile with the same scores,
    so tiles are modulated consistently (the official script would estimate per call, i.e. per tile).
    """

    model: MMRealSRNet

    @torch.inference_mode()
    def prepare(
        self,
        image: Tensor,
        blur: float | None = None,
        noise: float | None = None,
        estimate_max_pixels: int = DEFAULT_ESTIMATE_MAX_PIXELS,
    ) -> dict[str, Any]:
        """Fix the degradation scores for a whole image.

        Args:
            image: (B, 3, H, W) in [0, 1].
            blur: general-blur score in [0, 1], or None to estimate it.
            noise: general-noise score (noise and JPEG artefacts) in [0, 1], or None to estimate it.
                Higher scores ask for stronger deblurring / denoising.
            estimate_max_pixels: the estimator runs once on the whole image; above this many pixels it
                runs on an area-downscaled copy of at most that many pixels, to bound its time and
                memory.  Downscaling itself reduces blur and noise, so the estimate on a large image
                can read lower than the official (full-resolution) one.

        Returns:
            ``{"degrees": (B, 2) [blur, noise] float32 scores used, "estimated": (B, 2) float32
            estimator output or None when both scores were given}``, on ``image``'s device.
        """
        b = self._check_image(image)
        scores = (_check_score("blur", blur), _check_score("noise", noise))
        if estimate_max_pixels < 1:
            raise InvalidInputError(f"estimate_max_pixels must be >= 1, got {estimate_max_pixels}")
        if all(s is not None for s in scores):
            degrees = torch.tensor([scores], dtype=torch.float32, device=image.device).expand(b, -1).clone()
            return {"degrees": degrees, "estimated": None}
        x = image.to(device=self.device, dtype=self.dtype)
        h, w = x.shape[-2:]
        if h * w > estimate_max_pixels:
            f = math.sqrt(estimate_max_pixels / (h * w))
            x = F.interpolate(x, size=(max(1, int(h * f)), max(1, int(w * f))), mode="area")
        estimated = self.model.estimate(x).float().to(image.device)
        degrees = estimated.clone()
        for i, s in enumerate(scores):
            if s is not None:
                degrees[:, i] = s
        return {"degrees": degrees, "estimated": estimated}

    @torch.inference_mode()
    def forward(self, x: Tensor, degrees: Tensor | None = None, estimated: Tensor | None = None) -> Tensor:
        """Super-resolve an image or tile with fixed scores.

        Args:
            x: (B, 3, H, W) in [0, 1] on the model's device and dtype.
            degrees: (B, 2) or (2,) [blur, noise] from :meth:`prepare`; None estimates them on ``x``
                itself (the official automatic path).
            estimated: ignored (``prepare`` reports it; accepted so its result can be passed as is).

        Returns:
            (B, 3, 4H, 4W), not clamped.
        """
        self._check_image(x)
        return self.model(x, degrees)

    __call__ = forward

    @torch.inference_mode()
    def official_forward(
        self, x: Tensor, custom_degrees: Sequence[float | None] = (None, None)
    ) -> tuple[Tensor, Tensor]:
        """The official ``MMRRDBNet_test.forward(x, custom_degrees)``: estimate, override, super-resolve.

        Args:
            x: (B, 3, H, W) in [0, 1].
            custom_degrees: (blur, noise); None uses the estimate, a number in [0, 1] replaces it.

        Returns:
            ``(out, degrees_est)``: out (B, 3, 4H, 4W) not clamped; degrees_est (2, B) the estimator's
            scores (row 0 blur, row 1 noise), whatever ``custom_degrees`` says.
        """
        self._check_image(x)
        if len(custom_degrees) != len(SCORE_NAMES):
            raise InvalidInputError(f"custom_degrees must be (blur, noise), got {custom_degrees!r}")
        scores = [_check_score(n, v) for n, v in zip(SCORE_NAMES, custom_degrees, strict=True)]
        estimated = self.model.estimate(x)
        degrees = estimated.clone()
        for i, s in enumerate(scores):
            if s is not None:
                degrees[:, i] = s
        return self.model(x, degrees), estimated.t()

    def _check_image(self, image: Tensor) -> int:
        if not isinstance(image, Tensor) or image.dim() != 4 or image.shape[1] != self.in_channels:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise InvalidInputError(f"{self.name} expects a (B, {self.in_channels}, H, W) image tensor, got {shape}")
        if min(image.shape[-2:]) < self.min_size:
            raise InvalidInputError(
                f"{self.name} needs images of at least {self.min_size}x{self.min_size} pixels, "
                f"got {image.shape[-1]}x{image.shape[-2]}"
            )
        return int(image.shape[0])


def load(state_dict: StateDict) -> MMRealSRDescriptor:
    """Build MM-RealSR x4 from a canonical state dict, inferring its configuration from the shapes.

    Raises:
        UnsupportedModelError: not MM-RealSR x4, or tensors that do not fit the inferred layout.
        CheckpointError: weights that are NaN/inf or not floating point (:func:`check_weights`).
    """
    config = infer_config(state_dict)
    model = MMRealSRNet(**config)
    expected = model.state_dict()
    extra = [k for k in state_dict if k not in expected]
    unknown = [k for k in extra if k.startswith(_MODEL_PREFIXES)]
    missing = [k for k in expected if k not in state_dict]
    if missing or unknown:
        raise UnsupportedModelError(
            "MM-RealSR state dict does not match the inferred layout "
            f"(num_block {config['num_block']}, estimator stages {config['de_num_feats']}): "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unknown[:5]}{'...' if len(unknown) > 5 else ''}"
        )
    check_weights("MM-RealSR", expected, state_dict)
    try:
        model.load_state_dict({k: state_dict[k] for k in expected}, strict=True)
    except RuntimeError as e:
        raise UnsupportedModelError(f"MM-RealSR tensor shapes do not fit the inferred layout: {e}") from e
    model.requires_grad_(False)  # inference only; also lets the fused CPU kernels run with grad mode on
    return MMRealSRDescriptor(
        model,
        arch="mmrealsr",
        name="MM-RealSR x4",
        purpose="SR",
        scale=MMRealSRNet.scale,
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        size_multiple=1,
        min_size=1,
        supports_half=True,
        supports_bf16=True,
        config=config,
        ignored_keys=extra,
        bytes_per_px=_BYTES_PER_PX_PER_FEAT * config["num_feat"],
    )


ARCHITECTURE = Architecture(
    id="mmrealsr",
    name="MM-RealSR",
    detect=detect,
    load=load,
    wrapper_preference="params",
    key_hints=DETECT_KEYS,
)
