"""Class counts from detectron2's dataset metadata."""

import logging

from detectron2.data import DatasetCatalog, MetadataCatalog

from .dataset_checks import explained_json_errors, require_registered

__all__ = ["thing_class_count"]

logger = logging.getLogger(__name__)


def thing_class_count(dataset_name: str) -> int:
    """
    Number of ``thing_classes`` of a registered dataset. COCO-format datasets registered with
    ``register_coco_instances`` only know their classes once their json is read, so the
    dataset is loaded when the metadata does not have them yet.
    """
    require_registered(dataset_name)
    metadata = MetadataCatalog.get(dataset_name)
    if "thing_classes" not in metadata.as_dict():
        with explained_json_errors(dataset_name, is_train=False):
            DatasetCatalog.get(dataset_name)
    if "thing_classes" not in metadata.as_dict():
        raise ValueError(f"Dataset {dataset_name!r} has no thing_classes in its metadata")
    return len(metadata.thing_classes)
