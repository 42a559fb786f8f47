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
from typing import Sequence, Union

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
    decay_epochs: Union[int, Sequence[int]] = 11,
    warmup_iters: int = 0,
    iters_per_epoch: int = COCO_ITERS_PER_EPOCH,
    warmup_factor: float = 0.001,
):
    """
    Args:
        epochs: length of training.
        decay_epochs: the multiplier is 0.1 from the start of this (0-based) epoch on; a list
            of epochs multiplies it by 0.1 at each (the ViT-L LVIS recipe: [9, 15]).
        warmup_iters: iterations of linear warmup from ``warmup_factor`` (0: none, as the
            authors' R50 and Swin recipes).
        iters_per_epoch: iterations in one epoch.

    Returns:
        a lazy fvcore ParamScheduler of the learning-rate multiplier.
    """
    decay_epochs = [decay_epochs] if isinstance(decay_epochs, int) else list(decay_epochs)
    if not all(0 < e < epochs for e in decay_epochs) or decay_epochs != sorted(decay_epochs):
        raise ValueError(f"decay_epochs={decay_epochs} must increase inside (0, epochs={epochs})")
    total_iters = epochs * iters_per_epoch
    step = L(MultiStepParamScheduler)(
        values=[0.1**i for i in range(len(decay_epochs) + 1)],
        milestones=[e * iters_per_epoch for e in decay_epochs],
        num_updates=total_iters,
    )
    if warmup_iters == 0:
        return step
    return L(WarmupParamScheduler)(
        scheduler=step,
        warmup_factor=warmup_factor,
        warmup_length=warmup_iters / total_iters,
        warmup_method="linear",
    )


lr_multiplier_1x = default_coco_scheduler(epochs=12, decay_epochs=11)
lr_multiplier_2x = default_coco_scheduler(epochs=24, decay_epochs=20)
lr_multiplier_3x = default_coco_scheduler(epochs=36, decay_epochs=30)
lr_multiplier_lvis_1x = default_coco_scheduler(
    epochs=12, decay_epochs=11, iters_per_epoch=LVIS_ITERS_PER_EPOCH
)
