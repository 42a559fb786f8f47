"""Co-DINO Swin-L, 36 epochs (lr step at 30), drop path 0.6, DETR augmentation (60.0 AP in the
authors' zoo)."""

from ..common.schedule import COCO_ITERS_PER_EPOCH, lr_multiplier_3x as lr_multiplier
from .co_dino_5scale_swin_large_1x_coco import dataloader, model, optimizer, train

model.backbone.drop_path_rate = 0.6

train.max_iter = 36 * COCO_ITERS_PER_EPOCH
train.output_dir = "./output/co_dino_5scale_swin_large_3x_coco"
