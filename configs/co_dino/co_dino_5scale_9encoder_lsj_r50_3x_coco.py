"""Co-DINO R50 with 9 encoder layers, 36 epochs (lr step at 30), LSJ 1024 (55.4 AP)."""
from ..common.schedule import COCO_ITERS_PER_EPOCH, lr_multiplier_3x as lr_multiplier
from .co_dino_5scale_9encoder_lsj_r50_1x_coco import dataloader, model, optimizer, train

train.max_iter = 36 * COCO_ITERS_PER_EPOCH
train.output_dir = "./output/co_dino_5scale_9encoder_lsj_r50_3x_coco"
