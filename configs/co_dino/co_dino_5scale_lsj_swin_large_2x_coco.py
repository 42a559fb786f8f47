"""Co-DINO Swin-L, 24 epochs (lr step at 20), drop path 0.5, LSJ 1280 (60.4 AP in the authors'
zoo)."""

from ..common.schedule import COCO_ITERS_PER_EPOCH, lr_multiplier_2x as lr_multiplier
from .co_dino_5scale_lsj_swin_large_1x_coco import dataloader, model, optimizer, train

model.backbone.drop_path_rate = 0.5

train.max_iter = 24 * COCO_ITERS_PER_EPOCH
train.output_dir = "./output/co_dino_5scale_lsj_swin_large_2x_coco"
