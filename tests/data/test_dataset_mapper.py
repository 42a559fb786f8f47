import copy
import operator
import os
import pickle
import tempfile
import unittest

import cv2
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from detectron2.data import DatasetFromList, MapDataset, build_detection_train_loader
from detectron2.data import transforms as T
from detectron2.data.samplers import InferenceSampler
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import BoxMode, Boxes, Instances

from codetr.data import (
    DETR_TRAIN_MIN_SIZES,
    LSJ_PAD_VALUE,
    DetrDatasetMapper,
    build_detr_crop_train_augmentation,
    build_detr_test_augmentation,
    build_detr_train_augmentation,
    build_lsj_test_augmentation,
    build_lsj_train_augmentation,
)

HEIGHT, WIDTH = 40, 60


def _annotation(x0, y0, x1, y1, category_id, iscrowd=0):
    return {
        "bbox": [x0, y0, x1, y1],
        "bbox_mode": BoxMode.XYXY_ABS,
        "category_id": category_id,
        "iscrowd": iscrowd,
    }


@pytest.fixture
def dataset_dict(tmp_path):
    """A 40x60 PNG: grey, with a pure red patch at rows 5-14, columns 30-49; two objects."""
    image = np.full((HEIGHT, WIDTH, 3), 50, dtype=np.uint8)
    image[5:15, 30:50] = (0, 0, 255)  # BGR red
    file_name = str(tmp_path / "image.png")
    cv2.imwrite(file_name, image)
    return {
        "file_name": file_name,
        "image_id": 7,
        "height": HEIGHT,
        "width": WIDTH,
        "annotations": [_annotation(30, 5, 50, 15, 2), _annotation(2, 20, 12, 38, 0)],
    }


def test_train_mode_outputs_instances(dataset_dict):
    mapper = DetrDatasetMapper(is_train=True, augmentation=[T.HFlipTransform(WIDTH)])
    out = mapper(dataset_dict)
    assert out["image"].dtype == torch.uint8
    assert out["image"].shape == (3, HEIGHT, WIDTH)
    assert (out["image_id"], out["height"], out["width"]) == (7, HEIGHT, WIDTH)
    assert "annotations" not in out
    instances = out["instances"]
    assert instances.image_size == (HEIGHT, WIDTH)
    expected = torch.tensor([[10.0, 5.0, 30.0, 15.0], [48.0, 20.0, 58.0, 38.0]])
    assert torch.equal(instances.gt_boxes.tensor, expected)
    assert instances.gt_classes.dtype == torch.int64
    assert instances.gt_classes.tolist() == [2, 0]
    assert "annotations" in dataset_dict  # the input is not modified


def test_crowd_annotations_are_dropped(dataset_dict):
    dataset_dict["annotations"].insert(0, _annotation(0, 0, 20, 20, 1, iscrowd=1))
    out = DetrDatasetMapper(is_train=True, augmentation=[])(dataset_dict)
    assert out["instances"].gt_classes.tolist() == [2, 0]


def test_boxes_cropped_away_give_empty_instances(dataset_dict):
    crop = T.CropTransform(14, 0, 16, 18)  # x 14..30, y 0..18: misses both boxes
    out = DetrDatasetMapper(is_train=True, augmentation=[crop])(dataset_dict)
    assert out["image"].shape == (3, 18, 16)
    assert len(out["instances"]) == 0
    assert out["instances"].gt_boxes.tensor.shape == (0, 4)
    assert out["instances"].gt_classes.dtype == torch.int64


def test_partially_cropped_box_is_clipped(dataset_dict):
    crop = T.CropTransform(35, 0, 25, 20)  # keeps the right part of the first box only
    out = DetrDatasetMapper(is_train=True, augmentation=[crop])(dataset_dict)
    assert out["instances"].gt_boxes.tensor.tolist() == [[0.0, 5.0, 15.0, 15.0]]
    assert out["instances"].gt_classes.tolist() == [2]


def test_image_without_objects(dataset_dict):
    dataset_dict["annotations"] = []
    out = DetrDatasetMapper(is_train=True, augmentation=[])(dataset_dict)
    assert isinstance(out["instances"], Instances) and len(out["instances"]) == 0


def test_crop_branch_is_chosen_half_of_the_time(dataset_dict):
    mapper = DetrDatasetMapper(
        is_train=True,
        augmentation=[],
        augmentation_with_crop=[T.CropTransform(0, 0, 16, 18)],
    )
    np.random.seed(0)
    cropped = sum(mapper(dataset_dict)["image"].shape[1] == 18 for _ in range(200))
    assert 70 < cropped < 130


def test_channel_order(dataset_dict):
    rgb = DetrDatasetMapper(is_train=False, augmentation=[])(dataset_dict)["image"]
    bgr = DetrDatasetMapper(is_train=False, augmentation=[], image_format="BGR")(dataset_dict)
    assert rgb[:, 10, 40].tolist() == [255, 0, 0]
    assert bgr["image"][:, 10, 40].tolist() == [0, 0, 255]


