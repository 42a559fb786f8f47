"""Co-Deformable-DETR R50, 12 epochs, DETR augmentation (49.5 AP in the authors' zoo).
Sampling offsets and reference points train at x0.1 the base learning rate."""
from functools import partial

from codetr.engine.optimizer import lr_factor

from ..common.data.coco import dataloader
from ..common.optimizer import optimizer
from ..common.schedule import lr_multiplier_1x as lr_multiplier
from ..common.train import train
from ..models.co_deformable_detr_r50 import model

optimizer.params.lr_factor_func = partial(
    lr_factor, backbone_multiplier=0.1, linear_projection_multiplier=0.1
)

train.output_dir = "./output/co_deformable_detr_r50_1x_coco"
dataloader.evaluator.output_dir = "${...train.output_dir}"
