"""Test-time adaptation of SR models: LWay self-supervised fine-tuning (:mod:`realsr_core.adapt.lway`)."""

from .lway import (
    FinetuneResult,
    finetune,
    haar_dwt2,
    hf_weight_map,
    lway_loss,
    select_parameters,
    self_supervised_loss,
)

__all__ = [
    "FinetuneResult",
    "finetune",
    "haar_dwt2",
    "hf_weight_map",
    "lway_loss",
    "select_parameters",
    "self_supervised_loss",
]
