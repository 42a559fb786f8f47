"""
Co-DINO-Inst's mask branch (``codetr.modeling.mask_heads``): the boundary bands and the
boundary-aware loss by hand and against a transcription of the authors' computation, the test-time
refinement, the stage targets of a hand-made mask and RoI, the MaskIoU targets and loss, the
assignment and sampling of the query head's boxes, and a tiny Co-DINO-Inst (the parity tiny
Co-DINO with the mask branch) in training (batch size 1, an image without objects) and at test.
"""

import math
import os
import unittest
from unittest import mock

import torch
import torch.nn.functional as F
from detectron2.config import LazyConfig
from detectron2.layers import ShapeSpec
from detectron2.layers.mask_ops import paste_masks_in_image
from detectron2.modeling import detector_postprocess
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

from codetr.engine import LazyPartial
from codetr.modeling.mask_heads import (
    MaskIoUHead,
    RefineMaskHead,
    boundary_aware_mask_loss,
    boundary_block_targets,
    build_query_mask_branch,
    gt_area_ratios,
    last_layer_predictions,
    mask_iou_targets,
    refine_stage_logits,
    stage_mask_targets,
)
from codetr.modeling.random_draws import RandomDraws, random_draws_from

from .tiny_models import build_tiny_dino

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_CO_DINO = os.path.join(REPO, "configs", "parity", "tiny_co_dino_r50.py")
SIDES = (14, 28, 56, 112)


def _softplus(x: float) -> float:
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def _bce(x: float, t: float) -> float:
    """Binary cross-entropy of logit x against target t."""
    return _softplus(x) - x * t


# ------------------------------------------------------------------ the authors' computation
# Written out from the authors' ``generate_block_target`` / ``BARCrossEntropyLoss`` /
# ``simple_test_mask`` (a Laplacian kernel, in-place merges), to compare ours with.


def _authors_blocks(masks: torch.Tensor, width: int) -> torch.Tensor:
    masks = masks.float()
    side = 2 * width + 1
    kernel = -torch.ones(1, 1, side, side)
    kernel[0, 0, width, width] = side**2 - 1
    padded = F.pad(masks[:, None], (width,) * 4, "constant", 0)
    on = (F.conv2d(padded, kernel).clamp(min=0) / float(side**2)) > 0.1
    off = (F.conv2d(1 - padded, kernel).clamp(min=0) / float(side**2)) > 0.1
    blocks = torch.zeros_like(masks, dtype=torch.long)
    blocks[(on | off)[:, 0]] = 1
    blocks[(masks - on[:, 0].float()) > 0] = 2
    return blocks


def _authors_loss(stage_logits, stage_targets, weights, width=2, start=1):
    losses = []
    previous = None
    for index, (logits, targets) in enumerate(zip(stage_logits, stage_targets)):
        logits = logits[:, 0]
        if index <= start:
            losses.append(F.binary_cross_entropy_with_logits(logits, targets))
            previous = logits.sigmoid() >= 0.5
            continue
        region = (_authors_blocks(previous.float(), width) == 1)[:, None]
        region = region | (_authors_blocks(stage_targets[index - 1], width) == 1)[:, None]
        size = logits.shape[-2:]
        region = F.interpolate(region.float(), size, mode="bilinear", align_corners=True)
        region = (region >= 0.5)[:, 0]
        per_pixel = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        losses.append(per_pixel[region].sum() / region.sum().clamp(min=1).float())
        band = (_authors_blocks(previous.float(), 1) == 1)[:, None].float()
        band = F.interpolate(band, size, mode="bilinear", align_corners=True) >= 0.5
        merged = F.interpolate(stage_logits[index - 1], size, mode="bilinear", align_corners=True)
        merged[band] = stage_logits[index][band]
        previous = merged[:, 0].sigmoid() >= 0.5
    return sum(w * l for w, l in zip(weights, losses))


