"""Co-DINO R50 on LVIS v1, 5 scales, 12 epochs, DETR augmentation: the COCO recipe of
``co_dino_5scale_r50_1x_coco.py`` with 1203 classes (read from the dataset), repeat-factor
sampling (threshold 1e-3) and ``LVISEvaluator``. The authors' file of this name does not build
(its train dataset lacks a ``type``); this is what it describes.

An epoch here is 6261 iterations of 16 images (the LVIS v1 train images); the authors'
repeated dataset makes their epoch longer: raise ``train.max_iter`` (and the schedule follows)
to match it.
"""

from ..common.data.lvis import dataloader
from ..common.schedule import LVIS_ITERS_PER_EPOCH, lr_multiplier_lvis_1x as lr_multiplier
from .co_dino_5scale_r50_1x_coco import model, optimizer, train

model.query_head.num_classes = 1203

train.max_iter = 12 * LVIS_ITERS_PER_EPOCH
train.checkpointer.period = LVIS_ITERS_PER_EPOCH
train.eval_period = LVIS_ITERS_PER_EPOCH
train.output_dir = "./output/co_dino_5scale_r50_1x_lvis"
dataloader.evaluator.output_dir = "${...train.output_dir}"
