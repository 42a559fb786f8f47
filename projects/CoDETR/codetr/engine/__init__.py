"""
Training, evaluation and inference driven by LazyConfigs.
"""

from .checkpointer import (
    AtomicCheckpointer,
    CheckpointMismatchError,
    atomic_write,
    min_loaded_shares,
)
from .config import LazyPartial, check_training_masks, load_lazy_config, sync_num_classes
from .cpu_runtime import flush_denormals, reuse_freed_memory
from .device import amp_precision, autocast_to, default_device, inference_precision, train_device
from .ema import EMA_WEIGHTS_KEY, ModelEMA, ModelEMAHook, model_ema_enabled
from .hooks import MetricHistory, SkippedImageLimit, StopWithCheckpoint
from .optimizer import add_gradient_clipping, lr_factor
from .predictor import LazyPredictor
from .trainer import DeviceAMPTrainer, LazyConfigTrainer, drop_metrics_from

__all__ = [
    "AtomicCheckpointer",
    "CheckpointMismatchError",
    "DeviceAMPTrainer",
    "EMA_WEIGHTS_KEY",
    "LazyConfigTrainer",
    "LazyPartial",
    "LazyPredictor",
    "MetricHistory",
    "ModelEMA",
    "ModelEMAHook",
    "SkippedImageLimit",
    "StopWithCheckpoint",
    "add_gradient_clipping",
    "amp_precision",
    "atomic_write",
    "autocast_to",
    "default_device",
    "drop_metrics_from",
    "flush_denormals",
    "inference_precision",
    "check_training_masks",
    "load_lazy_config",
    "lr_factor",
    "min_loaded_shares",
    "model_ema_enabled",
    "reuse_freed_memory",
    "sync_num_classes",
    "train_device",
]
