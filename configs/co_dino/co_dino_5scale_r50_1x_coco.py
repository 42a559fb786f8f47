"""Co-DINO R50, 5 scales, 12 epochs, DETR augmentation (52.1 AP in the authors' zoo).
The first 4 encoder layers use activation checkpointing, as in the authors' config."""

from ..common.data.coco import dataloader
from ..common.optimizer import optimizer
from ..common.schedule import lr_multiplier_1x as lr_multiplier
from ..common.train import train
from ..models.co_dino_r50 import model

model.query_head.encoder.num_checkpointed_layers = 4

train.output_dir = "./output/co_dino_5scale_r50_1x_coco"
dataloader.evaluator.output_dir = "${...train.output_dir}"
