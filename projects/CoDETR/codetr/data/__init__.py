"""
Data side of CoDETR: checked dataset loading and the DETR / LSJ dataset mapper. (The synthetic
toy dataset is the separate package ``codetr_toy``.)
"""

from .dataset_checks import MISSING_IMAGES_MODES, load_checked_dataset_dicts, require_registered
from .dataset_mapper import (
    DETR_TRAIN_MIN_SIZES,
    LSJ_PAD_VALUE,
    DetrDatasetMapper,
    build_detr_crop_train_augmentation,
    build_detr_test_augmentation,
    build_detr_train_augmentation,
    build_lsj_test_augmentation,
    build_lsj_train_augmentation,
)
from .metadata import thing_class_count
from .objects365 import OBJECTS365_SPLITS, register_objects365

__all__ = [
    "MISSING_IMAGES_MODES",
    "load_checked_dataset_dicts",
    "require_registered",
    "thing_class_count",
    "OBJECTS365_SPLITS",
    "register_objects365",
    "DETR_TRAIN_MIN_SIZES",
    "LSJ_PAD_VALUE",
    "DetrDatasetMapper",
    "build_detr_crop_train_augmentation",
    "build_detr_test_augmentation",
    "build_detr_train_augmentation",
    "build_lsj_test_augmentation",
    "build_lsj_train_augmentation",
]
