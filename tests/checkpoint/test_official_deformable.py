"""The converter of the authors' checkpoints for Co-Deformable-DETR: names, the choice of the
mapping by the target model, the tiny checkpoint, the CLI."""
import contextlib
import io
import os
import tempfile
import unittest

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import instantiate
from torch import nn

from codetr.checkpoint import (
    convert_official_state_dict,
    is_auxiliary_key,
    load_official_checkpoint,
    official_key_to_ours,
)
from codetr.checkpoint.official import ARCHITECTURES, model_architecture, official_architecture

from ..parity import TINY_CO_DINO_CHECKPOINT, TINY_CO_DINO_CONFIG, tiny_co_dino_config
from ..parity.common import (
    TINY_CO_DEFORMABLE_DETR_CHECKPOINT,
    TINY_CO_DEFORMABLE_DETR_CONFIG,
    tiny_co_deformable_detr_config,
)
from .test_official import _load_cli

DEFORMABLE = "co_deformable_detr"
T = "query_head.transformer."


class TestDeformableKeyNames(unittest.TestCase):
    def test_query_head_names(self):
        expected = {
            T + "pos_trans.weight": "query_head.pos_trans.weight",
            T + "pos_trans_norm.bias": "query_head.pos_trans_norm.bias",
            "query_head.query_embedding.weight": "query_head.query_embed.weight",
            T + "enc_output.weight": "query_head.enc_output.weight",
            T + "enc_output_norm.bias": "query_head.enc_output_norm.bias",
            T + "level_embeds": "query_head.level_embeds",
            T + "encoder.layers.1.attentions.0.sampling_offsets.bias":
                "query_head.encoder.layers.1.self_attn.sampling_offsets.bias",
            T + "decoder.layers.0.attentions.0.attn.in_proj_weight":
                "query_head.decoder.layers.0.self_attn.in_proj_weight",
            T + "decoder.layers.1.norms.2.weight": "query_head.decoder.layers.1.norm3.weight",
            "query_head.cls_branches.2.bias": "query_head.class_heads.2.bias",
            "query_head.reg_branches.2.4.weight": "query_head.box_heads.2.4.weight",
            "neck.extra_convs.0.conv.weight": "neck.extra_convs.0.weight",
        }
        for source, target in expected.items():
            self.assertFalse(is_auxiliary_key(source), source)
            self.assertEqual(official_key_to_ours(source, architecture=DEFORMABLE), target)

    def test_positive_query_names_follow_our_head_order(self):
        # ours: ATSS first, then RPN + RoI; the authors number RoI heads first
        kinds = ["one-stage", "two-stage"]
        expected = {
            T + "aux_pos_trans.0.weight": "positive_queries.projections.1.weight",
            T + "aux_pos_trans_norm.1.bias": "positive_queries.norms.0.bias",
            T + "pos_feats_trans.0.bias": "positive_queries.feature_projections.1.bias",
            T + "pos_feats_norm.1.weight": "positive_queries.feature_norms.0.weight",
            T + "head_pos_embed.weight": "positive_queries.head_pos_embed",
            "query_head.downsample.0.bias": "aux_extra_level.0.bias",
            "rpn_head.rpn_cls.bias": "aux_heads.1.rpn.rpn_head.objectness_logits.bias",
            "bbox_head.0.atss_reg.weight": "aux_heads.0.bbox_pred.weight",
        }
        for source, target in expected.items():
            self.assertTrue(is_auxiliary_key(source), source)
            self.assertEqual(official_key_to_ours(source, kinds, DEFORMABLE), target, source)

    def test_names_of_the_other_architecture_map_to_nothing(self):
        dino_only = [
            "query_head.label_embedding.weight",
            T + "query_embed.weight",
            T + "decoder.ref_point_head.0.weight",
            T + "decoder.norm.bias",
        ]
        for key in dino_only:
            self.assertIsNotNone(official_key_to_ours(key, architecture="co_dino"), key)
            self.assertIsNone(official_key_to_ours(key, architecture=DEFORMABLE), key)
        kinds = ["two-stage", "one-stage"]
        deformable_only = [
            T + "pos_trans.weight",
            "query_head.query_embedding.weight",
            T + "pos_feats_trans.0.weight",
            T + "head_pos_embed.weight",
        ]
        for key in deformable_only:
            self.assertIsNotNone(official_key_to_ours(key, kinds, DEFORMABLE), key)
            self.assertIsNone(official_key_to_ours(key, kinds, "co_dino"), key)

    def test_unknown_architecture(self):
        self.assertEqual(ARCHITECTURES, ("co_dino", DEFORMABLE))
        with self.assertRaisesRegex(ValueError, "architecture.*'detr'"):
            official_key_to_ours("neck.convs.0.conv.weight", architecture="detr")

    def test_architecture_of_models_and_checkpoints(self):
        self.assertEqual(
            model_architecture(instantiate(tiny_co_deformable_detr_config(False))), DEFORMABLE
        )
        self.assertEqual(model_architecture(instantiate(tiny_co_dino_config(False))), "co_dino")
        other = nn.Module()
        other.query_head = nn.Linear(2, 2)
        with self.assertRaisesRegex(ValueError, "query_head is Linear"):
            model_architecture(other)
        self.assertEqual(
            official_architecture(load_official_checkpoint(TINY_CO_DEFORMABLE_DETR_CHECKPOINT)),
            DEFORMABLE,
        )
        self.assertEqual(
            official_architecture(load_official_checkpoint(TINY_CO_DINO_CHECKPOINT)), "co_dino"
        )
        self.assertIsNone(official_architecture({"neck.convs.0.conv.weight": torch.zeros(1)}))


