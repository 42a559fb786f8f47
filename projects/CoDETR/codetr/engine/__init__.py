"""
Training, evaluation and inference driven by LazyConfigs.
"""

from .checkpointer import AtomicCheckpointer, atomic_write
from .cpu_runtime import flush_denormals, reuse_freed_memory
from .optimizer import add_gradient_clipping, lr_factor
from .predictor import LazyPredictor
from .trainer import (
    DeviceAMPTrainer,
    LazyConfigTrainer,
    amp_precision,
    autocast_to,
    default_device,
    inference_precision,
    load_lazy_config,
    train_device,
)

__all__ = [
    "AtomicCheckpointer",
    "DeviceAMPTrainer",
    "LazyConfigTrainer",
    "LazyPredictor",
    "add_gradient_clipping",
    "amp_precision",
    "atomic_write",
    "autocast_to",
    "default_device",
    "flush_denormals",
    "inference_precision",
    "load_lazy_config",
    "lr_factor",
    "reuse_freed_memory",
    "train_device",
]