def _authors_refine(stage_logits):
    stages = [s.clone() for s in stage_logits[1:]]
    for index in range(len(stages) - 1):
        binary = stages[index][:, 0].sigmoid() >= 0.5
        keep = (_authors_blocks(binary, 1) != 1)[:, None].float()
        size = stages[index + 1].shape[-2:]
        keep = F.interpolate(keep, size, mode="bilinear", align_corners=True) >= 0.5
        coarse = F.interpolate(stages[index], size, mode="bilinear", align_corners=True)
        stages[index + 1][keep] = coarse[keep]
    return stages[-1]


def _random_stages(num_rois: int, seed: int):
    """Logits and 0/1 targets per stage at the authors' sides: smooth random fields, so that
    masks have boundaries."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_rois, 1, 7, 7, generator=generator)
    logits, targets = [], []
    for side in SIDES:
        field = F.interpolate(coarse, side, mode="bilinear", align_corners=False)
        targets.append((field[:, 0] > 0.2).float())
        logits.append(field * 3 + 0.5 * torch.randn(num_rois, 1, side, side, generator=generator))
    return logits, targets


class TestBoundaryBands(unittest.TestCase):
    def test_width_one_by_hand(self):
        # a 3x3 square in a 7x7 RoI: its centre is the interior, its other 8 pixels and the
        # 16 background pixels next to it the boundary band, the outer ring background
        mask = torch.zeros(1, 7, 7)
        mask[0, 2:5, 2:5] = 1
        expected = torch.zeros(7, 7, dtype=torch.long)
        expected[1:6, 1:6] = 1
        expected[3, 3] = 2
        self.assertTrue(torch.equal(boundary_block_targets(mask, 1)[0], expected))

    def test_width_two_counts_more_than_a_tenth_of_the_window(self):
        # columns 0..4 of a 5x9 RoI are mask. Window 5x5 = 25: a pixel is on the band when at
        # least 3 pixels of its window are of the other kind (the RoI's outside is background)
        mask = torch.zeros(1, 5, 9)
        mask[0, :, :5] = 1
        blocks = boundary_block_targets(mask, 2)[0]
        # background column 5 sees 2 x (3..5) mask pixels, column 6 sees 1 x (3..5): >= 3;
        # column 7 sees none
        self.assertTrue(torch.all(blocks[:, 5:7] == 1) and torch.all(blocks[:, 7:] == 0))
        # mask columns 3, 4 see >= 3 background pixels to their right; columns 0, 1 see the
        # outside on the left (>= 2 x 3 = 6); column 2 at rows 2 is interior (no background
        # within 2 pixels), at rows 0, 1, 3, 4 the outside above / below is 2 x 5 or 1 x 5
        self.assertTrue(torch.all(blocks[:, [0, 1, 3, 4]] == 1))
        self.assertEqual(blocks[:, 2].tolist(), [1, 1, 2, 1, 1])

    def test_equal_the_authors_laplacian_on_random_masks(self):
        _, targets = _random_stages(3, seed=1)
        for width in (1, 2, 3):
            for target in targets:
                self.assertTrue(
                    torch.equal(
                        boundary_block_targets(target, width), _authors_blocks(target, width)
                    )
                )


class TestBoundaryAwareLoss(unittest.TestCase):
    def test_three_stages_by_hand(self):
        """Stages of one 6x6 RoI (one side: no resizing); target: columns 0..2. Stage 1 predicts
        the target, so both bands (width 1) are columns 0, 2, 3 and the top and bottom pixels
        of column 1 (the RoI's outside is background): stage 2 is supervised on these 20
        pixels, 14 of them in the mask."""
        target = torch.zeros(1, 6, 6)
        target[0, :, :3] = 1
        logits = [
            torch.zeros(1, 1, 6, 6),
            (target * 4 - 2)[:, None],
            torch.full((1, 1, 6, 6), -1.0),
        ]
        targets = [torch.zeros(1, 6, 6), target, target]
        weights = (0.5, 0.75, 1.0)
        loss = boundary_aware_mask_loss(
            logits, targets, stage_weights=weights, boundary_width=1, start_stage=1
        )
        stage0 = math.log(2.0)  # mean BCE of logit 0
        stage1 = (18 * _bce(2.0, 1.0) + 18 * _bce(-2.0, 0.0)) / 36
        stage2 = (14 * _bce(-1.0, 1.0) + 6 * _bce(-1.0, 0.0)) / 20
        expected = 0.5 * stage0 + 0.75 * stage1 + 1.0 * stage2
        self.assertAlmostEqual(loss.item(), expected, places=6)

    def test_equals_the_authors_computation_on_four_stages(self):
        logits, targets = _random_stages(3, seed=2)
        weights = (0.5, 0.75, 0.75, 1.0)
        ours = boundary_aware_mask_loss(logits, targets, stage_weights=weights)
        theirs = _authors_loss(logits, targets, weights)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)

    def test_head_loss_is_weighted_and_zero_without_rois(self):
        head = _tiny_head(loss_weight=1.33)
        logits, targets = _random_stages(2, seed=3)
        expected = 1.33 * boundary_aware_mask_loss(
            logits, targets, stage_weights=(0.5, 0.75, 0.75, 1.0)
        )
        torch.testing.assert_close(head.losses(logits, targets), expected)
        empty = [torch.zeros(0, 1, s, s, requires_grad=True) for s in SIDES]
        loss = head.losses(empty, [torch.zeros(0, s, s) for s in SIDES])
        self.assertEqual(loss.item(), 0.0)
        self.assertTrue(loss.requires_grad)


class TestRefinement(unittest.TestCase):
    def test_by_hand(self):
        """6x6 stages (no resizing). Stage 1 says "all mask": its band is the border ring, where
        stage 2 (-3) replaces it. The merged mask is the inner 4x4 block; its band is all but
        the inner 2x2, where stage 3 (+5) replaces it."""
        stages = [torch.zeros(1, 1, 6, 6), torch.full((1, 1, 6, 6), 1.0)]
        stages += [torch.full((1, 1, 6, 6), -3.0), torch.full((1, 1, 6, 6), 5.0)]
        expected = torch.full((6, 6), 5.0)
        expected[2:4, 2:4] = 1.0
        self.assertTrue(torch.equal(refine_stage_logits(stages)[0, 0], expected))
        self.assertTrue(
            torch.equal(refine_stage_logits(stages[:3])[0, 0, 0], torch.full((6,), -3.0))
        )

    def test_equals_the_authors_in_place_merge(self):
        logits, _ = _random_stages(3, seed=4)
        torch.testing.assert_close(refine_stage_logits(logits), _authors_refine(logits))


class TestStageTargets(unittest.TestCase):
    """The square [4, 12) x [4, 12) of a 16x16 image."""

    def _masks(self, mask_format):
        if mask_format == "bitmask":
            bitmap = torch.zeros(1, 16, 16, dtype=torch.bool)
            bitmap[0, 4:12, 4:12] = True
            return BitMasks(bitmap)
        return PolygonMasks([[[4.0, 4.0, 12.0, 4.0, 12.0, 12.0, 4.0, 12.0]]])

    def test_by_hand(self):
        for mask_format in ("bitmask", "polygon"):
            with self.subTest(mask_format=mask_format):
                masks = self._masks(mask_format)
                # the whole image: at 4x4 a cell is 4x4 pixels, cells 1, 2 of each axis are in
                # the square; at 8x8 cells 2..5
                whole = stage_mask_targets(
                    masks, Boxes(torch.tensor([[0.0, 0, 16, 16]])), (16, 16), (4, 8)
                )
                expected4 = torch.zeros(4, 4)
                expected4[1:3, 1:3] = 1
                expected8 = torch.zeros(8, 8)
                expected8[2:6, 2:6] = 1
                self.assertTrue(torch.equal(whole[0][0], expected4))
                self.assertTrue(torch.equal(whole[1][0], expected8))
                self.assertEqual(whole[0].dtype, torch.float32)
                # a RoI reaching out of the image is clipped to it first: [-8, 4, 8, 12] ->
                # [0, 4, 8, 12], 2x2-pixel cells, the square in columns 2, 3
                out = stage_mask_targets(
                    masks, Boxes(torch.tensor([[-8.0, 4, 8, 12]])), (16, 16), (4,)
                )
                expected = torch.zeros(4, 4)
                expected[:, 2:] = 1
                self.assertTrue(torch.equal(out[0][0], expected))

    def test_bitmap_cells_half_covered_stay_background(self):
        # at 2x2 each cell is an 8x8 pixel quarter of which the square covers a quarter: the
        # aligned RoIAlign gives 0.25, below 0.5
        targets = stage_mask_targets(
            self._masks("bitmask"), Boxes(torch.tensor([[0.0, 0, 16, 16]])), (16, 16), (2,)
        )
        self.assertTrue(torch.equal(targets[0], torch.zeros(1, 2, 2)))


class TestMaskIoU(unittest.TestCase):
    def test_targets_by_hand(self):
        # RoI 0: prediction the top half (8 cells; the 0 logit is not above 0.5), target the
        # left half, a half of the object in the RoI: whole object 16 cells, overlap 4,
        # union 8 + 16 - 4 -> 0.2. RoI 1: neither has an area -> 0.
        logits = torch.full((2, 4, 4), -4.0)
        logits[0, :2] = 4.0
        logits[0, 2, 0] = 0.0
        targets = torch.zeros(2, 4, 4)
        targets[0, :, :2] = 1
        iou = mask_iou_targets(logits, targets, torch.tensor([0.5, 1.0]))
        torch.testing.assert_close(iou, torch.tensor([4 / (8 + 8 / (0.5 + 1e-7) - 4), 0.0]))

    def test_loss_by_hand(self):
        head = MaskIoUHead(in_channels=4, num_classes=3, conv_dim=8, fc_dim=16, loss_weight=0.5)
        predicted = torch.tensor([0.5, 0.9, 0.3], requires_grad=True)
        loss = head.loss(predicted, torch.tensor([0.2, 0.0, 0.7]))
        self.assertAlmostEqual(loss.item(), 0.5 * (0.3**2 + 0.4**2) / 2, places=6)
        zero = head.loss(predicted, torch.zeros(3))
        self.assertEqual(zero.item(), 0.0)
        self.assertTrue(zero.requires_grad)

    def test_area_ratios_by_hand(self):
        """A 4x4 square at [2, 6) of a 10x10 image (16 pixels). RoI [3.7, 2.2, 8.9, 9.0] is
        truncated to [3, 2, 8, 9]: columns 3..5 x rows 2..5 of the square, 12 pixels -> 0.75.
        RoI [8.5, 0, 12, 10] is clipped to [8, 0, 10, 10]: nothing -> 0."""
        bitmap = torch.zeros(1, 10, 10, dtype=torch.bool)
        bitmap[0, 2:6, 2:6] = True
        polygons = PolygonMasks([[[2.0, 2.0, 6.0, 2.0, 6.0, 6.0, 2.0, 6.0]]])
        boxes = Boxes(torch.tensor([[3.7, 2.2, 8.9, 9.0], [8.5, 0.0, 12.0, 10.0]]))
        for masks in (BitMasks(bitmap), polygons):
            with self.subTest(masks=type(masks).__name__):
                ratios = gt_area_ratios(masks, boxes, torch.tensor([0, 0]), (10, 10))
                torch.testing.assert_close(ratios, torch.tensor([12 / (16 + 1e-7), 0.0]))

    def test_head_predicts_probabilities_per_class(self):
        torch.manual_seed(0)
        head = MaskIoUHead(in_channels=4, num_classes=3, conv_dim=8, fc_dim=16)
        iou = head(torch.randn(5, 4, 14, 14), torch.randn(5, 28, 28))
        self.assertEqual(tuple(iou.shape), (5, 3))
        self.assertTrue(torch.all((iou > 0) & (iou < 1)))


def _tiny_head(**kwargs):
    args = dict(in_channels=8, num_classes=3, semantic_stride=4, conv_dim=16)
    args.update(kwargs)
    torch.manual_seed(0)
    return RefineMaskHead(**args)


class TestRefineMaskHead(unittest.TestCase):
    def test_class_logits_equal_the_full_conv_then_the_class(self):
        """Ours computes only the RoI's class; the authors compute every class and select."""
        head = _tiny_head()
        torch.manual_seed(1)
        features = torch.randn(4, 16, 14, 14)
        labels = torch.tensor([2, 0, 1, 2])
        conv = head.stage_instance_logits[0]
        ours = head._class_logits(conv, features, labels)
        theirs = conv(features)[torch.arange(4), labels][:, None]
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)

    def test_stage_sides_and_class_agnostic_last_stage(self):
        head = _tiny_head()
        torch.manual_seed(2)
        features = torch.randn(3, 8, 14, 14)
        semantic = torch.randn(1, 8, 16, 16)
        boxes = [Boxes(torch.tensor([[0.0, 0, 30, 30], [10, 10, 60, 40], [5, 20, 25, 64]]))]
        with mock.patch.object(head, "_class_logits", wraps=head._class_logits) as logits:
            stages = head(features, semantic, boxes, torch.tensor([0, 1, 2]))
        self.assertEqual([tuple(s.shape) for s in stages], [(3, 1, s, s) for s in SIDES])
        # stages 0..2 take each RoI's class, the last stage's one output for all
        labels = [call.args[2].tolist() for call in logits.call_args_list]
        self.assertEqual(labels, [[0, 1, 2]] * 3 + [[0, 0, 0]])
        self.assertEqual([c.out_channels for c in head.stage_instance_logits], [3, 3, 3, 1])
        self.assertEqual(
            [tuple(c.args[1].shape[-2:]) for c in logits.call_args_list],
            [(14, 14), (28, 28), (56, 56), (56, 56)],
        )


