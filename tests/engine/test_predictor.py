import os
import tempfile
import unittest

import cv2
import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.modeling import detector_postprocess
from detectron2.structures import Boxes, Instances
from torch import nn

from codetr.engine import LazyPredictor


class _CanvasDetector(nn.Module):
    """Detects the whole input canvas, then rescales like detectron2 detectors do."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.calls = []
        self.autocast_dtypes = []  # per call: the CPU autocast dtype, None when disabled

    def forward(self, batched_inputs):
        self.calls.append((batched_inputs, self.training, torch.is_inference_mode_enabled()))
        autocast = torch.is_autocast_enabled("cpu")
        self.autocast_dtypes.append(torch.get_autocast_dtype("cpu") if autocast else None)
        results = []
        for x in batched_inputs:
            height, width = x["image"].shape[1:]
            instances = Instances((height, width))
            instances.pred_boxes = Boxes(torch.tensor([[0.0, 0.0, width, height]]))
            instances.scores = torch.tensor([0.9])
            instances.pred_classes = torch.tensor([1])
            results.append({"instances": detector_postprocess(instances, x["height"], x["width"])})
        return results


def _bgr_image(height, width):
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 10, 20, 30  # B, G, R
    return image


class TestLazyPredictor(unittest.TestCase):
    def test_resize_and_rgb(self):
        model = _CanvasDetector()
        predictor = LazyPredictor(model=model, augmentations=[T.ResizeShortestEdge(10, 100)])
        instances = predictor(_bgr_image(20, 30))

        inputs, training, inference_mode = model.calls[0]
        self.assertFalse(training)
        self.assertTrue(inference_mode)
        image = inputs[0]["image"]
        self.assertEqual(image.dtype, torch.uint8)
        self.assertEqual(tuple(image.shape), (3, 10, 15))
        self.assertEqual(image[:, 0, 0].tolist(), [30, 20, 10])  # RGB
        self.assertEqual((inputs[0]["height"], inputs[0]["width"]), (20, 30))
        self.assertEqual(instances.image_size, (20, 30))
        self.assertEqual(instances.pred_boxes.tensor.tolist(), [[0.0, 0.0, 30.0, 20.0]])

    def test_bgr_model_and_path_input(self):
        model = _CanvasDetector()
        predictor = LazyPredictor(model=model, augmentations=[], input_format="BGR")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "image.png")
            cv2.imwrite(path, _bgr_image(6, 4))
            instances = predictor(path)
        self.assertEqual(model.calls[0][0][0]["image"][:, 0, 0].tolist(), [10, 20, 30])
        self.assertEqual(instances.pred_boxes.tensor.tolist(), [[0.0, 0.0, 4.0, 6.0]])

    def test_padded_canvas(self):
        # LSJ test transform: 8 x 16 -> 16 x 32, padded to 32 x 32. The whole canvas maps back
        # to 16 x 16 at the original scale, as in the test mapper.
        model = _CanvasDetector()
        augmentations = [
            T.ResizeScale(1.0, 1.0, 32, 32),
            T.FixedSizeCrop((32, 32), pad=True, pad_value=0),
        ]
        predictor = LazyPredictor(model=model, augmentations=augmentations)
        instances = predictor(_bgr_image(8, 16))
        self.assertEqual(tuple(model.calls[0][0][0]["image"].shape), (3, 32, 32))
        self.assertEqual(instances.image_size, (16, 16))
        self.assertEqual(instances.pred_boxes.tensor.tolist(), [[0.0, 0.0, 16.0, 16.0]])

    def test_autocast_precision(self):
        model = _CanvasDetector()
        LazyPredictor(model=model, augmentations=[])(_bgr_image(4, 4))
        LazyPredictor(model=model, augmentations=[], precision=torch.bfloat16)(_bgr_image(4, 4))
        self.assertEqual(model.autocast_dtypes, [None, torch.bfloat16])

    def test_errors(self):
        with self.assertRaisesRegex(ValueError, "input_format"):
            LazyPredictor(model=_CanvasDetector(), augmentations=[], input_format="YUV")
        predictor = LazyPredictor(model=_CanvasDetector(), augmentations=[])
        with self.assertRaisesRegex(ValueError, r"\(H, W, 3\)"):
            predictor(np.zeros((4, 4), np.uint8))
