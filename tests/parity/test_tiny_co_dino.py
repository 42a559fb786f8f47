"""
Number-for-number parity of our Co-DINO with the authors' implementation: their tiny Co-DINO
checkpoint, converted with our converter, must reproduce their stored outputs on the two
stored images (RGB, normalised, zero-padded at the bottom / right, no resize) to 1e-4
relative.
"""

import unittest

import torch

from . import (
    TINY_CO_DINO_CHECKPOINT,
    load_reference_outputs,
    reference_inputs,
    tiny_co_dino_config,
)
from .common import AuxiliaryParityMixin, Bfloat16InferenceMixin, DetectionsMixin, assert_close
from .common import load_converted_model as common_load_converted_model


def load_converted_model(with_aux_heads: bool):
    return common_load_converted_model(
        tiny_co_dino_config(with_aux_heads), TINY_CO_DINO_CHECKPOINT, with_aux_heads
    )


class TestTinyCoDINOParity(DetectionsMixin, unittest.TestCase):
    """The DINO path (eval_module="detr") of the tiny model without auxiliary heads."""

    @classmethod
    def setUpClass(cls):
        cls.model = load_converted_model(with_aux_heads=False)
        cls.reference = load_reference_outputs()
        cls.inputs = reference_inputs(cls.reference)
        with torch.no_grad():
            cls.images = cls.model.preprocess_image(cls.inputs)
            cls.features = list(cls.model.neck(cls.model.backbone(cls.images.tensor)).values())
            cls.memory = cls.model.query_head.encode(
                cls.features, cls.model.padding_mask(cls.images)
            )

    def test_inputs_are_padded_bottom_right(self):
        self.assertEqual(self.images.image_sizes, [(243, 192), (183, 215)])
        self.assertEqual(tuple(self.images.tensor.shape), (2, 3, 243, 215))

    def test_neck_maps(self):
        expected = self.reference["neck"]
        self.assertEqual(len(self.features), len(expected))
        for level, (ours, theirs) in enumerate(zip(self.features, expected)):
            assert_close(ours, theirs, f"neck level {level}")

    def test_encoder_memory_maps(self):
        # the authors' list adds the auxiliary heads' extra level; checked with aux heads below
        maps = self.memory.to_maps()
        expected = self.reference["query_head"]["encoder_maps"]
        self.assertEqual(len(expected), len(maps) + 1)
        for level, (ours, theirs) in enumerate(zip(maps, expected)):
            assert_close(ours, theirs, f"encoder memory level {level}")

    def test_encoder_topk_proposals(self):
        with torch.no_grad():
            logits, boxes = self.model.query_head.select_proposals(self.memory)
        expected = self.reference["query_head"]
        assert_close(logits, expected["enc_topk_scores"], "encoder top-k logits")
        assert_close(boxes, expected["enc_topk_anchors"], "encoder top-k boxes")

    def test_last_layer_predictions(self):
        with torch.no_grad():
            outputs = self.model.query_head.decode(self.memory)
        expected = self.reference["query_head"]
        assert_close(outputs["logits"][-1], expected["last_cls_logits"], "last-layer logits")
        assert_close(outputs["boxes"][-1], expected["last_boxes_cxcywh"], "last-layer boxes")

    def test_detr_detections(self):
        results = self.model.inference(self.inputs, do_postprocess=False)
        self.assert_same_detections(results, self.reference["detr"], "detr")


class TestTinyCoDINOAuxiliaryParity(AuxiliaryParityMixin, unittest.TestCase):
    """The auxiliary heads' input maps and their test outputs."""

    load_model = staticmethod(lambda: load_converted_model(with_aux_heads=True))
    load_reference = staticmethod(load_reference_outputs)
    aux_levels = [f"p{i}" for i in range(2, 8)]


class TestTinyCoDINOBfloat16Inference(Bfloat16InferenceMixin, unittest.TestCase):
    load_model = staticmethod(lambda: load_converted_model(with_aux_heads=True))
    load_reference = staticmethod(load_reference_outputs)
