"""Inference checkpoints: the model without its training-only auxiliary branch."""

from typing import Dict

from torch import Tensor

__all__ = ["TRAINING_ONLY_PREFIXES", "is_training_only", "inference_state_dict"]

# CoDETR parameters used only in training (and by the auxiliary eval_modules): the auxiliary
# heads, the extra feature level they see, and the positive-query projections.
TRAINING_ONLY_PREFIXES = ("aux_heads.", "aux_extra_level.", "positive_queries.")


def is_training_only(key: str) -> bool:
    """Whether a CoDETR state-dict key belongs to the auxiliary branch."""
    return key.startswith(TRAINING_ONLY_PREFIXES)


def inference_state_dict(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The state dict without the auxiliary branch: it loads strictly into the same config
    with ``model.aux_heads=[] model.positive_queries=None`` and gives the same ``detr``
    output."""
    return {k: v for k, v in state_dict.items() if not is_training_only(k)}
