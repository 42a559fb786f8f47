"""
Helpers shared by the parity tests: the tolerance check, the comparison of detections in the
authors' per-class format, and the tiny Co-Deformable-DETR's reference files (the tiny
Co-DINO's are in ``__init__.py``).
"""

import os
from typing import Dict, List

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Instances
from omegaconf import DictConfig
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from codetr.checkpoint import convert_official_state_dict, load_official_checkpoint

from . import PARITY_DIR, REPO_ROOT, reference_inputs

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
    ) -> List[List[Tensor]]:
        """
        Same number per image and class; the same boxes and scores as sets: each of ours paired
        with one of theirs (the pairing of least total difference), every pair within 1e-4 of
        the largest box coordinate / score. (Not in score order: scores equal to ~1e-8 swap
        places between the two implementations.)

        Returns:
            per image, per class, the index into ``result[pred_classes == class]`` of ours
            paired with each of theirs, (n,) int64.
        """
        self.assertEqual(len(results), len(expected))
        pairings = []
        for image, (result, reference) in enumerate(zip(results, expected)):
            self.assertGreater(sum(len(r) for r in reference), 0)
            ours = per_class_detections(result, len(reference))
            pairings.append([])
            for label, (mine, theirs) in enumerate(zip(ours, reference)):
                name = f"{what} image {image} class {label}"
                self.assertEqual(len(mine), len(theirs), name)
                ours_for_theirs = torch.zeros(len(theirs), dtype=torch.long)
                if len(theirs):
                    box_scale = theirs[:, :4].abs().max().clamp(min=1e-12)
                    score_scale = theirs[:, 4].abs().max().clamp(min=1e-12)
                    difference = torch.maximum(
                        torch.cdist(mine[:, :4], theirs[:, :4], p=float("inf")) / box_scale,
                        (mine[:, 4, None] - theirs[None, :, 4]).abs() / score_scale,
                    )
                    rows, columns = linear_sum_assignment(difference.double().numpy())
                    worst = difference[rows, columns].max().item()
                    self.assertLessEqual(
                        worst, RELATIVE_TOLERANCE, f"{name}: relative error {worst:.3g}"
                    )
                    ours_for_theirs[torch.from_numpy(columns)] = torch.from_numpy(rows)
                pairings[-1].append(ours_for_theirs)
        return pairings


def load_converted_model(config: DictConfig, checkpoint: str, with_aux_heads: bool):
    """The model of ``config`` with the authors' ``checkpoint`` converted into it (strict)."""
    model = instantiate(config).eval()
    converted, report = convert_official_state_dict(
        load_official_checkpoint(checkpoint), model, keep_aux=with_aux_heads
    )
    assert report.ok, report.summary()
    model.load_state_dict(converted, strict=True)
    return model


class AuxiliaryParityMixin(DetectionsMixin):
    """
    The auxiliary heads' input maps and their test outputs (what eval_module "one-stage" /
    "two-stage" return). A test case sets ``load_model`` (with auxiliary heads),
    ``load_reference`` and ``aux_levels`` (the expected level names).
    """

    load_model = None
    load_reference = None
    aux_levels: List[str] = []

    @classmethod
    def setUpClass(cls):
        cls.model = cls.load_model()
        cls.reference = cls.load_reference()
        with torch.no_grad():
            cls.images = cls.model.preprocess_image(reference_inputs(cls.reference))
            memory = cls.model.encode(cls.images)
            cls.aux_features = cls.model.auxiliary_features(memory)

    def _head(self, kind: str):
        (head,) = [h for h in self.model.aux_heads if h.kind == kind]
        return head

    def test_auxiliary_feature_maps(self):
        expected = self.reference["query_head"]["encoder_maps"]
        self.assertEqual(list(self.aux_features), self.aux_levels)
        self.assertEqual(len(expected), len(self.aux_levels))
        for level, (ours, theirs) in enumerate(zip(self.aux_features.values(), expected)):
            assert_close(ours, theirs, f"auxiliary level {level}")

    def test_one_stage_detections(self):
        with torch.no_grad():
            results = self._head("one-stage").inference(self.aux_features, self.images)
        self.assert_same_detections(results, self.reference["one-stage"], "one-stage")

    def test_two_stage_detections(self):
        with torch.no_grad():
            results = self._head("two-stage").inference(self.aux_features, self.images)
        self.assert_same_detections(results, self.reference["two-stage"], "two-stage")


class Bfloat16InferenceMixin:
    """
    Inference inside a bfloat16 autocast region (``train.inference_amp``): every eval_module
    ranks and returns its detections in float32. (How close they stay to float32 inference is
    measured on a trained model, README "Speed": the random weights here give near-equal
    scores, whose order bfloat16 rounding reshuffles.) A test case sets ``load_model`` (with
    auxiliary heads) and ``load_reference``.
    """

    load_model = None
    load_reference = None

    @classmethod
    def setUpClass(cls):
        cls.model = cls.load_model()
        cls.inputs = reference_inputs(cls.load_reference())

    def test_every_eval_module_gives_float32_detections(self):
        for eval_module in ("detr", "one-stage", "two-stage"):
            self.model.eval_module = eval_module
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                results = self.model.inference(self.inputs, do_postprocess=False)
            for result in results:
                self.assertGreater(len(result), 0, eval_module)
                self.assertEqual(result.pred_boxes.tensor.dtype, torch.float32, eval_module)
                self.assertEqual(result.scores.dtype, torch.float32, eval_module)
