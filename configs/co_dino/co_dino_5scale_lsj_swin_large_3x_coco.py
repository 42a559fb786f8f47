"""Co-DINO Swin-L, 36 epochs (lr step at 30), LSJ 1280 (60.7 AP in the authors' zoo). Drop
path 0.5: the authors' LSJ 3x config keeps the 2x rate (0.6 with DETR augmentation)."""

from ..common.schedule import COCO_ITERS_PER_EPOCH, lr_multiplier_3x as lr_multiplier
from .co_dino_5scale_lsj_swin_large_1x_coco import dataloader, model, optimizer, train

model.backbone.drop_path_rate = 0.5

train.max_iter = 36 * COCO_ITERS_PER_EPOCH
train.output_dir = "./output/co_dino_5scale_lsj_swin_large_3x_coco"