def test_test_mode_output(dataset_dict):
    mapper = DetrDatasetMapper(
        is_train=False, augmentation=build_detr_test_augmentation(min_size=80, max_size=1333)
    )
    out = mapper(dataset_dict)
    assert out["image"].shape == (3, 80, 120)
    assert out["image"].dtype == torch.uint8
    assert (out["height"], out["width"], out["image_id"]) == (HEIGHT, WIDTH, 7)
    assert "instances" not in out and "annotations" not in out


def test_lsj_train_output_is_square(dataset_dict):
    mapper = DetrDatasetMapper(
        is_train=True, augmentation=build_lsj_train_augmentation(image_size=64)
    )
    np.random.seed(0)
    for _ in range(10):
        out = mapper(dataset_dict)
        assert out["image"].shape == (3, 64, 64)
        boxes = out["instances"].gt_boxes.tensor
        assert (boxes >= 0).all() and (boxes <= 64).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()


def test_lsj_test_pads_to_square_and_rescales_uniformly(dataset_dict):
    mapper = DetrDatasetMapper(
        is_train=False, augmentation=build_lsj_test_augmentation(image_size=64)
    )
    out = mapper(dataset_dict)
    image = out["image"]
    # 40x60 -> long side 64: 43x64 content (40 * 64 / 60 = 42.7), padded at the bottom.
    assert image.shape == (3, 64, 64)
    assert (image[:, 43:, :] == LSJ_PAD_VALUE).all()
    assert (image[:, 42, :] != LSJ_PAD_VALUE).any()
    assert out["width"] == pytest.approx(60.0)
    assert out["height"] == pytest.approx(64 * 40 / 43)

    # A prediction covering the content, in the 64x64 canvas the model sees, maps back to
    # the full original image; one in the padding stays at the same scale.
    results = Instances((64, 64))
    results.pred_boxes = Boxes(torch.tensor([[0.0, 0.0, 64.0, 43.0], [0.0, 0.0, 32.0, 32.0]]))
    mapped = detector_postprocess(results, out["height"], out["width"]).pred_boxes.tensor
    expected = torch.tensor([[0.0, 0.0, 60.0, 40.0], [0.0, 0.0, 30.0, 32 * 40 / 43]])
    assert torch.allclose(mapped, expected, atol=1e-4)


def test_detr_train_augmentation_builders():
    plain = build_detr_train_augmentation()
    assert [type(a) for a in plain] == [T.RandomFlip, T.ResizeShortestEdge]
    assert plain[1].short_edge_length == DETR_TRAIN_MIN_SIZES == tuple(range(480, 801, 32))
    assert plain[1].max_size == 1333 and plain[1].is_range is False

    crop = build_detr_crop_train_augmentation()
    assert [type(a) for a in crop] == [
        T.RandomFlip,
        T.ResizeShortestEdge,
        T.RandomCrop,
        T.ResizeShortestEdge,
    ]
    assert crop[1].short_edge_length == (400, 500, 600) and crop[1].is_range is False
    assert (crop[2].crop_type, crop[2].crop_size) == ("absolute_range", (384, 600))
    assert crop[3].short_edge_length == DETR_TRAIN_MIN_SIZES and crop[3].max_size == 1333

    lsj = build_lsj_train_augmentation()
    assert [type(a) for a in lsj] == [T.RandomFlip, T.ResizeScale, T.FixedSizeCrop]
    assert (lsj[1].min_scale, lsj[1].max_scale, lsj[1].target_height) == (0.1, 2.0, 1024)
    assert lsj[2].crop_size == (1024, 1024) and lsj[2].pad_value == LSJ_PAD_VALUE


def test_detr_augmentation_sizes(dataset_dict):
    """Both DETR branches produce short sides from ``min_sizes`` (or a capped long side)."""
    kwargs = dict(min_sizes=OmegaConf.create([32, 48]), max_size=64)  # as a config passes it
    mapper = DetrDatasetMapper(
        is_train=True,
        augmentation=build_detr_train_augmentation(**kwargs),
        augmentation_with_crop=build_detr_crop_train_augmentation(
            crop_resize_sizes=(40,), crop_size_range=(20, 30), **kwargs
        ),
    )
    np.random.seed(0)
    shapes = set()
    for _ in range(30):
        out = mapper(dataset_dict)
        height, width = out["image"].shape[1:]
        assert min(height, width) in (32, 48) or max(height, width) == 64
        boxes = out["instances"].gt_boxes.tensor
        assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        shapes.add((height, width))
    assert len(shapes) > 2  # multi-scale and crops of varying aspect ratio


