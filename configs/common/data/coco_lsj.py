"""COCO 2017 detection with large-scale jitter to a 1024 square (spec §4, LSJ configs).

Images leave the mapper padded to the square (pad value 114), so the model sees no padding.
"""

from detectron2.config import LazyCall as L

from codetr.data import build_lsj_test_augmentation, build_lsj_train_augmentation

from .coco import dataloader

dataloader.train.mapper.augmentation = L(build_lsj_train_augmentation)(
    image_size=1024, min_scale=0.1, max_scale=2.0
)
dataloader.train.mapper.augmentation_with_crop = None
dataloader.test.mapper.augmentation = L(build_lsj_test_augmentation)(image_size=1024)