# ------------------------------------------------------------------ assignment and sampling


def _branch(**kwargs):
    shapes = {f"p{i}": ShapeSpec(channels=8, stride=2**i) for i in range(2, 7)}
    args = dict(input_shape=shapes, num_classes=4, num_proposals=3, conv_dim=16, mask_iou_fc_dim=16)
    args.update(kwargs)
    torch.manual_seed(0)
    return build_query_mask_branch(**args)


def _gt():
    gt = Instances((64, 64))
    gt.gt_boxes = Boxes(torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]))
    gt.gt_classes = torch.tensor([1, 3])
    return gt


# IoU with the ground truth: 0.8 (gt 0), 0.5 (gt 1), 0.4 (gt 0), 0, 80 / 120 (gt 1)
PROPOSALS = [[0.0, 0, 10, 8], [20, 20, 30, 25], [0, 0, 10, 4], [50, 50, 60, 60], [22, 20, 32, 30]]


class _FixedPermutation(RandomDraws):
    def __init__(self, permutation):
        self.permutation_value = torch.tensor(permutation)
        self.purposes = []

    def permutation(self, purpose, n, device):
        self.purposes.append((purpose, n))
        return self.permutation_value


class TestAssignmentAndSampling(unittest.TestCase):
    def test_positives_by_hand(self):
        (rois,) = _branch().label_and_sample([Boxes(torch.tensor(PROPOSALS))], [_gt()])
        # ground-truth boxes first, each matched to itself; IoU 0.5 is positive, 0.4 is not
        expected = [[0.0, 0, 10, 10], [20, 20, 30, 30]] + [PROPOSALS[i] for i in (0, 1, 4)]
        self.assertEqual(rois.proposal_boxes.tensor.tolist(), expected)
        self.assertEqual(rois.gt_indices.tolist(), [0, 1, 0, 1, 1])
        self.assertEqual(rois.gt_classes.tolist(), [1, 3, 1, 3, 3])

    def test_at_most_a_fraction_of_the_samples_drawn_at_random(self):
        # 4 samples at 0.5: 2 of the 5 positives, the first two of a permutation, in their
        # original order; the 2 negatives fill the rest without a draw
        draws = _FixedPermutation([4, 1, 0, 3, 2])
        with random_draws_from(draws):
            (rois,) = _branch(batch_size_per_image=4, positive_fraction=0.5).label_and_sample(
                [Boxes(torch.tensor(PROPOSALS))], [_gt()]
            )
        self.assertEqual(draws.purposes, [("query_mask.positive", 5)])
        self.assertEqual(rois.proposal_boxes.tensor.tolist(), [[20.0, 20, 30, 30], PROPOSALS[4]])
        self.assertEqual(rois.gt_indices.tolist(), [1, 1])

    def test_image_without_objects_has_no_positives(self):
        gt = Instances(
            (64, 64), gt_boxes=Boxes(torch.zeros(0, 4)), gt_classes=torch.zeros(0).long()
        )
        (rois,) = _branch().label_and_sample([Boxes(torch.tensor(PROPOSALS))], [gt])
        self.assertEqual(len(rois), 0)

    def test_proposals_are_the_best_query_class_pairs_in_pixels(self):
        """Scores by logit: q0 class 1 (2.0), q2 class 1 (1.5), q2 class 0 (1.0), q1 class 0
        (0.5): the best 3 are q0, q2, q2; boxes cxcywh x (w 100, h 50), clamped."""
        logits = torch.tensor([[[-1.0, 2.0], [0.5, -3.0], [1.0, 1.5]]])
        boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.5, 0.5, 0.1, 0.1], [0.9, 0.1, 0.4, 0.4]]])
        (proposals,) = _branch().proposals(
            logits, boxes, torch.tensor([[100.0, 50, 100, 50]]), [(50, 100)]
        )
        q0, q2 = [40.0, 15.0, 60.0, 35.0], [70.0, 0.0, 100.0, 15.0]
        torch.testing.assert_close(proposals.tensor, torch.tensor([q0, q2, q2]))

    def test_last_layer_predictions_put_the_denoising_queries_first(self):
        outputs = {
            "logits": torch.arange(12.0).view(2, 1, 2, 3),
            "boxes": torch.arange(16.0).view(2, 1, 2, 4),
            "dn_logits": -torch.arange(6.0).view(2, 1, 1, 3),
            "dn_boxes": -torch.arange(8.0).view(2, 1, 1, 4),
        }
        logits, boxes = last_layer_predictions(outputs)
        self.assertEqual(
            logits.tolist(), [[[-3.0, -4.0, -5.0], [6.0, 7.0, 8.0], [9.0, 10.0, 11.0]]]
        )
        self.assertEqual(boxes[0, 0].tolist(), [-4.0, -5.0, -6.0, -7.0])
        del outputs["dn_logits"], outputs["dn_boxes"]
        self.assertTrue(torch.equal(last_layer_predictions(outputs)[0], outputs["logits"][-1]))


