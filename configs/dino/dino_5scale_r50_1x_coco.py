"""DINO-Deformable-DETR R50, 5 scales, 12 epochs, DETR augmentation: the base detector of
Co-DINO (spec §2-§4). Start from ImageNet weights with
``train.init_checkpoint=/path/to/resnet50-torchvision.pth`` (see README)."""

from ..common.data.coco import dataloader
from ..common.optimizer import optimizer
from ..common.schedule import lr_multiplier_1x as lr_multiplier
from ..common.train import train
from ..models.dino_r50 import model

train.output_dir = "./output/dino_5scale_r50_1x_coco"
dataloader.evaluator.output_dir = "${...train.output_dir}"
