import itertools
import json
import os
import tempfile
import unittest

import cv2
import numpy as np

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from codetr.data import load_checked_dataset_dicts, thing_class_count

_LOGGER = "codetr.data.dataset_checks"
_NAME_IDS = itertools.count()


def _image(image_id, file_name):
    return {"id": image_id, "file_name": file_name, "height": 20, "width": 30}


def _annotation(annotation_id, image_id, bbox):
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": 1,
        "bbox": bbox,
        "area": 10.0,
        "iscrowd": 0,
    }


class TestLoadCheckedDatasetDicts(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self._tmp.cleanup)
        self.root = self._tmp.name
        self.image_root = os.path.join(self.root, "images")
        os.makedirs(self.image_root)

    def _write_images(self, count):
        """Writes ``count`` 20x30 JPEGs; returns their file names (relative to image_root)."""
        names = [f"{i:03d}.jpg" for i in range(count)]
        for name in names:
            cv2.imwrite(os.path.join(self.image_root, name), np.zeros((20, 30, 3), np.uint8))
        return names

    def _coco(self, file_names, boxes_per_image=((2, 2, 10, 10),)):
        images = [_image(i + 1, name) for i, name in enumerate(file_names)]
        annotations = [
            _annotation(len(images) * j + i + 1, i + 1, list(box))
            for i in range(len(images))
            for j, box in enumerate(boxes_per_image)
        ]
        categories = [{"id": 1, "name": "thing"}]
        return {"images": images, "annotations": annotations, "categories": categories}

    def _register(self, content):
        """Registers a COCO dataset whose json file holds ``content`` (a dict, or raw text)."""
        name = f"_test_checked_{next(_NAME_IDS)}"
        json_file = os.path.join(self.root, f"{name}.json")
        with open(json_file, "w") as f:
            f.write(content if isinstance(content, str) else json.dumps(content))
        register_coco_instances(name, {}, json_file, self.image_root)
        self.addCleanup(DatasetCatalog.remove, name)
        self.addCleanup(MetadataCatalog.remove, name)
        return name, json_file

    def test_valid_datasets_are_concatenated(self):
        file_names = self._write_images(3)
        first, _ = self._register(self._coco(file_names[:2]))
        second, _ = self._register(self._coco(file_names[2:]))
        dicts = load_checked_dataset_dicts([first, second], is_train=True)
        expected = [os.path.join(self.image_root, name) for name in file_names]
        self.assertEqual([d["file_name"] for d in dicts], expected)
        self.assertEqual([len(d["annotations"]) for d in dicts], [1, 1, 1])

    def test_malformed_json_names_file_and_position(self):
        name, json_file = self._register('{"images": [\n  {"id": 1,}\n]}')
        with self.assertRaises(ValueError) as cm:
            load_checked_dataset_dicts(name, is_train=True)
        message = str(cm.exception)
        self.assertIn(repr(name), message)
        self.assertIn(json_file, message)
        self.assertIn("line 2 column 12", message)

    def test_malformed_json_when_counting_classes(self):
        # train_net.py reads the class count of the training set before building the loaders
        name, json_file = self._register('{"images": [], "annotations": [],}')
        with self.assertRaisesRegex(ValueError, f"{json_file} is not valid json: .* line 1 column"):
            thing_class_count(name)

    def test_json_without_images_or_not_a_dict(self):
        for content in ("[]", json.dumps({"annotations": []})):
            name, json_file = self._register(content)
            with self.assertRaisesRegex(ValueError, "is not a COCO instances file") as cm:
                load_checked_dataset_dicts(name, is_train=False)
            self.assertIn(json_file, str(cm.exception))

    def test_missing_json_file(self):
        name, json_file = self._register("{}")
        os.remove(json_file)
        with self.assertRaises(FileNotFoundError) as cm:
            load_checked_dataset_dicts(name, is_train=False)
        self.assertIn(f"Dataset {name!r}: json file {json_file} does not exist", str(cm.exception))

    def test_no_annotations_is_an_error_for_training(self):
        coco = self._coco(self._write_images(2))
        del coco["annotations"]
        name, json_file = self._register(coco)
        with self.assertRaises(ValueError) as cm:
            load_checked_dataset_dicts(name, is_train=True)
        self.assertIn(
            f"Dataset {name!r} (json file {json_file}) has no annotations", str(cm.exception)
        )
        # with filter_empty, detectron2 fails first (no image left): the json is explained
        with self.assertRaisesRegex(ValueError, 'has no "annotations" key') as cm:
            load_checked_dataset_dicts(name, is_train=True, filter_empty=True)
        self.assertIn(json_file, str(cm.exception))

    def test_no_annotations_is_a_warning_for_testing(self):
        coco = self._coco(self._write_images(2))
        del coco["annotations"]
        name, json_file = self._register(coco)
        with self.assertLogs(_LOGGER, "WARNING") as logs:
            dicts = load_checked_dataset_dicts(name, is_train=False)
        self.assertEqual(len(dicts), 2)
        self.assertEqual(len(logs.output), 1)
        self.assertIn(
            f"Dataset {name!r} (json file {json_file}) has no annotations", logs.output[0]
        )

    def test_missing_images_are_reported_together(self):
        file_names = self._write_images(5)
        missing = [os.path.join(self.image_root, file_names[i]) for i in (0, 2, 3)]
        for path in missing:
            os.remove(path)
        name, _ = self._register(self._coco(file_names))
        with self.assertRaises(FileNotFoundError) as cm:
            load_checked_dataset_dicts(name, is_train=True)
        message = str(cm.exception)
        self.assertIn(f"3 of the 5 images of dataset {name!r} are missing on disk", message)
        for path in missing:
            self.assertIn(path, message)
        self.assertIn("dataloader.train.dataset.missing_images=drop", message)

        with self.assertLogs(_LOGGER, "WARNING") as logs:
            dicts = load_checked_dataset_dicts(name, is_train=True, missing_images="drop")
        self.assertEqual(
            [d["file_name"] for d in dicts],
            [os.path.join(self.image_root, file_names[i]) for i in (1, 4)],
        )
        self.assertEqual(len(logs.output), 1)
        self.assertIn(f"3 of the 5 images of dataset {name!r} are missing", logs.output[0])
        self.assertIn("These images are dropped", logs.output[0])

    def test_test_images_that_cannot_be_opened(self):
        file_names = self._write_images(4)
        empty, text = (os.path.join(self.image_root, file_names[i]) for i in (1, 3))
        open(empty, "wb").close()
        with open(text, "w") as f:
            f.write("not an image")
        name, _ = self._register(self._coco(file_names))
        with self.assertRaises(OSError) as cm:
            load_checked_dataset_dicts(name, is_train=False)
        message = str(cm.exception)
        self.assertIn(f"2 of the 4 images of test dataset {name!r} cannot be opened", message)
        self.assertIn(f"{empty} (UnidentifiedImageError)", message)
        self.assertIn(f"{text} (UnidentifiedImageError)", message)
        # training sets are not opened at start: the mapper skips such images
        self.assertEqual(len(load_checked_dataset_dicts(name, is_train=True)), 4)

    def test_many_missing_images_list_the_first_five(self):
        file_names = [f"{i:03d}.jpg" for i in range(7)]  # none written
        name, _ = self._register(self._coco(file_names))
        with self.assertRaises(FileNotFoundError) as cm:
            load_checked_dataset_dicts(name, is_train=False)
        message = str(cm.exception)
        self.assertIn("7 of the 7 images", message)
        self.assertIn(os.path.join(self.image_root, "004.jpg"), message)
        self.assertNotIn("005.jpg", message)
        self.assertIn("... and 2 more", message)
        self.assertIn("dataloader.test.dataset.missing_images=drop", message)
        with self.assertRaisesRegex(FileNotFoundError, f"No image of dataset {name!r} is left"):
            load_checked_dataset_dicts(name, is_train=False, missing_images="drop")

    def test_invalid_missing_images_value(self):
        with self.assertRaisesRegex(ValueError, r"one of \('error', 'drop'\), got 'skip'"):
            load_checked_dataset_dicts("coco_2017_val", is_train=False, missing_images="skip")

    def test_degenerate_boxes_are_counted(self):
        boxes = ((2, 2, 10, 10), (5, 5, 0, 4), (1, 1, 3, -1), (0, float("nan"), 4, 4))
        file_names = self._write_images(2)
        name, _ = self._register(self._coco(file_names, boxes_per_image=boxes))
        with self.assertLogs(_LOGGER, "WARNING") as logs:
            dicts = load_checked_dataset_dicts(name, is_train=True)
        self.assertEqual(sum(len(d["annotations"]) for d in dicts), 8)
        self.assertEqual(len(logs.output), 1)
        message = logs.output[0]
        self.assertIn(f"Dataset {name!r} has 6 degenerate boxes", message)
        example = os.path.join(self.image_root, file_names[0])
        self.assertIn(f"e.g. {example}: bbox [5, 5, 0, 4] (XYWH_ABS)", message)
        self.assertIn("filter_empty_instances", message)

    def test_unregistered_dataset(self):
        with self.assertRaises(KeyError) as cm:
            load_checked_dataset_dicts("_test_not_registered", is_train=True)
        message = str(cm.exception)
        self.assertIn("--register-coco _test_not_registered JSON IMAGE_ROOT", message)
        self.assertIn("coco_2017_val", message)
        self.assertNotIn("_test_not_registered", MetadataCatalog.list())


if __name__ == "__main__":
    unittest.main()
