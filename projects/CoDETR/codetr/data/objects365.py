"""Objects365 v2 as COCO-format datasets: ``objects365_v2_train`` and ``objects365_v2_val``."""

import os
from typing import Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

__all__ = ["OBJECTS365_SPLITS", "register_objects365"]

# name -> (json file, image folder), relative to the dataset root
OBJECTS365_SPLITS = {
    "objects365_v2_train": ("annotations/zhiyuan_objv2_train.json", "train"),
    "objects365_v2_val": ("annotations/zhiyuan_objv2_val.json", "val"),
}


def register_objects365(root: Optional[str] = None) -> None:
    """
    Registers the Objects365 v2 splits (365 classes, read from the json files when a split is
    first loaded) under ``root``, by default ``$DETECTRON2_DATASETS/objects365``
    (``$DETECTRON2_DATASETS`` defaults to "datasets"):

        objects365/annotations/zhiyuan_objv2_{train,val}.json
        objects365/{train,val}/...   (the image paths inside the json files are relative here)

    Nothing is read here; registering again replaces the previous registration.
    """
    if root is None:
        root = os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "objects365")
    for name, (json_file, image_folder) in OBJECTS365_SPLITS.items():
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(
            name, {}, os.path.join(root, json_file), os.path.join(root, image_folder)
        )