class TestConvertTinyDeformableCheckpoint(unittest.TestCase):
    """The stored tiny Co-Deformable-DETR checkpoint in the authors' layout."""

    @classmethod
    def setUpClass(cls):
        cls.source = load_official_checkpoint(TINY_CO_DEFORMABLE_DETR_CHECKPOINT)

    def test_complete_without_aux(self):
        model = instantiate(tiny_co_deformable_detr_config(with_aux_heads=False))
        converted, report = convert_official_state_dict(self.source, model, keep_aux=False)
        self.assertTrue(report.ok, report.summary())
        self.assertEqual(set(converted), set(model.state_dict()))
        self.assertEqual(set(report.dropped), {k for k in self.source if is_auxiliary_key(k)})
        # RPN 6, RoI 8, ATSS 17, extra level 4, positive queries 8 + 8 + 1
        self.assertEqual(len(report.dropped), 52)
        for source, target in (
            (T + "pos_trans.weight", "query_head.pos_trans.weight"),
            ("query_head.query_embedding.weight", "query_head.query_embed.weight"),
        ):
            self.assertTrue(torch.equal(converted[target], self.source[source]), source)

    def test_complete_with_aux(self):
        model = instantiate(tiny_co_deformable_detr_config(with_aux_heads=True))
        converted, report = convert_official_state_dict(self.source, model, keep_aux=True)
        self.assertTrue(report.ok, report.summary())
        self.assertEqual(report.dropped, [])
        self.assertEqual(set(converted), set(model.state_dict()))
        used = [k for k in self.source if not k.endswith("num_batches_tracked")]
        self.assertEqual(len(converted), len(used))
        model.load_state_dict(converted, strict=True)
        self.assertTrue(torch.equal(
            model.positive_queries.head_pos_embed, self.source[T + "head_pos_embed.weight"]
        ))

    def test_positive_queries_follow_our_head_order(self):
        config = tiny_co_deformable_detr_config(with_aux_heads=True)
        config.aux_heads = [config.aux_heads[1], config.aux_heads[0]]  # ATSS first
        model = instantiate(config)
        converted, report = convert_official_state_dict(self.source, model, keep_aux=True)
        self.assertTrue(report.ok, report.summary())
        theirs = self.source[T + "head_pos_embed.weight"]
        self.assertFalse(torch.equal(theirs[0], theirs[1]))
        self.assertTrue(torch.equal(converted["positive_queries.head_pos_embed"], theirs.flip(0)))
        for ours, authors in ((0, 1), (1, 0)):
            for target, source in (
                ("projections", "aux_pos_trans"),
                ("feature_projections", "pos_feats_trans"),
                ("feature_norms", "pos_feats_norm"),
            ):
                self.assertTrue(torch.equal(
                    converted[f"positive_queries.{target}.{ours}.weight"],
                    self.source[f"{T}{source}.{authors}.weight"],
                ))
        self.assertTrue(torch.equal(
            converted["aux_heads.0.cls_score.bias"], self.source["bbox_head.0.atss_cls.bias"]
        ))

    def test_checkpoint_of_the_other_architecture_does_not_convert(self):
        model = instantiate(tiny_co_deformable_detr_config(with_aux_heads=False))
        dino = load_official_checkpoint(TINY_CO_DINO_CHECKPOINT)
        _, report = convert_official_state_dict(dino, model)
        self.assertFalse(report.ok)
        for key in ("query_head.label_embedding.weight", T + "query_embed.weight",
                    T + "decoder.norm.weight"):
            self.assertIn(key, report.unused)
        for key in ("query_head.pos_trans.weight", "query_head.query_embed.weight"):
            self.assertIn(key, report.missing)

        model = instantiate(tiny_co_dino_config(with_aux_heads=False))
        _, report = convert_official_state_dict(self.source, model)
        self.assertFalse(report.ok)
        for key in (T + "pos_trans.weight", "query_head.query_embedding.weight"):
            self.assertIn(key, report.unused)
        for key in ("query_head.denoising.label_embedding.weight", "query_head.decoder.norm.bias"):
            self.assertIn(key, report.missing)


