"""
Where and in what precision a model of a LazyConfig runs: the device of ``cfg.train.device`` and
the autocast precision of training (``cfg.train.amp``) and inference (``cfg.train.inference_amp``).
Shared by the trainer and the predictor.
"""

from typing import Optional

import torch
from detectron2.config import instantiate
from omegaconf import DictConfig

__all__ = [
    "AMP_PRECISIONS",
    "amp_precision",
    "autocast_to",
    "default_device",
    "inference_precision",
    "train_device",
]

# the autocast precisions by name
AMP_PRECISIONS = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def amp_precision(name: str, device: torch.device) -> torch.dtype:
    """
    The autocast dtype named by ``name``, "float16", "bfloat16" or "auto" (float16 on CUDA,
    bfloat16 on other devices, where float16 autocast is slow or missing).
    """
    if name == "auto":
        name = "float16" if device.type == "cuda" else "bfloat16"
    if name not in AMP_PRECISIONS:
        raise ValueError(f"AMP precision must be 'auto', 'float16' or 'bfloat16', got {name!r}")
    return AMP_PRECISIONS[name]


def autocast_to(device_type: str, precision: Optional[torch.dtype]) -> torch.autocast:
    """``torch.autocast`` on ``device_type`` in ``precision``; a disabled one when None."""
    return torch.autocast(device_type, dtype=precision, enabled=precision is not None)


def inference_precision(cfg: DictConfig) -> Optional[torch.dtype]:
    """
    The autocast dtype of inference on ``train_device(cfg)`` by ``cfg.train.inference_amp``
    (``enabled``, ``precision`` as in :func:`amp_precision`); None when it is not enabled.
    """
    amp = cfg.train.inference_amp
    if not amp.enabled:
        return None
    try:
        return amp_precision(amp.precision, train_device(cfg))
    except ValueError as e:
        raise ValueError(f"cfg.train.inference_amp.precision: {e}") from None


def default_device() -> str:
    """
    The device to train on when the config does not name one: CUDA when a GPU is
    visible, else ``"cpu"``. Configs call it lazily (``L(default_device)()``) so that the
    choice is made on the machine that runs the config, not on the one that wrote it.
    """
    return "cuda" if torch.cuda.is_available() else "cpu"


def train_device(cfg: DictConfig) -> torch.device:
    """
    The device of ``cfg.train.device``: a device string or a lazy call that returns one.
    """
    return torch.device(instantiate(cfg.train.device))
