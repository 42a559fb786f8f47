"""Co-Deformable-DETR Swin-T, 36 epochs (lr step at 30), drop path 0.3, DETR augmentation
(54.1 AP in the authors' zoo)."""

from ..common.schedule import COCO_ITERS_PER_EPOCH, lr_multiplier_3x as lr_multiplier
from .co_deformable_detr_swin_tiny_1x_coco import dataloader, model, optimizer, train

model.backbone.drop_path_rate = 0.3

train.max_iter = 36 * COCO_ITERS_PER_EPOCH
train.output_dir = "./output/co_deformable_detr_swin_tiny_3x_coco"
