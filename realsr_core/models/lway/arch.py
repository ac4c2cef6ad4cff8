"""LWay LR-reconstruction branch: key detection, configuration inference from shapes, and the descriptor.

The file is what the trainer writes for ``arch = "lway_rec"`` (the whole :class:`LWayReconstruction`,
``encoder.`` and ``reconstructor.`` keys).  It is not an image-to-image model: the descriptor's purpose
is ``"Module"`` and its model is passed to ``realsr_core.adapt.lway.finetune`` as the reconstruction.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...descriptor import Architecture, ModelDescriptor, StateDict, check_layout, check_weights, has_all, shape_of
from ...descriptor import count_indexed as _count
from ...errors import UnsupportedModelError
from .network import LWayConfig, LWayReconstruction

__all__ = ["ARCHITECTURE", "DETECT_KEYS", "LWayDescriptor", "detect", "infer_config", "load"]

DETECT_KEYS: tuple[str, ...] = (
    "encoder.conv_first.weight",
    "encoder.conv_body.weight",
    "encoder.down.0.weight",
    "encoder.mlp.0.weight",
    "reconstructor.conv_first.weight",
    "reconstructor.conv_hr.weight",
    "reconstructor.conv_last.weight",
)
_PREFIXES = ("encoder.", "reconstructor.")


def detect(state_dict: StateDict) -> bool:
    """True for an LWay reconstruction state dict (E and R)."""
    return has_all(state_dict, *DETECT_KEYS)


def infer_config(state_dict: StateDict) -> dict[str, Any]:
    """Constructor arguments of :class:`LWayReconstruction` from tensor shapes.

    Returns:
        ``embed_dim``, ``enc_feat``, ``enc_blocks``, ``enc_channels`` (list), ``mlp_layers``, ``rec_feat``,
        ``rec_blocks``, ``noise``, ``unshuffle``, ``kernel_size``, ``scale`` (0, 0 for a reconstructor without
        the predicted-kernel base path).

    Raises:
        UnsupportedModelError: not this layout, or shapes that contradict each other.
    """
    if not detect(state_dict):
        missing = [k for k in DETECT_KEYS if k not in state_dict]
        raise UnsupportedModelError(f"not an LWay reconstruction state dict: missing {missing}")
    enc_feat, enc_in = shape_of(state_dict, "encoder.conv_first.weight", "LWay", ndim=4)[:2]
    rec_feat, rec_in = shape_of(state_dict, "reconstructor.conv_first.weight", "LWay", ndim=4)[:2]
    unshuffle = round((enc_in / 3) ** 0.5)
    if enc_in != 3 * unshuffle * unshuffle or rec_in != enc_in:
        raise UnsupportedModelError(
            f"LWay first convs take {enc_in} (E) and {rec_in} (R) channels; both must be 3 * f^2 for one "
            "space-to-depth factor f"
        )
    n_down = _count(state_dict, "encoder.down.{}.weight")
    n_mlp = _count(state_dict, "encoder.mlp.{}.weight")
    rec_blocks = _count(state_dict, "reconstructor.blocks.{}.modconv.weight")
    embed_dim = shape_of(state_dict, f"encoder.mlp.{n_mlp - 1}.weight", "LWay", ndim=4)[0]
    config = {
        "embed_dim": embed_dim,
        "enc_feat": enc_feat,
        "enc_blocks": _count(state_dict, "encoder.body.{}.conv1.weight"),
        "enc_channels": [shape_of(state_dict, f"encoder.down.{i}.weight", "LWay", ndim=4)[0]
                         for i in range(n_down)],
        "mlp_layers": n_mlp,
        "rec_feat": rec_feat,
        "rec_blocks": rec_blocks,
        "noise": rec_blocks > 0 and "reconstructor.blocks.0.noise_strength" in state_dict,
        "unshuffle": unshuffle,
        "kernel_size": 0,
        "scale": 0,
    }
    if "reconstructor.kernel_head.weight" in state_dict:
        taps = shape_of(state_dict, "reconstructor.kernel_head.weight", "LWay", ndim=2)[0]
        config["kernel_size"] = round(taps**0.5)
        if "reconstructor.base_scale" not in state_dict or config["kernel_size"] ** 2 != taps:
            raise UnsupportedModelError(f"LWay reconstructor kernel head has {taps} outputs (expected a square "
                                        "number) or no base_scale: an incomplete or foreign file")
        # The scale is read from a value, not a shape: refuse a non-scalar or non-finite one first.
        shape_of(state_dict, "reconstructor.base_scale", "LWay", ndim=0)
        check_weights("LWay", {"reconstructor.base_scale": torch.empty((), device="meta")}, state_dict)
        config["scale"] = int(round(float(state_dict["reconstructor.base_scale"])))
    if rec_blocks:
        style = shape_of(state_dict, "reconstructor.blocks.0.modconv.style.weight", "LWay", ndim=2)
        if style != (config["rec_feat"], embed_dim):
            raise UnsupportedModelError(
                f"LWay reconstructor style layer has shape {style}, but E's embedding has {embed_dim} values and "
                f"R {config['rec_feat']} channels: E and R do not belong together"
            )
    try:
        LWayConfig(**config)
    except ValueError as e:
        raise UnsupportedModelError(f"LWay state dict gives an invalid configuration: {e}") from e
    return config


class LWayDescriptor(ModelDescriptor):
    """The LWay reconstruction branch (E and R); ``model`` is an :class:`LWayReconstruction`."""

    model: LWayReconstruction

    def forward(self, x: Tensor, **context: Any) -> Tensor:  # type: ignore[override]
        """``R(x, E(lr_up))``: ``context`` must hold ``lr_up`` (B, 3, H, W), the upsampled degraded image."""
        if "lr_up" not in context:
            raise TypeError("the LWay reconstruction needs lr_up=(B, 3, H, W), the degraded image at x's size")
        return self.model(x, context["lr_up"])

    __call__ = forward


def load(state_dict: StateDict) -> LWayDescriptor:
    """Build the LWay reconstruction branch from a canonical state dict, inferring its configuration.

    Every ``encoder.``/``reconstructor.`` tensor must fit (strict); other keys are listed in ``ignored_keys``.

    Raises:
        UnsupportedModelError: not this layout, or tensors that do not fit the inferred one.
        CheckpointError: weights that are NaN/inf or not floating point (:func:`check_weights`).
    """
    config = infer_config(state_dict)
    with torch.device("meta"):  # no random init: every tensor comes from the checkpoint
        model = LWayReconstruction(**config)
    expected = model.state_dict()
    ignored = [k for k in state_dict if not k.startswith(_PREFIXES)]
    unknown = [k for k in state_dict if k.startswith(_PREFIXES) and k not in expected]
    check_layout("LWay", str(config), expected, state_dict, unknown)
    check_weights("LWay", expected, state_dict)
    owned = {k: state_dict[k].detach().to(device="cpu", dtype=torch.float32, copy=True) for k in expected}
    model.load_state_dict(owned, strict=True, assign=True)
    model.eval().requires_grad_(False)  # a frozen module in step 2
    return LWayDescriptor(
        model,
        arch="lway",
        name="LWay LR reconstruction",
        purpose="Module",
        scale=1,
        size_multiple=1,
        min_size=1,
        supports_half=True,
        supports_bf16=True,
        config=config,
        ignored_keys=ignored,
        bytes_per_px=8.0 * 4 * config["rec_feat"],  # rough: ~8 float32 maps of R's width per pixel
    )


ARCHITECTURE = Architecture(
    id="lway",
    name="LWay LR reconstruction",
    detect=detect,
    load=load,
    wrapper_preference="params",
    key_hints=DETECT_KEYS,
)