# ------------------------------------------------------------------ a tiny Co-DINO-Inst


def _tiny_co_dino_inst(mask_branch=True):
    cfg = LazyConfig.load(TINY_CO_DINO)
    if mask_branch:
        cfg.model.mask_branch = LazyPartial(build_query_mask_branch)(
            conv_dim=16, mask_iou_fc_dim=32, mask_loss_weight=1.33
        )
    return build_tiny_dino(seed=0, cfg=cfg)


def _image(height, width, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


def _with_objects(seed=0):
    gt = Instances((96, 112))
    gt.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 20.0, 100.0, 90.0]]))
    gt.gt_classes = torch.tensor([3, 17])
    gt.gt_masks = PolygonMasks(
        [
            [[10.0, 12.0, 60.0, 12.0, 60.0, 70.0, 10.0, 70.0]],
            [[50.0, 20.0, 100.0, 20.0, 75.0, 90.0]],
        ]
    )
    return {"image": _image(96, 112, seed), "instances": gt, "height": 192, "width": 224}


def _without_objects(seed=1):
    # detectron2's annotations_to_instances gives an image without objects no gt_masks
    gt = Instances((80, 96), gt_boxes=Boxes(torch.zeros(0, 4)), gt_classes=torch.zeros(0).long())
    return {"image": _image(80, 96, seed), "instances": gt}


