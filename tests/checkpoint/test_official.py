"""The converter of the authors' checkpoints: key mapping, reports, file errors, CLI."""
import contextlib
import importlib.util
import io
import math
import os
import tempfile
import unittest

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyCall as L
from detectron2.config import instantiate
from detectron2.layers import ShapeSpec

from codetr.checkpoint import (
    convert_official_state_dict,
    is_auxiliary_key,
    load_official_checkpoint,
    official_key_to_ours,
)
from codetr.modeling import SimpleFeaturePyramid
from codetr.modeling.eva_vit import EVA02ViT

from ..parity import REPO_ROOT, TINY_CO_DINO_CHECKPOINT, TINY_CO_DINO_CONFIG, tiny_co_dino_config


def _load_cli():
    path = os.path.join(REPO_ROOT, "tools", "convert_official_checkpoint.py")
    spec = importlib.util.spec_from_file_location("convert_official_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TestOfficialKeyNames(unittest.TestCase):
    def test_transformer_names(self):
        expected = {
            "query_head.transformer.encoder.layers.1.attentions.0.value_proj.weight":
                "query_head.encoder.layers.1.self_attn.value_proj.weight",
            "query_head.transformer.encoder.layers.0.ffns.0.layers.0.0.bias":
                "query_head.encoder.layers.0.ffn.linear1.bias",
            "query_head.transformer.encoder.layers.0.norms.1.weight":
                "query_head.encoder.layers.0.norm2.weight",
            "query_head.transformer.decoder.layers.1.attentions.0.attn.in_proj_weight":
                "query_head.decoder.layers.1.self_attn.in_proj_weight",
            "query_head.transformer.decoder.layers.1.attentions.0.attn.out_proj.bias":
                "query_head.decoder.layers.1.self_attn.out_proj.bias",
            "query_head.transformer.decoder.layers.0.attentions.1.sampling_offsets.bias":
                "query_head.decoder.layers.0.cross_attn.sampling_offsets.bias",
            "query_head.transformer.decoder.layers.0.ffns.0.layers.1.weight":
                "query_head.decoder.layers.0.ffn.linear2.weight",
            "query_head.transformer.decoder.layers.0.norms.2.bias":
                "query_head.decoder.layers.0.norm3.bias",
            "query_head.transformer.decoder.ref_point_head.2.weight":
                "query_head.decoder.ref_point_head.2.weight",
            "query_head.transformer.decoder.norm.bias": "query_head.decoder.norm.bias",
            "query_head.transformer.level_embeds": "query_head.level_embeds",
            "query_head.transformer.enc_output_norm.weight": "query_head.enc_output_norm.weight",
            "query_head.transformer.query_embed.weight": "query_head.query_embed.weight",
            "query_head.cls_branches.6.bias": "query_head.class_heads.6.bias",
            "query_head.reg_branches.6.4.weight": "query_head.box_heads.6.4.weight",
            "query_head.label_embedding.weight": "query_head.denoising.label_embedding.weight",
            "neck.convs.2.conv.weight": "neck.convs.2.weight",
            "neck.extra_convs.0.gn.bias": "neck.extra_convs.0.norm.bias",
            "backbone.layer2.0.downsample.1.running_mean":
                "backbone.res3.0.shortcut.norm.running_mean",
            "backbone.bn1.weight": "backbone.stem.conv1.norm.weight",
        }
        for source, target in expected.items():
            self.assertEqual(official_key_to_ours(source), target, source)

    def test_auxiliary_names_follow_our_head_order(self):
        # ours: ATSS first, then RPN + RoI; the authors number RoI heads first
        kinds = ["one-stage", "two-stage"]
        expected = {
            "rpn_head.rpn_conv.weight": "aux_heads.1.rpn.rpn_head.conv.weight",
            "rpn_head.rpn_reg.bias": "aux_heads.1.rpn.rpn_head.anchor_deltas.bias",
            "roi_head.0.bbox_head.shared_fcs.1.weight": "aux_heads.1.roi_heads.box_head.fc2.weight",
            "roi_head.0.bbox_head.fc_cls.bias":
                "aux_heads.1.roi_heads.box_predictor.cls_score.bias",
            "bbox_head.0.reg_convs.0.gn.weight": "aux_heads.0.bbox_tower.0.norm.weight",
            "bbox_head.0.atss_centerness.bias": "aux_heads.0.centerness.bias",
            "bbox_head.0.scales.5.scale": "aux_heads.0.scales.5.scale",
            "query_head.transformer.aux_pos_trans.0.weight":
                "positive_queries.projections.1.weight",
            "query_head.transformer.aux_pos_trans_norm.1.bias": "positive_queries.norms.0.bias",
            "query_head.downsample.1.weight": "aux_extra_level.1.weight",
        }
        for source, target in expected.items():
            self.assertTrue(is_auxiliary_key(source), source)
            self.assertEqual(official_key_to_ours(source, kinds), target, source)

    def test_unknown_names(self):
        self.assertIsNone(official_key_to_ours("query_head.transformer.pos_trans.weight"))
        self.assertIsNone(official_key_to_ours("backbone.fc.weight"))
        # an auxiliary head our model does not have
        self.assertIsNone(official_key_to_ours("bbox_head.0.atss_cls.weight", ["two-stage"]))
        self.assertFalse(is_auxiliary_key("query_head.label_embedding.weight"))


class TestConvertTinyCheckpoint(unittest.TestCase):
    """The stored tiny Co-DINO checkpoint in the authors' layout."""

    @classmethod
    def setUpClass(cls):
        cls.source = load_official_checkpoint(TINY_CO_DINO_CHECKPOINT)

    def test_complete_without_aux(self):
        model = instantiate(tiny_co_dino_config(with_aux_heads=False))
        converted, report = convert_official_state_dict(self.source, model, keep_aux=False)
        self.assertTrue(report.ok, report.summary())
        self.assertEqual(set(converted), set(model.state_dict()))
        self.assertEqual(set(report.dropped), {k for k in self.source if is_auxiliary_key(k)})
        self.assertEqual(len(report.dropped), 44)
        key = "query_head.transformer.decoder.layers.1.norms.1.weight"
        self.assertTrue(torch.equal(converted["query_head.decoder.layers.1.norm2.weight"],
                                    self.source[key]))

    def test_complete_with_aux(self):
        model = instantiate(tiny_co_dino_config(with_aux_heads=True))
        converted, report = convert_official_state_dict(self.source, model, keep_aux=True)
        self.assertTrue(report.ok, report.summary())
        self.assertEqual(report.dropped, [])
        self.assertEqual(set(converted), set(model.state_dict()))
        # every authors' tensor but the BatchNorm counters (FrozenBN has none) is used
        used = [k for k in self.source if not k.endswith("num_batches_tracked")]
        self.assertEqual(len(converted), len(used))
        model.load_state_dict(converted, strict=True)

    def test_rpn_anchor_order(self):
        """mmdet's anchor (ratio r, scale s) must land on our anchor of the same shape."""
        model = instantiate(tiny_co_dino_config(with_aux_heads=True))
        converted, _ = convert_official_state_dict(self.source, model, keep_aux=True)
        (rcnn,) = [h for h in model.aux_heads if h.kind == "two-stage"]
        ours = next(iter(rcnn.rpn.anchor_generator.cell_anchors))  # stride 4
        ratios, scales = [0.5, 1.0, 2.0], [4 * 2 ** (i / 3) for i in range(3)]
        # mmdet AnchorGenerator: ratio-major, w = stride * scale / sqrt(r), h = ... * sqrt(r)
        theirs = [(4 * s / math.sqrt(r), 4 * s * math.sqrt(r)) for r in ratios for s in scales]
        cls_weight = converted[next(k for k in converted if k.endswith("objectness_logits.weight"))]
        reg_bias = converted[next(k for k in converted if k.endswith("anchor_deltas.bias"))]
        for index, anchor in enumerate(ours.tolist()):
            width, height = anchor[2] - anchor[0], anchor[3] - anchor[1]
            (source_index,) = [
                j for j, (w, h) in enumerate(theirs)
                if math.isclose(w, width, rel_tol=1e-4) and math.isclose(h, height, rel_tol=1e-4)
            ]
            self.assertTrue(torch.equal(
                cls_weight[index], self.source["rpn_head.rpn_cls.weight"][source_index]
            ))
            self.assertTrue(torch.equal(
                reg_bias[4 * index: 4 * index + 4],
                self.source["rpn_head.rpn_reg.bias"][4 * source_index: 4 * source_index + 4],
            ))

    def test_keep_aux_without_aux_heads_reports_unused(self):
        model = instantiate(tiny_co_dino_config(with_aux_heads=False))
        _, report = convert_official_state_dict(self.source, model, keep_aux=True)
        self.assertFalse(report.ok)
        self.assertEqual(set(report.unused), {k for k in self.source if is_auxiliary_key(k)})
        self.assertEqual(report.missing, [])

    def test_reports_missing_unused_and_shape_mismatch(self):
        config = tiny_co_dino_config(with_aux_heads=False)
        config.query_head.num_queries = 31
        model = instantiate(config)
        source = dict(self.source)
        del source["query_head.transformer.enc_output.bias"]
        source["query_head.transformer.extra.weight"] = torch.zeros(3)
        converted, report = convert_official_state_dict(source, model)
        self.assertEqual(report.unused, ["query_head.transformer.extra.weight"])
        self.assertEqual(report.missing, ["query_head.enc_output.bias"])
        self.assertEqual(
            report.shape_mismatches,
            [("query_head.transformer.query_embed.weight", "query_head.query_embed.weight",
              (30, 64), (31, 64))],
        )
        self.assertNotIn("query_head.query_embed.weight", converted)
        summary = report.summary()
        for text in ("query_head.transformer.extra.weight", "query_head.enc_output.bias",
                     "(30, 64) -> query_head.query_embed.weight (31, 64)"):
            self.assertIn(text, summary)

    def test_foreign_state_dict_maps_nothing(self):
        model = instantiate(tiny_co_dino_config(with_aux_heads=False))
        foreign = {f"layer{i}.weight": torch.randn(4) for i in range(3)}
        converted, report = convert_official_state_dict(foreign, model)
        self.assertEqual(converted, {})
        self.assertEqual(sorted(report.unused), sorted(foreign))
        self.assertEqual(len(report.missing), len(model.state_dict()))


class TestConvertViTCheckpoint(unittest.TestCase):
    """A tiny EVA-02 ViT Co-DINO (SFP neck, ConvFC RoI head) in the authors' layout, made from
    our model by the inverse of the key tables."""

    @classmethod
    def setUpClass(cls):
        config = tiny_co_dino_config(with_aux_heads=True)
        config.backbone = L(EVA02ViT)(
            embed_dim=32, depth=2, num_heads=2, window_size=2, global_block_indexes=[1],
            pretrain_img_size=64,
        )
        config.neck = L(SimpleFeaturePyramid)(
            input_shape={"last_feat": ShapeSpec(channels=32, stride=16)},
            in_feature="last_feat",
            out_channels=64,
        )
        config.aux_heads[0].update(
            num_box_head_convs=4, num_box_head_fcs=1, box_head_norm="GN",
            cls_agnostic_bbox_reg=True,
        )
        torch.manual_seed(0)
        cls.model = instantiate(config)
        cls.ours = cls.model.state_dict()
        # the query head and the other auxiliary parts: the stored tiny checkpoint
        tiny = load_official_checkpoint(TINY_CO_DINO_CHECKPOINT)
        cls.source = {
            k: v for k, v in tiny.items()
            if not k.startswith(("backbone.", "neck.", "roi_head.0.bbox_head.shared_fcs.",
                                 "roi_head.0.bbox_head.fc_reg."))
        }
        cls.generated = {}
        for key, value in cls.ours.items():
            name = _authors_vit_name(key)
            if name is not None:
                cls.generated[name] = key
                cls.source[name] = value
        cls.source.update({
            "backbone.rope_win.freqs_cos": torch.randn(4, 8),
            "backbone.rope_glb.freqs_sin": torch.randn(4, 8),
            "backbone.blocks.1.attn.rope.freqs_cos": torch.randn(4, 8),
            "ema_backbone_pos_embed": torch.randn(1, 17, 32),
            "ema_query_head_label_embedding_weight": torch.randn(81, 64),
            "query_head.loss_cls.fed_loss_weight": torch.rand(80),
        })

    def test_key_names(self):
        kinds = ["two-stage", "one-stage"]
        expected = {
            "backbone.blocks.5.attn.q_bias": "backbone.blocks.5.attn.q_proj.bias",
            "backbone.blocks.5.mlp.w3.weight": "backbone.blocks.5.mlp.down_proj.weight",
            "neck.p2.8.weight": "neck.branches.p2.4.weight",
            "neck.p2.9.bias": "neck.branches.p2.4.norm.bias",
            "neck.p3.7.weight": "neck.branches.p3.3.weight",
            "neck.p5.2.weight": "neck.branches.p5.1.norm.weight",
            "neck.p6.4.weight": "neck.branches.p6.2.weight",
            "roi_head.0.bbox_head.shared_convs.2.conv.weight":
                "aux_heads.0.roi_heads.box_head.conv3.weight",
            "roi_head.0.bbox_head.shared_convs.0.gn.bias":
                "aux_heads.0.roi_heads.box_head.conv1.norm.bias",
        }
        for source, target in expected.items():
            self.assertEqual(official_key_to_ours(source, kinds), target, source)
        for activation in ("neck.p2.3.weight", "neck.p4.2.weight"):  # GELU, Upsample: no params
            self.assertIsNone(official_key_to_ours(activation, kinds))

    def test_round_trip_is_bitwise(self):
        converted, report = convert_official_state_dict(self.source, self.model, keep_aux=True)
        self.assertTrue(report.ok, report.summary())
        self.assertEqual(set(converted), set(self.ours))
        for name, key in self.generated.items():
            self.assertTrue(torch.equal(converted[key], self.ours[key]), name)
        self.assertEqual(
            sorted(report.dropped),
            sorted([
                "backbone.blocks.1.attn.rope.freqs_cos",
                "backbone.rope_glb.freqs_sin",
                "backbone.rope_win.freqs_cos",
                "ema_backbone_pos_embed",
                "ema_query_head_label_embedding_weight",
                "query_head.loss_cls.fed_loss_weight",
            ]),
        )
        self.assertEqual(len(report.notes), 1)
        self.assertIn("query_head.loss_cls.fed_loss_weight", report.notes[0])
        self.assertIn("note: dropped query_head.loss_cls.fed_loss_weight", report.summary())
        self.model.load_state_dict(converted, strict=True)

    def test_unknown_and_missing_keys_reported(self):
        source = dict(self.source)
        source["backbone.blocks.0.attn.inner_attn_ln.weight"] = torch.zeros(32)
        source["neck.p2.3.weight"] = torch.zeros(1)
        del source["neck.p6.8.bias"]
        del source["roi_head.0.bbox_head.shared_convs.3.gn.weight"]
        _, report = convert_official_state_dict(source, self.model, keep_aux=True)
        self.assertEqual(
            sorted(report.unused),
            ["backbone.blocks.0.attn.inner_attn_ln.weight", "neck.p2.3.weight"],
        )
        self.assertEqual(
            sorted(report.missing),
            ["aux_heads.0.roi_heads.box_head.conv4.norm.weight", "neck.branches.p6.3.norm.bias"],
        )


def _authors_vit_name(key):
    """The authors' name of one of our ViT backbone, SFP or ConvFC box-head parameters (None
    for the other parameters), written out independently of the converter."""
    if key.startswith("backbone."):
        for ours, theirs in [
            (".attn.q_proj.bias", ".attn.q_bias"), (".attn.v_proj.bias", ".attn.v_bias"),
            (".mlp.gate_proj.", ".mlp.w1."), (".mlp.up_proj.", ".mlp.w2."),
            (".mlp.norm.", ".mlp.ffn_ln."), (".mlp.down_proj.", ".mlp.w3."),
        ]:
            key = key.replace(ours, theirs)
        return key
    if key.startswith("neck.branches."):
        # our conv n of a branch -> the authors' Sequential index of that conv
        sequential_index = {
            "p2": {1: 1, 3: 5, 4: 8, 5: 11}, "p3": {1: 1, 2: 4, 3: 7}, "p4": {0: 0, 1: 3},
            "p5": {1: 1, 2: 4}, "p6": {1: 1, 2: 4, 3: 7},
        }
        _, _, level, conv, *rest = key.split(".")
        index = sequential_index[level][int(conv)]
        if rest[0] == "norm":
            return f"neck.{level}.{index + 1}.{rest[1]}"
        return f"neck.{level}.{index}.{rest[0]}"
    prefix = "aux_heads.0.roi_heads."
    renames = {
        "box_head.fc1.": "roi_head.0.bbox_head.shared_fcs.0.",
        "box_predictor.bbox_pred.": "roi_head.0.bbox_head.fc_reg.",
    }
    for i in range(4):
        conv = f"roi_head.0.bbox_head.shared_convs.{i}."
        renames[f"box_head.conv{i + 1}.norm."] = conv + "gn."
        renames[f"box_head.conv{i + 1}.weight"] = conv + "conv.weight"
    for ours, theirs in renames.items():
        if key.startswith(prefix + ours):
            return theirs + key[len(prefix + ours):]
    return None


class TestCheckpointFiles(unittest.TestCase):
    def setUp(self):
        self._dir = tempfile.TemporaryDirectory()
        self.dir = self._dir.name

    def tearDown(self):
        self._dir.cleanup()

    def _path(self, name):
        return os.path.join(self.dir, name)

    def test_truncated_file(self):
        with open(TINY_CO_DINO_CHECKPOINT, "rb") as f:
            data = f.read()
        path = self._path("truncated.pth")
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        with self.assertRaisesRegex(ValueError, "truncated.pth.*corrupted"):
            load_official_checkpoint(path)

    def test_not_a_state_dict(self):
        path = self._path("list.pth")
        torch.save([torch.zeros(1)], path)
        with self.assertRaisesRegex(ValueError, "list.pth.*holds a list"):
            load_official_checkpoint(path)
        path = self._path("detectron2.pth")
        torch.save({"model": {"a": torch.zeros(1)}}, path)
        with self.assertRaisesRegex(ValueError, "detectron2.pth.*detectron2 checkpoint"):
            load_official_checkpoint(path)


class TestConvertCommand(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.cli = _load_cli()

    def setUp(self):
        self._dir = tempfile.TemporaryDirectory()
        self.dir = self._dir.name

    def tearDown(self):
        self._dir.cleanup()

    def _run(self, source, *options):
        output = os.path.join(self.dir, "out.pth")
        argv = [source, output, "--config-file", TINY_CO_DINO_CONFIG, *options]
        return self.cli.main(argv), output

    def _write_modified_checkpoint(self, add=None, remove=None):
        checkpoint = torch.load(TINY_CO_DINO_CHECKPOINT, weights_only=True)
        if add:
            checkpoint["state_dict"][add] = torch.zeros(1)
        if remove:
            del checkpoint["state_dict"][remove]
        path = os.path.join(self.dir, "modified.pth")
        torch.save(checkpoint, path)
        return path

    def test_converts_and_loads_with_detection_checkpointer(self):
        status, output = self._run(TINY_CO_DINO_CHECKPOINT)
        self.assertEqual(status, 0)
        saved = torch.load(output, weights_only=True)
        self.assertEqual(list(saved), ["model"])
        model = instantiate(tiny_co_dino_config(with_aux_heads=False))
        self.assertEqual(DetectionCheckpointer(model).load(output), {})  # nothing but "model"
        expected, _ = convert_official_state_dict(
            load_official_checkpoint(TINY_CO_DINO_CHECKPOINT), model
        )
        loaded = model.state_dict()
        self.assertEqual(set(loaded), set(expected))
        for key, value in expected.items():
            self.assertTrue(torch.equal(loaded[key], value), key)

    def test_config_override(self):
        status, _ = self._run(TINY_CO_DINO_CHECKPOINT, "model.query_head.num_queries=31")
        self.assertEqual(status, 1)

    def test_unused_key_fails(self):
        path = self._write_modified_checkpoint(add="query_head.transformer.unknown")
        status, output = self._run(path)
        self.assertEqual(status, 1)
        self.assertFalse(os.path.exists(output))

    def test_missing_key_fails(self):
        path = self._write_modified_checkpoint(remove="neck.convs.0.gn.bias")
        status, output = self._run(path)
        self.assertEqual(status, 1)
        self.assertFalse(os.path.exists(output))

    def test_keep_aux(self):
        status, output = self._run(TINY_CO_DINO_CHECKPOINT, "--keep-aux")
        self.assertEqual(status, 0)
        saved = torch.load(output, weights_only=True)["model"]
        self.assertEqual(set(saved), set(instantiate(tiny_co_dino_config(True)).state_dict()))

    def test_keep_aux_without_aux_heads_fails(self):
        status, output = self._run(
            TINY_CO_DINO_CHECKPOINT, "--keep-aux", "model.aux_heads=[]",
            "model.positive_queries=null",
        )
        self.assertEqual(status, 1)
        self.assertFalse(os.path.exists(output))

    def test_corrupted_and_foreign_files_fail_clearly(self):
        corrupted = os.path.join(self.dir, "corrupted.pth")
        with open(corrupted, "wb") as f:
            f.write(b"\x00" * 100)
        foreign = os.path.join(self.dir, "foreign.pth")
        torch.save({"state_dict": {"encoder.w": torch.zeros(2)}}, foreign)
        for path, message in ((corrupted, "corrupted.pth"), (foreign, "foreign.pth: none of")):
            with self.subTest(path=path):
                stderr = io.StringIO()
                with contextlib.redirect_stderr(stderr):
                    status, output = self._run(path)
                self.assertEqual(status, 1)
                self.assertIn(message, stderr.getvalue())
                self.assertFalse(os.path.exists(output))
