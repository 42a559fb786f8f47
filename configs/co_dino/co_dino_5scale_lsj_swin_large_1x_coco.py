"""Co-DINO Swin-L, 5 scales, 12 epochs, large-scale jitter at 1280 (the authors' Swin-L LSJ
size; 1024 for R50) for training and test (59.3 AP in the authors' zoo). LSJ here is box-only:
the authors' config also pastes objects between images (copy-paste, which needs masks)."""

from ..common.data.coco_lsj import dataloader
from .co_dino_5scale_swin_large_1x_coco import lr_multiplier, model, optimizer, train

IMAGE_SIZE = 1280

dataloader.train.mapper.augmentation.image_size = IMAGE_SIZE
dataloader.test.mapper.augmentation.image_size = IMAGE_SIZE

train.output_dir = "./output/co_dino_5scale_lsj_swin_large_1x_coco"
dataloader.evaluator.output_dir = "${...train.output_dir}"