def test_invalid_arguments():
    with pytest.raises(ValueError, match="image_format"):
        DetrDatasetMapper(is_train=True, augmentation=[], image_format="YUV-BT.601")
    with pytest.raises(ValueError, match="augmentation_with_crop"):
        DetrDatasetMapper(is_train=False, augmentation=[], augmentation_with_crop=[])
    with pytest.raises(ValueError, match="crop_size_range"):
        build_detr_crop_train_augmentation(crop_size_range=(600, 384))
    with pytest.raises(ValueError, match="min_sizes"):
        build_detr_train_augmentation(min_sizes=())
    with pytest.raises(ValueError, match="image_size"):
        build_lsj_test_augmentation(image_size=0)
    with pytest.raises(ValueError, match="min_scale"):
        build_lsj_train_augmentation(min_scale=2.0, max_scale=1.0)


class TestUnreadableImages(unittest.TestCase):
    """Training skips (and counts) unreadable images; inference fails naming the file."""

    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        image = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
        self.good = os.path.join(tmp.name, "good.jpg")
        cv2.imwrite(self.good, image)
        with open(self.good, "rb") as f:
            data = f.read()
        self.truncated = os.path.join(tmp.name, "truncated.jpg")
        with open(self.truncated, "wb") as f:
            f.write(data[: len(data) // 2])
        self.not_an_image = os.path.join(tmp.name, "not_an_image.jpg")
        with open(self.not_an_image, "w") as f:
            f.write("not an image")
        self.missing = os.path.join(tmp.name, "missing.jpg")

    def _record(self, file_name, height=HEIGHT):
        return {
            "file_name": file_name,
            "image_id": 1,
            "height": height,
            "width": WIDTH,
            "annotations": [_annotation(30, 5, 50, 15, 2)],
        }

    def test_training_skips_and_counts(self):
        mapper = DetrDatasetMapper(is_train=True, augmentation=[])
        cases = [
            (self.truncated, HEIGHT, "OSError: image file is truncated"),
            (self.not_an_image, HEIGHT, "UnidentifiedImageError: cannot identify image file"),
            (self.missing, HEIGHT, "FileNotFoundError"),
            (self.good, HEIGHT + 1, "SizeMismatchError"),  # the dict's size is wrong
        ]
        for count, (file_name, height, error) in enumerate(cases, start=1):
            with self.assertLogs("codetr.data.dataset_mapper", "WARNING") as logs:
                self.assertIsNone(mapper(self._record(file_name, height)))
            self.assertEqual(len(logs.output), 1)
            self.assertIn(f"Cannot read image {file_name}: {error}", logs.output[0])
            self.assertIn(f"({count} training images skipped so far)", logs.output[0])
            self.assertEqual(mapper.skipped_images, count)
        self.assertEqual(len(mapper(self._record(self.good))["instances"]), 1)
        self.assertEqual(mapper.skipped_images, 4)

    def test_inference_fails_naming_the_file(self):
        mapper = DetrDatasetMapper(is_train=False, augmentation=[])
        for file_name, error in [(self.truncated, OSError), (self.not_an_image, OSError)]:
            with self.assertRaisesRegex(error, f"Cannot read image {file_name}"):
                mapper(self._record(file_name))
        with self.assertRaisesRegex(ValueError, f"Cannot read image {self.good}"):
            mapper(self._record(self.good, HEIGHT + 1))
        self.assertEqual(mapper.skipped_images, 0)

    def test_copies_count_on_their_own(self):
        mapper = DetrDatasetMapper(is_train=True, augmentation=[])
        mapper(self._record(self.truncated))
        for clone in (pickle.loads(pickle.dumps(mapper)), copy.deepcopy(mapper)):
            self.assertEqual(clone.skipped_images, 1)
            clone(self._record(self.truncated))
            self.assertEqual(clone.skipped_images, 2)
        self.assertEqual(mapper.skipped_images, 1)

    def test_count_is_shared_with_forked_workers(self):
        """detectron2's train loader, one (forked) worker: the bad image is replaced."""
        mapper = DetrDatasetMapper(is_train=True, augmentation=[])
        records = [self._record(f) for f in (self.good, self.truncated, self.good)]
        loader = build_detection_train_loader(
            records,
            mapper=mapper,
            sampler=InferenceSampler(len(records)),
            total_batch_size=1,
            aspect_ratio_grouping=False,
            num_workers=1,
        )
        file_names = [batch[0]["file_name"] for batch in loader]
        self.assertEqual(file_names, [self.good] * 3)
        self.assertEqual(mapper.skipped_images, 1)

    def test_count_is_shared_with_spawned_workers(self):
        """A spawned worker unpickles the mapper (detectron2 uses cloudpickle) and shares it."""
        mapper = DetrDatasetMapper(is_train=True, augmentation=[])
        records = [self._record(f) for f in (self.good, self.not_an_image, self.good)]
        loader = torch.utils.data.DataLoader(
            MapDataset(DatasetFromList(records, copy=False), mapper),
            batch_size=1,
            collate_fn=operator.itemgetter(0),
            num_workers=1,
            multiprocessing_context="spawn",
        )
        self.assertEqual([out["file_name"] for out in loader], [self.good] * 3)
        self.assertEqual(mapper.skipped_images, 1)
