"""The synthetic toy shapes dataset (``codetr_toy``) at its native 160 x 160 size, registered
when this file is loaded (under ``$CODETR_DATASETS/codetr_toy``).

Train: flip + short side in 144..176 (no crop branch: the toy run is a few CPU-minutes).
Test: short side 160, i.e. the native size. Small batches, one loader worker (2-core machine).
The evaluator's dataset name goes through ``ensure_toy_dataset``, which generates the files
(under $CODETR_DATASETS/codetr_toy) before ``COCOEvaluator`` reads the json; it accepts any
registered dataset, so ``dataloader.{train,test}.dataset.names`` and
``dataloader.evaluator.dataset_name`` may name your own (``train_net.py --register-coco``).
The toy dataset has 5 classes (``codetr_toy.TOY_THING_CLASSES``): set model.num_classes.
"""

from detectron2.config import LazyCall as L

from codetr.data import build_detr_test_augmentation, build_detr_train_augmentation
from codetr_toy import ensure_toy_dataset, register_toy_datasets

from .coco import dataloader

register_toy_datasets()

dataloader.train.dataset.names = "codetr_toy_train"
dataloader.train.mapper.augmentation = L(build_detr_train_augmentation)(
    min_sizes=(144, 160, 176), max_size=320
)
dataloader.train.mapper.augmentation_with_crop = None
dataloader.train.total_batch_size = 4
dataloader.train.num_workers = 1

dataloader.test.dataset.names = "codetr_toy_val"
dataloader.test.mapper.augmentation = L(build_detr_test_augmentation)(min_size=160, max_size=320)
dataloader.test.num_workers = 1

dataloader.evaluator.dataset_name = L(ensure_toy_dataset)(name="${...test.dataset.names}")
