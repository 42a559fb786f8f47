"""COCO 2017 detection with the DETR augmentation recipe (spec §4): train2017 / val2017.

Expects detectron2's builtin COCO layout under $DETECTRON2_DATASETS (default "datasets").
The evaluator is ``codetr.evaluation.COCOEvaluator``: detectron2's (same arguments), scoring
the bbox task with the predicted ``box_scores`` where there are any (Co-DINO-Inst's box scores;
masks are scored with ``scores``, as the authors). It writes nothing by default; set
``dataloader.evaluator.output_dir`` to keep its predictions.

Datasets are loaded with ``codetr.data.load_checked_dataset_dicts``, which checks the json
files and that every listed image exists: a missing image stops the run before it starts,
unless ``dataloader.train.dataset.missing_images=drop`` (or ``.test``) drops them with a
warning.
"""

from omegaconf import OmegaConf

from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, build_detection_train_loader

from codetr.data import (
    DetrDatasetMapper,
    build_detr_crop_train_augmentation,
    build_detr_test_augmentation,
    build_detr_train_augmentation,
    load_checked_dataset_dicts,
)
from codetr.evaluation import COCOEvaluator

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(load_checked_dataset_dicts)(
        names="coco_2017_train", is_train=True, filter_empty=False, missing_images="error"
    ),
    mapper=L(DetrDatasetMapper)(
        is_train=True,
        augmentation=L(build_detr_train_augmentation)(),
        augmentation_with_crop=L(build_detr_crop_train_augmentation)(),
        image_format="RGB",
    ),
    total_batch_size=16,
    num_workers=4,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(load_checked_dataset_dicts)(
        names="coco_2017_val", is_train=False, filter_empty=False, missing_images="error"
    ),
    mapper=L(DetrDatasetMapper)(
        is_train=False,
        augmentation=L(build_detr_test_augmentation)(min_size=800, max_size=1333),
        image_format="RGB",
    ),
    num_workers=4,
)

dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    output_dir=None,
)