class TestConvertDeformableCommand(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.cli = _load_cli()

    def setUp(self):
        self._dir = tempfile.TemporaryDirectory()
        self.output = os.path.join(self._dir.name, "out.pth")

    def tearDown(self):
        self._dir.cleanup()

    def _run(self, source, config, *options):
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            status = self.cli.main([source, self.output, "--config-file", config, *options])
        return status, stderr.getvalue()

    def test_converts_and_loads_with_detection_checkpointer(self):
        status, _ = self._run(TINY_CO_DEFORMABLE_DETR_CHECKPOINT, TINY_CO_DEFORMABLE_DETR_CONFIG)
        self.assertEqual(status, 0)
        model = instantiate(tiny_co_deformable_detr_config(with_aux_heads=False))
        self.assertEqual(DetectionCheckpointer(model).load(self.output), {})
        expected, _ = convert_official_state_dict(
            load_official_checkpoint(TINY_CO_DEFORMABLE_DETR_CHECKPOINT), model
        )
        loaded = model.state_dict()
        self.assertEqual(set(loaded), set(expected))
        for key, value in expected.items():
            self.assertTrue(torch.equal(loaded[key], value), key)

    def test_keep_aux(self):
        status, _ = self._run(
            TINY_CO_DEFORMABLE_DETR_CHECKPOINT, TINY_CO_DEFORMABLE_DETR_CONFIG, "--keep-aux"
        )
        self.assertEqual(status, 0)
        saved = torch.load(self.output, weights_only=True)["model"]
        model = instantiate(tiny_co_deformable_detr_config(with_aux_heads=True))
        self.assertEqual(set(saved), set(model.state_dict()))
        model.load_state_dict(saved, strict=True)

    def test_checkpoint_of_the_other_architecture_fails_with_a_hint(self):
        for source, config, message in (
            (TINY_CO_DEFORMABLE_DETR_CHECKPOINT, TINY_CO_DINO_CONFIG,
             "is a co_deformable_detr checkpoint, but the model of .* is a co_dino; .*"
             "configs/co_deformable_detr/co_deformable_detr_r50_1x_coco.py"),
            (TINY_CO_DINO_CHECKPOINT, TINY_CO_DEFORMABLE_DETR_CONFIG,
             "is a co_dino checkpoint, but .* is a co_deformable_detr; .*configs/co_dino/"),
        ):
            with self.subTest(source=source):
                status, stderr = self._run(source, config)
                self.assertEqual(status, 1)
                self.assertRegex(stderr, message)
                self.assertFalse(os.path.exists(self.output))
