"""
Helpers shared by the parity tests: the tolerance check, the comparison of detections in the
authors' per-class format, and the tiny Co-Deformable-DETR's reference files (the tiny
Co-DINO's are in ``__init__.py``).
"""
import os
from typing import Dict, List

import torch
from detectron2.config import LazyConfig
from detectron2.structures import Instances
from omegaconf import DictConfig
from torch import Tensor

from . import PARITY_DIR, REPO_ROOT

__all__ = [
    "RELATIVE_TOLERANCE",
    "assert_close",
    "per_class_detections",
    "DetectionsMixin",
    "TINY_CO_DEFORMABLE_DETR_CONFIG",
    "TINY_CO_DEFORMABLE_DETR_CHECKPOINT",
    "TINY_CO_DEFORMABLE_DETR_OUTPUTS",
    "tiny_co_deformable_detr_config",
    "load_co_deformable_detr_outputs",
]

RELATIVE_TOLERANCE = 1e-4

TINY_CO_DEFORMABLE_DETR_CONFIG = os.path.join(
    REPO_ROOT, "configs", "parity", "tiny_co_deformable_detr_r50.py"
)
TINY_CO_DEFORMABLE_DETR_CHECKPOINT = os.path.join(
    PARITY_DIR, "tiny_co_deformable_detr_r50_1x_coco_official_layout.pth"
)
TINY_CO_DEFORMABLE_DETR_OUTPUTS = os.path.join(
    PARITY_DIR, "tiny_co_deformable_detr_r50_1x_coco_official_outputs.pt"
)


def tiny_co_deformable_detr_config(with_aux_heads: bool) -> DictConfig:
    """
    The model config of the tiny Co-Deformable-DETR; without ``with_aux_heads``, the
    Deformable-DETR-only ablation (no auxiliary heads, no positive queries).
    """
    model = LazyConfig.load(TINY_CO_DEFORMABLE_DETR_CONFIG).model
    if not with_aux_heads:
        model.aux_heads = []
        model.positive_queries = None
    return model


def load_co_deformable_detr_outputs() -> Dict:
    """The authors' outputs of the tiny Co-Deformable-DETR (see the README beside them)."""
    return torch.load(TINY_CO_DEFORMABLE_DETR_OUTPUTS, weights_only=False)


def assert_close(actual: Tensor, expected: Tensor, what: str) -> None:
    """|actual - expected| <= 1e-4 * max|expected| everywhere, same shape."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    scale = expected.abs().max().clamp(min=1e-12)
    error = (actual - expected).abs().max() / scale
    if error > RELATIVE_TOLERANCE:
        raise AssertionError(f"{what}: relative error {error.item():.3g} > {RELATIVE_TOLERANCE}")


def per_class_detections(result: Instances, num_classes: int) -> List[Tensor]:
    """Our detections in the authors' format: per class an (n, 5) x1, y1, x2, y2, score."""
    rows = torch.cat([result.pred_boxes.tensor, result.scores[:, None]], 1)
    return [rows[result.pred_classes == c] for c in range(num_classes)]


class DetectionsMixin:
    def assert_same_detections(
        self, results: List[Instances], expected: List[List[Tensor]], what: str
    ) -> None:
        """Same number per image and class; same boxes and scores, both sorted by score."""
        self.assertEqual(len(results), len(expected))
        for image, (result, reference) in enumerate(zip(results, expected)):
            self.assertGreater(sum(len(r) for r in reference), 0)
            ours = per_class_detections(result, len(reference))
            for label, (mine, theirs) in enumerate(zip(ours, reference)):
                name = f"{what} image {image} class {label}"
                self.assertEqual(len(mine), len(theirs), name)
                if len(theirs):
                    mine = mine[mine[:, 4].argsort(descending=True, stable=True)]
                    theirs = theirs[theirs[:, 4].argsort(descending=True, stable=True)]
                    assert_close(mine[:, :4], theirs[:, :4], f"{name} boxes")
                    assert_close(mine[:, 4], theirs[:, 4], f"{name} scores")
