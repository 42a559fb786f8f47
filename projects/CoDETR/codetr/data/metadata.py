"""Class counts from detectron2's dataset metadata, so that a model follows its dataset."""

import logging

from detectron2.data import DatasetCatalog, MetadataCatalog
from omegaconf import DictConfig, ListConfig

from .dataset_checks import explained_json_errors

__all__ = ["thing_class_count", "sync_num_classes"]

logger = logging.getLogger(__name__)


def thing_class_count(dataset_name: str) -> int:
    """
    Number of ``thing_classes`` of a registered dataset. COCO-format datasets registered with
    ``register_coco_instances`` only know their classes once their json is read, so the
    dataset is loaded when the metadata does not have them yet.
    """
    if dataset_name not in DatasetCatalog.list():
        raise KeyError(
            f"Dataset {dataset_name!r} is not registered. Registered: "
            f"{', '.join(sorted(DatasetCatalog.list()))}. Register a COCO-format dataset with "
            f"train_net.py --register-coco NAME JSON IMAGE_ROOT."
        )
    metadata = MetadataCatalog.get(dataset_name)
    if "thing_classes" not in metadata.as_dict():
        with explained_json_errors(dataset_name, is_train=False):
            DatasetCatalog.get(dataset_name)
    if "thing_classes" not in metadata.as_dict():
        raise ValueError(f"Dataset {dataset_name!r} has no thing_classes in its metadata")
    return len(metadata.thing_classes)


def sync_num_classes(cfg: DictConfig, *, eval_only: bool = False) -> None:
    """
    Sets ``cfg.model.query_head.num_classes`` (the one place configs keep the class count;
    every other module reads it from there) to the class count of the dataset the job uses:
    the first training dataset, or the first test dataset with ``eval_only``.
    """
    if "num_classes" not in cfg.model.get("query_head", {}):
        return
    loader = cfg.dataloader.test if eval_only else cfg.dataloader.train
    names = loader.dataset.names
    name = names[0] if isinstance(names, (list, tuple, ListConfig)) else names
    count = thing_class_count(name)
    if cfg.model.query_head.num_classes != count:
        logger.info(
            f"model.query_head.num_classes: {cfg.model.query_head.num_classes} -> {count}, "
            f"the number of thing_classes of {name!r}"
        )
        cfg.model.query_head.num_classes = count
