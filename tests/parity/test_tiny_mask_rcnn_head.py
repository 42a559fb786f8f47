"""
Parity of the Mask R-CNN auxiliary head with the authors' code: the tiny Co-Deformable-DETR of
the parity outputs with the mask branch of their ``co_deformable_detr_mask_r50_1x_coco.py``
(made by ``tools/tiny_parity_official.py``), converted with our converter, must give their
two-stage detections (boxes and scores to 1e-4 relative) and, for each, their binary mask
(IoU > 0.999) on the two parity images.
"""

import os
import unittest

import numpy as np
import torch

from . import reference_inputs
from .common import (
    DetectionsMixin,
    load_converted_model,
    tiny_co_deformable_detr_config,
)

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKPOINT = os.path.join(HERE, "tiny_co_deformable_detr_mask_official_layout.pth")
OUTPUTS = os.path.join(HERE, "tiny_co_deformable_detr_mask_official_outputs.pt")
NUM_CLASSES = 80


class TestTinyMaskRCNNHeadParity(DetectionsMixin, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        config = tiny_co_deformable_detr_config(with_aux_heads=True)
        config.aux_heads[0].mask_on = True
        config.eval_module = "two-stage"
        cls.model = load_converted_model(config, CHECKPOINT, with_aux_heads=True)
        cls.reference = torch.load(OUTPUTS, weights_only=True)
        inputs = reference_inputs(cls.reference)
        with torch.no_grad():
            cls.results = [r["instances"] for r in cls.model(inputs)]

    def test_two_stage_detections_and_masks(self):
        pairings = self.assert_same_detections(
            self.results, self.reference["two-stage"], "two-stage"
        )
        worst = 1.0
        for image, (result, expected_masks) in enumerate(
            zip(self.results, self.reference["two-stage-masks"])
        ):
            height, width = result.image_size
            for label in range(NUM_CLASSES):
                ours = result.pred_masks[result.pred_classes == label]
                theirs = expected_masks[label]
                if not len(ours):
                    continue
                bits = np.unpackbits(theirs.numpy(), axis=1, count=height * width)
                theirs = torch.from_numpy(bits).bool().view(-1, height, width)
                ours = ours[pairings[image][label]]
                intersection = (ours & theirs).flatten(1).sum(1)
                union = (ours | theirs).flatten(1).sum(1)
                self.assertTrue(bool((union > 0).all()), f"image {image} class {label}")
                worst = min(worst, (intersection / union).min().item())
        self.assertGreater(worst, 0.999)

    def test_masks_are_image_sized_booleans(self):
        for result, image in zip(self.results, self.reference["images_bgr"]):
            self.assertEqual(result.pred_masks.dtype, torch.bool)
            self.assertEqual(tuple(result.pred_masks.shape[1:]), tuple(image.shape[:2]))
            self.assertEqual(len(result.pred_masks), len(result))
