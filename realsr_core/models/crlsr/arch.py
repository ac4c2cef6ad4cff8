"""CRL-SR: key detection, configuration inference from tensor shapes, and the descriptor.

A CRL-SR file is either a training checkpoint (the whole :class:`CRLSR`, so training can resume) or an
inference one (only ``encoder_lr.`` and ``refine.``).  Both load the same way: the descriptor's model is
the inference-only network, and every other tensor (the training-only parts) is listed in
``ignored_keys`` without being loaded.
"""

from __future__ import annotations

import torch

from ...descriptor import (
    Architecture,
    ModelDescriptor,
    StateDict,
    check_layout,
    check_weights,
    has_all,
    own_weight,
    shape_of,
)
from ...descriptor import count_indexed as _count
from ...errors import UnsupportedModelError
from .network import CRLSR, INFERENCE_PREFIXES, SCALES

__all__ = ["ARCHITECTURE", "DETECT_KEYS", "detect", "has_training_parts", "infer_config", "load"]

DETECT_KEYS: tuple[str, ...] = (
    "encoder_lr.head.weight",
    "encoder_lr.tail.weight",
    "refine.conv_body.weight",
    "refine.upsample.0.weight",
)
# Keys of the training-only parts that size them (proj_dim, ef_feat, ef_blocks).
_TRAINING_SIZE_KEYS: tuple[str, ...] = (
    "encoder_hr.head.weight",
    "proj_lr.2.weight",
    "proj_hr.2.weight",
    "feat_extractor.head.weight",
    "proj_feat.2.weight",
    "decoder_rec.conv2.weight",
)
# Peak float32 activation bytes per *input* pixel of one forward call, measured as peak-RSS growth on
# CPU (glibc mmap threshold 64 KiB so RSS tracks live tensors; 192x192 and 256x256 inputs, num_feat
# 32/64/96, x2 and x4): num_feat * (8 + 2 * scale^2) + 11 * scale^2 bytes within 3% (2.76 KB at x4,
# num_feat 64; the peak is in D_ref's upsampler).  A 1.25 margin covers other allocators and devices.
def _bytes_per_px(num_feat: int, scale: int) -> float:
    """Estimated peak float32 activation bytes per input pixel (see above)."""
    return 1.25 * (num_feat * (8 + 2 * scale * scale) + 12 * scale * scale)


def detect(state_dict: StateDict) -> bool:
    """True for a CRL-SR state dict (training or inference-only)."""
    return has_all(state_dict, *DETECT_KEYS)


def has_training_parts(state_dict: StateDict) -> bool:
    """True when the file also holds the training-only parts (a resumable training checkpoint)."""
    return has_all(state_dict, *_TRAINING_SIZE_KEYS)


def _infer_scale(state_dict: StateDict, num_feat: int) -> int:
    """The scale from the upsampler: intermediate x2 stages (conv to ``4 * num_feat``) and a last stage
    whose conv outputs ``3 * r^2`` channels for its pixel-shuffle factor ``r``."""
    n = _count(state_dict, "refine.upsample.{}.weight")
    shapes = [shape_of(state_dict, f"refine.upsample.{i}.weight", "CRL-SR", ndim=4) for i in range(n)]
    for i, s in enumerate(shapes[:-1]):
        if s[:2] != (4 * num_feat, num_feat):
            raise UnsupportedModelError(
                f"CRL-SR upsampler stage {i} has weight shape {s}, expected ({4 * num_feat}, {num_feat}, 3, 3)"
            )
    out, inp = shapes[-1][:2]
    r = round((out / 3) ** 0.5)
    scale = 2 ** (n - 1) * r
    if inp != num_feat or 3 * r * r != out or scale not in SCALES:
        raise UnsupportedModelError(
            f"CRL-SR upsampler with {n} stage(s) ending in a conv of shape {shapes[-1]} is not a x2/x3/x4 layout"
        )
    return scale


