"""
A training step of each mask model on images with crowd regions, as the data path gives them:
COCO-style records (a polygon object beside an RLE crowd region, and an image with only a crowd
region) through ``DetrDatasetMapper`` with instance masks, then the tiny Co-DINO-Inst (mask
branch on the query head's boxes) and the tiny Co-Deformable-DETR with the Mask R-CNN auxiliary
head. The crowd is no training target of either: the mask heads' positives are matched to the
one object only, and the crowd-only image has none.
"""

import math
import tempfile
import unittest

import cv2
import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.config import instantiate
from detectron2.structures import BoxMode, PolygonMasks
from detectron2.utils.events import EventStorage

from codetr.data import DetrDatasetMapper

from ..parity.common import tiny_co_deformable_detr_config
from .test_mask_heads import _recording, _tiny_co_dino_inst

HEIGHT, WIDTH = 64, 80
# a 30 x 24 rectangle of class 2 inside a crowd region covering the image's left half
OBJECT_POLYGON = [40.0, 20.0, 70.0, 20.0, 70.0, 44.0, 40.0, 44.0]
OBJECT_CLASS = 2


def _crowd_rle():
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[:, : WIDTH // 2] = 1
    rle = mask_util.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _records(directory):
    records = []
    for index, with_object in enumerate((True, False)):
        path = f"{directory}/image{index}.png"
        generator = np.random.default_rng(index)
        cv2.imwrite(path, generator.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))
        crowd = {
            "bbox": [0, 0, WIDTH // 2, HEIGHT],
            "bbox_mode": BoxMode.XYWH_ABS,
            "category_id": 0,
            "iscrowd": 1,
            "segmentation": _crowd_rle(),
        }
        annotations = [crowd]
        if with_object:
            annotations.append(
                {
                    "bbox": [40, 20, 30, 24],
                    "bbox_mode": BoxMode.XYWH_ABS,
                    "category_id": OBJECT_CLASS,
                    "iscrowd": 0,
                    "segmentation": [OBJECT_POLYGON],
                }
            )
        records.append(
            {
                "file_name": path,
                "image_id": index,
                "height": HEIGHT,
                "width": WIDTH,
                "annotations": annotations,
            }
        )
    return records


class TestMaskTrainingWithCrowds(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.set_num_threads(1)
        cls._tmp = tempfile.TemporaryDirectory()
        mapper = DetrDatasetMapper(
            is_train=True, augmentation=[], use_instance_mask=True, instance_mask_format="polygon"
        )
        cls.batch = [mapper(record) for record in _records(cls._tmp.name)]

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def test_the_mapper_drops_the_crowd(self):
        with_object, crowd_only = (item["instances"] for item in self.batch)
        self.assertEqual(with_object.gt_classes.tolist(), [OBJECT_CLASS])
        self.assertEqual(with_object.gt_boxes.tensor.tolist(), [[40.0, 20.0, 70.0, 44.0]])
        self.assertIsInstance(with_object.gt_masks, PolygonMasks)
        self.assertEqual(with_object.gt_masks.polygons[0][0].tolist(), OBJECT_POLYGON)
        self.assertEqual(len(crowd_only), 0)
        self.assertEqual(len(crowd_only.gt_masks), 0)

    def _check_step(self, model, branch, sample_method, losses):
        """One training step of ``model``; the RoIs ``branch.<sample_method>`` returns per
        image are its mask targets' sources. Returns the RoIs per image."""
        model.train()
        patch, returns = _recording(branch, sample_method)
        with patch, EventStorage():
            torch.manual_seed(0)
            total = model(self.batch)
        for name in losses:
            self.assertTrue(math.isfinite(total[name].item()), name)
        sum(total.values()).backward()
        return returns[-1], total

    def test_co_dino_inst(self):
        model = _tiny_co_dino_inst()
        (with_object, crowd_only), total = self._check_step(
            model, model.mask_branch, "label_and_sample", ("loss_mask", "loss_mask_iou")
        )
        # the object's own box first, every positive matched to it, none to the crowd
        self.assertEqual(with_object.proposal_boxes.tensor[0].tolist(), [40.0, 20.0, 70.0, 44.0])
        self.assertEqual(set(with_object.gt_classes.tolist()), {OBJECT_CLASS})
        self.assertEqual(set(with_object.gt_indices.tolist()), {0})
        self.assertEqual(len(crowd_only), 0)
        self.assertGreater(total["loss_mask"].item(), 0.0)
        missing = [n for n, p in model.mask_branch.named_parameters() if p.grad is None]
        self.assertEqual(missing, [])

    def test_co_deformable_detr_with_the_mask_rcnn_head(self):
        config = tiny_co_deformable_detr_config(with_aux_heads=True)
        config.aux_heads[0].mask_on = True
        torch.manual_seed(0)
        model = instantiate(config)
        rcnn = model.aux_heads[0]
        (with_object, crowd_only), total = self._check_step(
            model, rcnn.roi_heads, "_foreground_with_masks", ("aux0.loss_mask",)
        )
        self.assertGreater(len(with_object), 0)
        self.assertEqual(set(with_object.gt_classes.tolist()), {OBJECT_CLASS})
        # every positive's target is the object's polygon (the only mask of the image)
        for polygons in with_object.gt_masks.polygons:
            self.assertEqual(polygons[0].tolist(), OBJECT_POLYGON)
        self.assertEqual(len(crowd_only), 0)
        self.assertGreater(total["aux0.loss_mask"].item(), 0.0)
        mask_head = rcnn.roi_heads.mask_head
        missing = [n for n, p in mask_head.named_parameters() if p.grad is None]
        self.assertEqual(missing, [])
