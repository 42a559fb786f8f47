"""Co-Deformable-DETR Swin-B, 36 epochs (lr step at 30), drop path 0.4, DETR augmentation
(57.5 AP in the authors' zoo)."""

from ..common.schedule import COCO_ITERS_PER_EPOCH, lr_multiplier_3x as lr_multiplier
from .co_deformable_detr_swin_base_1x_coco import dataloader, model, optimizer, train

model.backbone.drop_path_rate = 0.4

train.max_iter = 36 * COCO_ITERS_PER_EPOCH
train.output_dir = "./output/co_deformable_detr_swin_base_3x_coco"
