"""Objects365 v2 detection (365 classes) with the DETR augmentation recipe, registered when
this file is loaded from COCO-format json files under ``$DETECTRON2_DATASETS/objects365``
(``codetr.data.register_objects365`` gives the layout); evaluated with ``COCOEvaluator``."""

from codetr.data import register_objects365

from .coco import dataloader

register_objects365()

dataloader.train.dataset.names = "objects365_v2_train"
dataloader.test.dataset.names = "objects365_v2_val"
