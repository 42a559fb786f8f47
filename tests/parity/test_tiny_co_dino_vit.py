"""
Number-for-number parity of our ViT Co-DINO with the authors' implementation: the tiny ViT
Co-DINO made with their code by ``tools/tiny_parity_official.py`` (their ViT-L COCO model
shrunk, their test settings), its checkpoint converted with our converter, must reproduce
their outputs on the two parity images (RGB, normalised, zero-padded at the bottom / right to
a multiple of 32, no resize) to 1e-4 relative, for every eval_module.
"""

import os
import unittest

import torch
from detectron2.config import LazyConfig

from . import REPO_ROOT, reference_inputs
from .common import AuxiliaryParityMixin, DetectionsMixin, assert_close, load_converted_model

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(REPO_ROOT, "configs", "parity", "tiny_co_dino_vit.py")
CHECKPOINT = os.path.join(HERE, "tiny_co_dino_vit_official_layout.pth")
OUTPUTS = os.path.join(HERE, "tiny_co_dino_vit_official_outputs.pt")


def load_reference():
    return torch.load(OUTPUTS, weights_only=True)


def load_model(with_aux_heads: bool):
    config = LazyConfig.load(CONFIG).model
    if not with_aux_heads:
        config.aux_heads = []
        config.positive_queries = None
    return load_converted_model(config, CHECKPOINT, with_aux_heads)


class TestTinyCoDINOViTParity(DetectionsMixin, unittest.TestCase):
    """Backbone and neck, encoder, decoder and the DINO path (eval_module="detr")."""

    @classmethod
    def setUpClass(cls):
        cls.model = load_model(with_aux_heads=False)
        cls.reference = load_reference()
        cls.inputs = reference_inputs(cls.reference)
        with torch.no_grad():
            cls.images = cls.model.preprocess_image(cls.inputs)
            cls.features = list(cls.model.neck(cls.model.backbone(cls.images.tensor)).values())
            cls.memory = cls.model.query_head.encode(
                cls.features, cls.model.padding_mask(cls.images)
            )

    def test_inputs_are_padded_to_a_multiple_of_32(self):
        self.assertEqual(self.images.image_sizes, [(243, 192), (183, 215)])
        self.assertEqual(tuple(self.images.tensor.shape), (2, 3, 256, 224))

    def test_windows_are_padded(self):
        # a 16 x 14 token grid in 6 x 6 windows: both sides padded (to 18 x 18)
        height, width = self.images.tensor.shape[-2:]
        tokens = (height // 16, width // 16)
        self.assertEqual(tokens, (16, 14))
        self.assertTrue(all(side % self.model.backbone.blocks[0].window_size for side in tokens))

    def test_neck_maps(self):
        expected = self.reference["neck"]
        self.assertEqual(len(self.features), len(expected))
        for level, (ours, theirs) in enumerate(zip(self.features, expected)):
            assert_close(ours, theirs, f"neck level {level}")

    def test_encoder_memory_maps(self):
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


class TestTinyCoDINOViTAuxiliaryParity(AuxiliaryParityMixin, unittest.TestCase):
    """The auxiliary heads' input maps and their soft-NMS test outputs (eval_module
    "one-stage": ATSS, 100 kept; "two-stage": 2000 proposals, 1000 kept)."""

    load_model = staticmethod(lambda: load_model(with_aux_heads=True))
    load_reference = staticmethod(load_reference)
    aux_levels = [f"p{i}" for i in range(2, 8)]