def infer_config(state_dict: StateDict) -> dict[str, int]:
    """Constructor arguments of :class:`CRLSR` from tensor shapes.

    Returns:
        ``scale``, ``num_feat``, ``enc_blocks``, ``ref_blocks``; plus ``proj_dim``, ``ef_feat`` and
        ``ef_blocks`` when the training-only parts are present (:func:`has_training_parts`).

    Raises:
        UnsupportedModelError: not CRL-SR, or shapes that do not fit its layout.
    """
    if not detect(state_dict):
        missing = [k for k in DETECT_KEYS if k not in state_dict]
        raise UnsupportedModelError(f"not a CRL-SR state dict: missing {missing}")
    num_feat, head_in = shape_of(state_dict, "encoder_lr.head.weight", "CRL-SR", ndim=4)[:2]
    scale = _infer_scale(state_dict, num_feat)
    if head_in != 3 * scale * scale:
        raise UnsupportedModelError(
            f"CRL-SR encoder_lr.head takes {head_in} channels, but the upsampler is x{scale} "
            f"(an RGB encoder at x{scale} takes {3 * scale * scale}); the file mixes layouts"
        )
    config = {
        "scale": scale,
        "num_feat": num_feat,
        "enc_blocks": _count(state_dict, "encoder_lr.body.{}.conv1.weight"),
        "ref_blocks": _count(state_dict, "refine.body.{}.conv1.weight"),
    }
    if has_training_parts(state_dict):
        config.update(
            proj_dim=shape_of(state_dict, "proj_lr.2.weight", "CRL-SR", ndim=2)[0],
            ef_feat=shape_of(state_dict, "feat_extractor.head.weight", "CRL-SR", ndim=4)[0],
            ef_blocks=_count(state_dict, "feat_extractor.body.{}.conv1.weight"),
        )
    return config


def load(state_dict: StateDict) -> ModelDescriptor:
    """Build the CRL-SR inference network from a canonical state dict, inferring its configuration.

    Only ``encoder_lr.`` and ``refine.`` tensors are loaded (strictly); every other key (the training-only
    ``encoder_hr.``, ``proj_lr.``, ``proj_hr.``, ``feat_extractor.``, ``proj_feat.``, ``decoder_rec.``, or
    anything else) is listed in ``ignored_keys``.

    Raises:
        UnsupportedModelError: not CRL-SR, or tensors that do not fit the inferred layout.
        CheckpointError: weights that are NaN/inf or not floating point (:func:`check_weights`).
    """
    config = infer_config(state_dict)
    with torch.device("meta"):  # no random init: every tensor comes from the checkpoint
        model = CRLSR(**config, training_parts=False)
    expected = model.state_dict()
    ignored = [k for k in state_dict if not k.startswith(INFERENCE_PREFIXES)]
    unknown = [k for k in state_dict if k.startswith(INFERENCE_PREFIXES) and k not in expected]
    layout = (f"x{config['scale']}, num_feat {config['num_feat']}, {config['enc_blocks']} encoder / "
              f"{config['ref_blocks']} refinement blocks")
    check_layout("CRL-SR", layout, expected, state_dict, unknown)
    check_weights("CRL-SR", expected, state_dict)
    model.load_state_dict({k: own_weight(state_dict[k]) for k in expected}, strict=True, assign=True)
    model.requires_grad_(False)  # inference only; also lets the fused CPU kernels run with grad mode on
    scale = config["scale"]
    return ModelDescriptor(
        model,
        arch="crlsr",
        name=f"CRL-SR x{scale}",
        purpose="SR",
        scale=scale,
        size_multiple=1,
        min_size=1,
        supports_half=True,
        supports_bf16=True,
        config=config,
        ignored_keys=ignored,
        bytes_per_px=_bytes_per_px(config["num_feat"], scale),
    )


ARCHITECTURE = Architecture(
    id="crlsr",
    name="CRL-SR",
    detect=detect,
    load=load,
    wrapper_preference="params",
    key_hints=DETECT_KEYS,
)

