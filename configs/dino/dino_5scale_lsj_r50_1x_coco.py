"""DINO-Deformable-DETR R50, 5 scales, 12 epochs, large-scale jitter at 1024."""

from ..common.data.coco_lsj import dataloader
from .dino_5scale_r50_1x_coco import lr_multiplier, model, optimizer, train

train.output_dir = "./output/dino_5scale_lsj_r50_1x_coco"
dataloader.evaluator.output_dir = "${...train.output_dir}"
