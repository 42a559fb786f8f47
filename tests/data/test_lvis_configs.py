"""
The LVIS configs on a small LVIS-format dataset made here from the toy shapes: repeat-factor
sampling of the training images and the evaluator's settings. (Scoring against hand-computed
APs: ``tests/evaluation/test_lvis_evaluation.py``.)
"""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_lvis_instances

from codetr_toy import generate_toy_dataset

CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs"
# "v1" in the name: detectron2 gives it the LVIS v1 metadata (1203 classes; ids 1-5 are ours)
NAME = "mini_lvis_v1_val"


@pytest.fixture(scope="module")
def mini_lvis(tmp_path_factory):
    """12 toy images as an LVIS v1 json (the fields LVIS's API and detectron2's loader read;
    the toy shapes have no masks: their boxes stand as polygons)."""
    root = str(tmp_path_factory.mktemp("lvis"))
    coco = json.load(open(generate_toy_dataset(root, split="val", num_images=12, seed=5)))
    for image in coco["images"]:
        image.update(
            coco_url=f"http://images/val/{image['file_name']}",
            neg_category_ids=[],
            not_exhaustive_category_ids=[],
        )
    for annotation in coco["annotations"]:
        x, y, w, h = annotation["bbox"]
        annotation["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    for category in coco["categories"]:
        images = {a["image_id"] for a in coco["annotations"] if a["category_id"] == category["id"]}
        category.update(
            frequency="f", synset=category["name"], image_count=len(images), instance_count=1
        )
    json_file = os.path.join(root, "mini_lvis_v1_val.json")
    with open(json_file, "w") as f:
        json.dump(coco, f)
    if NAME in DatasetCatalog.list():
        DatasetCatalog.remove(NAME)
        MetadataCatalog.remove(NAME)
    register_lvis_instances(NAME, {}, json_file, root + os.sep)
    yield coco
    DatasetCatalog.remove(NAME)
    MetadataCatalog.remove(NAME)


def _config(name):
    cfg = LazyConfig.load(str(CONFIG_ROOT / "co_dino" / name))
    cfg.dataloader.train.dataset.names = NAME
    cfg.dataloader.test.dataset.names = NAME
    return cfg


@pytest.mark.parametrize(
    "name", ["co_dino_5scale_r50_1x_lvis.py", "co_dino_5scale_lsj_r50_1x_lvis.py"]
)
def test_training_images_repeat_by_their_rarest_class(mini_lvis, name):
    cfg = _config(name)
    # the authors' threshold 1e-3 repeats no image of a 12-image set: a higher one does
    cfg.dataloader.train.sampler.repeat_factors.repeat_thresh = 1.0
    sampler = instantiate(cfg.dataloader.train.sampler)
    images = {image["id"]: i for i, image in enumerate(mini_lvis["images"])}
    classes_per_image = [set() for _ in images]
    for annotation in mini_lvis["annotations"]:
        classes_per_image[images[annotation["image_id"]]].add(annotation["category_id"])
    frequency = {
        c["id"]: sum(c["id"] in s for s in classes_per_image) / len(images)
        for c in mini_lvis["categories"]
    }
    expected = [
        max([1.0] + [math.sqrt(1.0 / frequency[c]) for c in classes])
        for classes in classes_per_image
    ]
    # detectron2 orders the dataset by image id, as the json does here
    factors = sampler._int_part + sampler._frac_part
    torch.testing.assert_close(factors, torch.tensor(expected, dtype=factors.dtype))
    assert factors.max() > 1.0


def test_lvis_evaluator_keeps_1000_detections_per_image(mini_lvis, tmp_path):
    cfg = _config("co_dino_5scale_r50_1x_lvis.py")
    cfg.dataloader.evaluator.output_dir = str(tmp_path)
    evaluator = instantiate(cfg.dataloader.evaluator)
    assert evaluator._max_dets_per_image == 1000
    assert evaluator._metadata.name == NAME
    assert len(evaluator._lvis_api.get_img_ids()) == len(mini_lvis["images"])
