"""
Parity of Co-DINO-Inst's mask branch with the authors' code: the tiny Co-DINO R50 of the parity
outputs with the mask branch of their ``co_dino_5scale_vit_large_coco_instance.py`` at the
tiny width (``configs/parity/tiny_co_dino_inst_r50.py``; made by
``tools/tiny_parity_official.py``), converted with our converter, must give on the two parity
images their query-head detections (boxes and the query head's scores, which the authors'
bbox results carry, to 1e-4 relative), for each the mask score (the score times the predicted
mask IoU, their segm results' score, to 1e-4 relative), its refined 112 x 112 mask binarised
at 0.5 and its binary mask in the image (both IoU > 0.999; both empty counts as equal).
"""

import os
import unittest
from typing import List

import numpy as np
import torch
from detectron2.config import LazyConfig
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Instances
from torch import Tensor

from . import REPO_ROOT, reference_inputs
from .common import RELATIVE_TOLERANCE, DetectionsMixin, load_converted_model

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(REPO_ROOT, "configs", "parity", "tiny_co_dino_inst_r50.py")
CHECKPOINT = os.path.join(HERE, "tiny_co_dino_inst_official_layout.pth")
OUTPUTS = os.path.join(HERE, "tiny_co_dino_inst_official_outputs.pt")
NUM_CLASSES = 80
MASK_SIDE = 112


def unpacked(packed: Tensor, height: int, width: int) -> Tensor:
    """(n, ceil(H * W / 8)) bit-packed uint8 -> (n, H, W) bool."""
    bits = np.unpackbits(packed.numpy(), axis=1, count=height * width)
    return torch.from_numpy(bits).bool().view(-1, height, width)


def smallest_iou(ours: Tensor, theirs: Tensor) -> float:
    """The smallest IoU of paired (n, H, W) bool masks, two empty masks counting as 1."""
    intersection = (ours & theirs).flatten(1).sum(1)
    union = (ours | theirs).flatten(1).sum(1)
    ious = torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))
    return ious.min().item() if len(ious) else 1.0


class TestTinyCoDINOInstParity(DetectionsMixin, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        config = LazyConfig.load(CONFIG).model
        cls.model = load_converted_model(config, CHECKPOINT, with_aux_heads=True)
        cls.reference = torch.load(OUTPUTS, weights_only=True)
        with torch.no_grad():
            cls.raw = cls.model.inference(
                reference_inputs(cls.reference), do_postprocess=False
            )  # masks (R, 1, 112, 112) in their RoIs
        cls.results = [detector_postprocess(r, *r.image_size) for r in cls.raw]
        # ours with the query head's score, which the authors' bbox results carry
        cls.box_results = []
        for result in cls.results:
            boxes = Instances(result.image_size)
            boxes.pred_boxes = result.pred_boxes
            boxes.scores = result.box_scores
            boxes.pred_classes = result.pred_classes
            cls.box_results.append(boxes)

    def _pairings(self) -> List[List[Tensor]]:
        """Per image, per class, ours paired with each of theirs (the detections checked)."""
        return self.assert_same_detections(self.box_results, self.reference["detr"], "detr")

    def test_detections(self):
        self._pairings()

    def test_mask_scores(self):
        pairings = self._pairings()
        for image, (result, expected) in enumerate(
            zip(self.results, self.reference["detr-mask-scores"])
        ):
            for label in range(NUM_CLASSES):
                theirs = expected[label]
                if not len(theirs):
                    continue
                ours = result.scores[result.pred_classes == label][pairings[image][label]]
                error = (ours - theirs).abs().max() / theirs.abs().max().clamp(min=1e-12)
                self.assertLessEqual(
                    error.item(), RELATIVE_TOLERANCE, f"image {image} class {label}"
                )

    def test_refined_masks_in_their_rois(self):
        pairings = self._pairings()
        worst = 1.0
        for image, (result, expected) in enumerate(zip(self.raw, self.reference["detr-roi-masks"])):
            # the same detections as the pasted ones (none dropped as empty)
            self.assertEqual(len(result), len(self.results[image]))
            self.assertEqual(tuple(result.pred_masks.shape[1:]), (1, MASK_SIDE, MASK_SIDE))
            for label in range(NUM_CLASSES):
                if not len(expected[label]):
                    continue
                ours = result.pred_masks[result.pred_classes == label][:, 0] >= 0.5
                theirs = unpacked(expected[label], MASK_SIDE, MASK_SIDE)
                worst = min(worst, smallest_iou(ours[pairings[image][label]], theirs))
        self.assertGreater(worst, 0.999)

    def test_masks_in_the_image(self):
        pairings = self._pairings()
        worst = 1.0
        for image, (result, expected) in enumerate(zip(self.results, self.reference["detr-masks"])):
            height, width = result.image_size
            self.assertEqual(result.pred_masks.dtype, torch.bool)
            self.assertEqual(tuple(result.pred_masks.shape), (len(result), height, width))
            for label in range(NUM_CLASSES):
                if not len(expected[label]):
                    continue
                ours = result.pred_masks[result.pred_classes == label]
                theirs = unpacked(expected[label], height, width)
                worst = min(worst, smallest_iou(ours[pairings[image][label]], theirs))
        self.assertGreater(worst, 0.999)