class _Returns(list):
    """The return values of a method while :func:`_recording` patches it."""


def _recording(obj, name):
    returns = _Returns()
    original = getattr(obj, name)

    def record(*args, **kwargs):
        returns.append(original(*args, **kwargs))
        return returns[-1]

    return mock.patch.object(obj, name, side_effect=record), returns


class TestTinyCoDINOInst(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.set_num_threads(1)
        cls.model = _tiny_co_dino_inst()

    def _train_step(self, batch):
        model = self.model.train()
        model.zero_grad()
        patch_losses, losses = _recording(model.mask_branch, "losses")
        patch_sampling, sampled = _recording(model.mask_branch, "label_and_sample")
        with patch_losses, patch_sampling, EventStorage():
            torch.manual_seed(0)
            total = model(batch)
        (own,), (rois,) = losses, sampled
        return total, own, rois

    def test_losses_weighted_as_the_authors_and_gt_boxes_among_the_positives(self):
        total, own, (rois,) = self._train_step([_with_objects()])
        # lambda_2 x decoder layers, as every auxiliary loss (the tiny model: 6 x 2)
        self.assertEqual(self.model.aux_loss_weight, 12.0)
        for name in ("loss_mask", "loss_mask_iou"):
            torch.testing.assert_close(total[name], own[name] * 12.0)
            self.assertTrue(math.isfinite(total[name].item()))
        self.assertGreater(total["loss_mask"].item(), 0.0)
        gt_boxes = [[10.0, 12.0, 60.0, 70.0], [50.0, 20.0, 100.0, 90.0]]
        self.assertEqual(rois.proposal_boxes.tensor[:2].tolist(), gt_boxes)
        self.assertEqual(rois.gt_indices[:2].tolist(), [0, 1])
        self.assertLessEqual(len(rois), 128)
        self.assertEqual(set(rois.gt_classes.tolist()), {3, 17})
        sum(total.values()).backward()
        missing = [n for n, p in self.model.mask_branch.named_parameters() if p.grad is None]
        self.assertEqual(missing, [])

    def test_image_without_objects_batch_size_1(self):
        total, own, (rois,) = self._train_step([_without_objects()])
        self.assertEqual(len(rois), 0)
        self.assertEqual(total["loss_mask"].item(), 0.0)
        self.assertEqual(total["loss_mask_iou"].item(), 0.0)
        sum(total.values()).backward()
        # every parameter of the branch is in the graph (distributed training needs it)
        missing = [n for n, p in self.model.mask_branch.named_parameters() if p.grad is None]
        self.assertEqual(missing, [])

    def test_batch_with_an_image_without_objects(self):
        total, _, sampled = self._train_step([_with_objects(), _without_objects()])
        self.assertEqual(len(sampled[1]), 0)
        self.assertGreater(len(sampled[0]), 2)
        self.assertTrue(all(math.isfinite(v.item()) for v in total.values()))

    def test_objects_without_masks_are_refused(self):
        batch = [_with_objects()]
        batch[0]["instances"].remove("gt_masks")
        with self.assertRaisesRegex(ValueError, "use_instance_mask=True"):
            self._train_step(batch)

    def test_inference_masks_and_rescored_scores(self):
        model = self.model.eval()
        hook_outputs = []
        handle = model.mask_branch.mask_iou_head.register_forward_hook(
            lambda module, args, output: hook_outputs.append(output)
        )
        try:
            batch = [_with_objects(seed=3)]
            with torch.no_grad():
                (raw,) = model.inference(batch, do_postprocess=False)
                (final,) = model(batch)
        finally:
            handle.remove()
        count = len(raw)
        self.assertGreater(count, 0)
        self.assertEqual(tuple(raw.pred_masks.shape), (count, 1, 112, 112))
        self.assertEqual(raw.pred_masks.dtype, torch.float32)
        self.assertTrue(torch.all((raw.pred_masks >= 0) & (raw.pred_masks <= 1)))
        # one chunk per run: the score is the query head's times the predicted mask IoU
        iou = hook_outputs[0][torch.arange(count), raw.pred_classes]
        torch.testing.assert_close(raw.scores, raw.box_scores * iou)
        # detector_postprocess scales the boxes (x2 here), drops the empty ones and pastes the
        # masks into the requested output size at 0.5
        final = final["instances"]
        boxes = Boxes(raw.pred_boxes.tensor * 2.0)
        boxes.clip((192, 224))
        keep = boxes.nonempty()
        self.assertEqual(len(final), int(keep.sum()))
        self.assertEqual(tuple(final.pred_masks.shape), (len(final), 192, 224))
        self.assertEqual(final.pred_masks.dtype, torch.bool)
        expected = paste_masks_in_image(raw.pred_masks[keep, 0], boxes[keep], (192, 224), 0.5)
        self.assertTrue(torch.equal(final.pred_masks, expected))
        torch.testing.assert_close(final.scores, raw.scores[keep])

    def test_inference_in_chunks_equals_one_chunk(self):
        model = self.model.eval()
        batch = [_with_objects(seed=3), _with_objects(seed=4)]
        with torch.no_grad():
            whole = model.inference(batch, do_postprocess=False)
            model.mask_branch.test_chunk_size = 7
            try:
                chunked = model.inference(batch, do_postprocess=False)
            finally:
                model.mask_branch.test_chunk_size = 150
        for a, b in zip(whole, chunked):
            self.assertGreater(len(a), 7)
            torch.testing.assert_close(a.pred_masks, b.pred_masks, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-7)

    def test_no_detections(self):
        branch = self.model.mask_branch.eval()
        features = {f"p{i}": torch.randn(1, 64, 2 ** (7 - i), 2 ** (7 - i)) for i in range(2, 7)}
        empty = Instances((64, 64), pred_boxes=Boxes(torch.zeros(0, 4)), scores=torch.zeros(0))
        empty.pred_classes = torch.zeros(0, dtype=torch.long)
        with torch.no_grad():
            (result,) = branch.inference(features, [empty])
        self.assertEqual(tuple(result.pred_masks.shape), (0, 1, 112, 112))
        pasted = detector_postprocess(result, 128, 96)
        self.assertEqual(tuple(pasted.pred_masks.shape), (0, 128, 96))
        self.assertEqual(pasted.pred_masks.dtype, torch.bool)

    def test_other_eval_modules_do_not_run_the_branch(self):
        model = self.model.eval()
        model.eval_module = "two-stage"
        try:
            with mock.patch.object(model.mask_branch, "inference") as inference, torch.no_grad():
                (result,) = model([_with_objects()])
        finally:
            model.eval_module = "detr"
        inference.assert_not_called()
        self.assertFalse(result["instances"].has("pred_masks"))


def test_without_a_mask_branch_nothing_is_built_or_run():
    model = _tiny_co_dino_inst(mask_branch=False).train()
    assert model.mask_branch is None
    assert not [n for n, _ in model.named_parameters() if "mask" in n]
    batch = [_with_objects()]
    batch[0]["instances"].remove("gt_masks")
    head = model.query_head
    with mock.patch.object(head, "losses", wraps=head.losses) as losses, EventStorage():
        total = model(batch)
    assert losses.call_args.kwargs == {}
    assert not [name for name in total if "mask" in name]
