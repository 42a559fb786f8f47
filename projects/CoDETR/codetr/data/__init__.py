"""
Data side of CoDETR: checked dataset loading, the DETR / LSJ dataset mapper and the synthetic
toy dataset.

Importing this package registers the toy datasets "codetr_toy_train" and "codetr_toy_val"
(cheap: their files are generated on first use, see ``toy_dataset``).
"""

from .dataset_checks import MISSING_IMAGES_MODES, load_checked_dataset_dicts
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
from .toy_dataset import (
    TOY_DATASET_SPLITS,
    TOY_THING_CLASSES,
    ToySplit,
    default_toy_root,
    ensure_toy_dataset,
    generate_toy_dataset,
    register_toy_datasets,
)

__all__ = [
    "MISSING_IMAGES_MODES",
    "load_checked_dataset_dicts",
    "thing_class_count",
    "DETR_TRAIN_MIN_SIZES",
    "LSJ_PAD_VALUE",
    "DetrDatasetMapper",
    "build_detr_crop_train_augmentation",
    "build_detr_test_augmentation",
    "build_detr_train_augmentation",
    "build_lsj_test_augmentation",
    "build_lsj_train_augmentation",
    "TOY_DATASET_SPLITS",
    "TOY_THING_CLASSES",
    "ToySplit",
    "default_toy_root",
    "ensure_toy_dataset",
    "generate_toy_dataset",
    "register_toy_datasets",
]

register_toy_datasets()
