"""
demo.py's inputs: every file of a folder or glob is listed, files that are not images or that
cannot be read are reported by name while the others are drawn, and the exit status says so.
"""

import os
import re
import tempfile
import unittest
from unittest import mock

import cv2
import numpy as np
import torch
from detectron2.structures import Boxes, Instances

import demo

_REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TOY_CONFIG = os.path.join(_REPO, "configs", "toy", "dino_toy.py")


def _jpeg_bytes(height: int = 40, width: int = 50) -> bytes:
    image = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    ok, encoded = cv2.imencode(".jpg", image)
    assert ok
    return encoded.tobytes()


class _FakePredictor:
    """Detects one box in every image; records the shapes of the images it is given."""

    def __init__(self, cfg):
        self.shapes = []

    def __call__(self, image: np.ndarray) -> Instances:
        self.shapes.append(image.shape)
        instances = Instances(image.shape[:2])
        instances.pred_boxes = Boxes(torch.tensor([[2.0, 2.0, 20.0, 20.0]]))
        instances.scores = torch.tensor([0.9])
        instances.pred_classes = torch.tensor([0])
        return instances


class TestDemoInputs(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.tmp = self._tmp.name
        self.input_dir = os.path.join(self.tmp, "in")
        self.output_dir = os.path.join(self.tmp, "out")
        os.makedirs(os.path.join(self.input_dir, "subfolder"))

    def tearDown(self):
        self._tmp.cleanup()

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.input_dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def run_demo(self, input_pattern: str):
        """Runs demo.main with a fake predictor; returns (exit status, error log, predictor)."""
        predictors = []

        def build(cfg):
            predictors.append(_FakePredictor(cfg))
            return predictors[-1]

        argv = ["--config-file", TOY_CONFIG, "--input", input_pattern, "--output"]
        argv += [self.output_dir, "train.init_checkpoint=unused.pth"]
        with mock.patch.object(demo, "LazyPredictor", build):
            with self.assertLogs("codetr.demo", level="INFO") as logs:
                status = demo.main(argv)
        return status, logs.output, predictors[0]

    def test_list_inputs(self):
        names = ["b.png", "a.JPG", "notes.txt"]
        paths = [self.write(name, b"") for name in names]
        expected = [os.path.join(self.input_dir, name) for name in sorted(names)]
        self.assertEqual(demo.list_inputs(self.input_dir), expected)
        self.assertEqual(demo.list_inputs(os.path.join(self.input_dir, "*")), expected)
        self.assertEqual(demo.list_inputs(paths[2]), [paths[2]])
        self.assertEqual([demo.is_image_file(p) for p in expected], [True, True, False])

        for missing in [os.path.join(self.tmp, "missing"), os.path.join(self.tmp, "*.jpg")]:
            with self.assertRaisesRegex(FileNotFoundError, re.escape(f"'{missing}' names no file")):
                demo.list_inputs(missing)
        with self.assertRaisesRegex(FileNotFoundError, "names no file"):
            demo.list_inputs(os.path.join(self.input_dir, "subfolder"))

    def test_bad_files_are_reported_and_the_others_drawn(self):
        corrupt = self.write("corrupt.jpg", b"\xff\xd8\xff\xe0 not a JPEG")
        good = self.write("good.jpg", _jpeg_bytes())
        notes = self.write("notes.txt", b"not an image")
        truncated = self.write("truncated.jpg", _jpeg_bytes()[:400])

        status, logs, predictor = self.run_demo(self.input_dir)

        self.assertEqual(status, 1)
        self.assertEqual(os.listdir(self.output_dir), ["good.jpg"])
        self.assertEqual(cv2.imread(os.path.join(self.output_dir, "good.jpg")).shape, (40, 50, 3))
        self.assertEqual(predictor.shapes, [(40, 50, 3)])
        errors = [line for line in logs if line.startswith("ERROR")]
        self.assertEqual(len(errors), 4)
        self.assertIn(f"skipped: cannot read the image {corrupt}: ", errors[0])
        self.assertEqual(errors[1], f"ERROR:codetr.demo:skipped: not an image: {notes}")
        self.assertIn(f"skipped: cannot read the image {truncated}: OSError: ", errors[2])
        self.assertEqual(
            errors[3], f"ERROR:codetr.demo:1 drawn, 3 failed: {corrupt}, {notes}, {truncated}"
        )
        self.assertTrue(
            any(line.startswith(f"INFO:codetr.demo:{good}: 1 detections") for line in logs)
        )

    def test_all_drawn(self):
        self.write("good.jpg", _jpeg_bytes())
        status, logs, _ = self.run_demo(os.path.join(self.input_dir, "*.jpg"))
        self.assertEqual(status, 0)
        self.assertEqual(logs[-1], "INFO:codetr.demo:1 drawn, 0 failed")
        self.assertEqual(os.listdir(self.output_dir), ["good.jpg"])


if __name__ == "__main__":
    unittest.main()
