"""
Number-for-number parity of our Co-Deformable-DETR with the authors' implementation: their
tiny Co-Deformable-DETR checkpoint, converted with our converter, must reproduce their stored
outputs on the two stored images (RGB, normalised, zero-padded at the bottom / right, no
resize) to 1e-4 relative.
"""

import unittest

import torch


from . import reference_inputs
from .common import (
    Bfloat16InferenceMixin,
    TINY_CO_DEFORMABLE_DETR_CHECKPOINT,
    AuxiliaryParityMixin,
    DetectionsMixin,
    assert_close,
    load_co_deformable_detr_outputs,
    tiny_co_deformable_detr_config,
)
from .common import load_converted_model as common_load_converted_model


def load_converted_model(with_aux_heads: bool):
    return common_load_converted_model(
        tiny_co_deformable_detr_config(with_aux_heads),
        TINY_CO_DEFORMABLE_DETR_CHECKPOINT,
        with_aux_heads,
    )


class TestTinyCoDeformableDETRParity(DetectionsMixin, unittest.TestCase):
    """The Deformable-DETR path (eval_module="detr") of the tiny model without auxiliary
    heads."""

    @classmethod
    def setUpClass(cls):
        cls.model = load_converted_model(with_aux_heads=False)
        cls.reference = load_co_deformable_detr_outputs()
        cls.inputs = reference_inputs(cls.reference)
        with torch.no_grad():
            cls.images = cls.model.preprocess_image(cls.inputs)
            cls.features = list(cls.model.neck(cls.model.backbone(cls.images.tensor)).values())
            cls.memory = cls.model.query_head.encode(
                cls.features, cls.model.padding_mask(cls.images)
            )
            cls.outputs = cls.model.query_head.decode(cls.memory)

    def test_inputs_are_padded_bottom_right(self):
        self.assertEqual(self.images.image_sizes, [(243, 192), (183, 215)])
        self.assertEqual(tuple(self.images.tensor.shape), (2, 3, 243, 215))

    def test_neck_maps(self):
        # three backbone levels (strides 8..32) and one extra stride-2 level
        expected = self.reference["neck"]
        self.assertEqual(len(self.features), len(expected))
        self.assertEqual(len(expected), 4)
        for level, (ours, theirs) in enumerate(zip(self.features, expected)):
            assert_close(ours, theirs, f"neck level {level}")

    def test_encoder_memory_maps(self):
        # the authors' list adds the auxiliary heads' extra level; checked with aux heads below
        maps = self.memory.to_maps()
        expected = self.reference["query_head"]["encoder_maps"]
        self.assertEqual(len(expected), len(maps) + 1)
        for level, (ours, theirs) in enumerate(zip(maps, expected)):
            assert_close(ours, theirs, f"encoder memory level {level}")

    def test_encoder_predictions_of_all_positions(self):
        expected = self.reference["query_head"]
        num_positions = sum(h * w for h, w in ((31, 27), (16, 14), (8, 7), (4, 4)))
        self.assertEqual(tuple(expected["enc_topk_scores"].shape), (2, num_positions, 80))
        assert_close(self.outputs["enc_logits"], expected["enc_topk_scores"], "encoder logits")
        assert_close(self.outputs["enc_boxes"], expected["enc_topk_anchors"], "encoder boxes")

    def test_last_layer_predictions(self):
        expected = self.reference["query_head"]
        assert_close(self.outputs["logits"][-1], expected["last_cls_logits"], "last-layer logits")
        assert_close(self.outputs["boxes"][-1], expected["last_boxes_cxcywh"], "last-layer boxes")

    def test_detr_detections(self):
        results = self.model.inference(self.inputs, do_postprocess=False)
        # top 100 over query x class, no NMS
        self.assertEqual([len(r) for r in results], [100, 100])
        self.assert_same_detections(results, self.reference["detr"], "detr")


class TestTinyCoDeformableDETRAuxiliaryParity(AuxiliaryParityMixin, unittest.TestCase):
    """The auxiliary heads' input maps and their test outputs."""

    load_model = staticmethod(lambda: load_converted_model(with_aux_heads=True))
    load_reference = staticmethod(load_co_deformable_detr_outputs)
    aux_levels = [f"p{i}" for i in range(3, 8)]


class TestTinyCoDeformableDETRBfloat16Inference(Bfloat16InferenceMixin, unittest.TestCase):
    load_model = staticmethod(lambda: load_converted_model(with_aux_heads=True))
    load_reference = staticmethod(load_co_deformable_detr_outputs)
