"""
Learning-rate schedules of the authors' recipe: a constant rate, times 0.1 from a decay epoch
on (mmdet ``lr_config = dict(policy='step', step=[decay_epoch])``, no warmup), counted in
iterations of a total batch of 16 images.

The schedulers are fvcore ParamSchedulers that the trainer reads at the fraction
``iteration / train.max_iter`` of training: pair ``lr_multiplier_Nx`` with
``train.max_iter = N_epochs * COCO_ITERS_PER_EPOCH`` (a shorter ``max_iter`` compresses the
whole schedule).
"""

import math

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

COCO_TRAIN_IMAGES = 118287
LVIS_V1_TRAIN_IMAGES = 100170
TOTAL_BATCH_SIZE = 16
# 7393: the last, incomplete batch of an epoch counts.
COCO_ITERS_PER_EPOCH = math.ceil(COCO_TRAIN_IMAGES / TOTAL_BATCH_SIZE)
# 6261 iterations: an epoch of the LVIS v1 train images. With repeat-factor sampling an epoch
# of the authors' (mmdet's ClassBalancedDataset) holds sum(ceil(r_i)) images, more than this.
LVIS_ITERS_PER_EPOCH = math.ceil(LVIS_V1_TRAIN_IMAGES / TOTAL_BATCH_SIZE)


def default_coco_scheduler(
    epochs: int = 12,
    decay_epochs: int = 11,
    warmup_iters: int = 0,
    iters_per_epoch: int = COCO_ITERS_PER_EPOCH,
):
    """
    Args:
        epochs: length of training.
        decay_epochs: the multiplier is 0.1 from the start of this (0-based) epoch on.
        warmup_iters: iterations of linear warmup from 0.001 (0: none, as the authors).
        iters_per_epoch: iterations in one epoch.

    Returns:
        a lazy fvcore ParamScheduler of the learning-rate multiplier.
    """
    if not 0 < decay_epochs < epochs:
        raise ValueError(f"decay_epochs={decay_epochs} must lie inside (0, epochs={epochs})")
    total_iters = epochs * iters_per_epoch
    step = L(MultiStepParamScheduler)(
        values=[1.0, 0.1],
        milestones=[decay_epochs * iters_per_epoch],
        num_updates=total_iters,
    )
    if warmup_iters == 0:
        return step
    return L(WarmupParamScheduler)(
        scheduler=step,
        warmup_factor=0.001,
        warmup_length=warmup_iters / total_iters,
        warmup_method="linear",
    )


lr_multiplier_1x = default_coco_scheduler(epochs=12, decay_epochs=11)
lr_multiplier_2x = default_coco_scheduler(epochs=24, decay_epochs=20)
lr_multiplier_3x = default_coco_scheduler(epochs=36, decay_epochs=30)
lr_multiplier_lvis_1x = default_coco_scheduler(
    epochs=12, decay_epochs=11, iters_per_epoch=LVIS_ITERS_PER_EPOCH
)
