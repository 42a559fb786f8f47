import math
import unittest

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.poolers import assign_boxes_to_levels
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage
from torch import nn
from torchvision.ops import box_iou, generalized_box_iou

from codetr.modeling.aux_heads.base import AssignedCoords
from codetr.modeling.aux_heads.rcnn import RCNNAuxHead, RCNNAuxRPN, build_rcnn_aux_head
from codetr.modeling.aux_heads.sampling import LowQualityMatcher

NUM_CLASSES = 3
CHANNELS = 8
LEVELS = ["p2", "p3", "p4", "p5", "p6", "p7"]
STRIDES = [4, 8, 16, 32, 64, 128]
LOSS_NAMES = {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"}

# Two ground-truth boxes in a 64x64 image and proposals at known IoUs with them.
GT_A, GT_B = [4.0, 4.0, 28.0, 28.0], [36.0, 36.0, 60.0, 60.0]
PROPOSALS = {
    "equal_to_a": [4.0, 4.0, 28.0, 28.0],  # IoU 1 with A
    "near_a": [5.0, 5.0, 28.0, 28.0],  # IoU 529 / 576 with A
    "half_of_b": [36.0, 36.0, 48.0, 60.0],  # IoU exactly 0.5 with B: positive
    "under_half_of_b": [36.0, 36.0, 47.0, 60.0],  # IoU 11 / 24 with B: background
    "far": [40.0, 0.0, 60.0, 20.0],  # IoU 0 with both
}


def _build(**kwargs):
    shapes = {n: ShapeSpec(channels=CHANNELS, stride=s) for n, s in zip(LEVELS, STRIDES)}
    args = dict(input_shape=shapes, in_features=LEVELS, num_classes=NUM_CLASSES, fc_dim=16)
    args.update(kwargs)
    return build_rcnn_aux_head(**args)


def _features(image_sizes, requires_grad=False):
    height = max(h for h, _ in image_sizes)
    width = max(w for _, w in image_sizes)
    features = {
        name: torch.randn(
            len(image_sizes), CHANNELS, math.ceil(height / s), math.ceil(width / s)
        ).requires_grad_(requires_grad)
        for name, s in zip(LEVELS, STRIDES)
    }
    images = ImageList(torch.zeros(len(image_sizes), 3, height, width), image_sizes)
    return features, images


def _gt(image_size, boxes, classes):
    gt = Instances(image_size)
    gt.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    gt.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return gt


class _FixedProposals(nn.Module):
    """Stands in for the RPN: returns the given proposal boxes for every image."""

    def __init__(self, boxes_per_image):
        super().__init__()
        self.boxes_per_image = boxes_per_image

    def forward(self, images, features, gt_instances=None):
        proposals = []
        for image_size, boxes in zip(images.image_sizes, self.boxes_per_image):
            instances = Instances(image_size)
            instances.proposal_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
            instances.objectness_logits = torch.zeros(len(boxes))
            proposals.append(instances)
        return proposals, {}


def _head_with_fixed_proposals(boxes_per_image):
    return RCNNAuxHead(rpn=_FixedProposals(boxes_per_image), roi_heads=_build().roi_heads)


def _rows(assignment, in_order=False):
    """Sampled RoIs as a list of (box, label, target box) tuples, sorted unless ``in_order``."""
    rows = [
        (tuple(b), int(label), tuple(t))
        for b, label, t in zip(
            assignment.boxes.tolist(), assignment.labels.tolist(), assignment.target_boxes.tolist()
        )
    ]
    return rows if in_order else sorted(rows)


def _zero_predictors(head):
    """The RPN and box-branch outputs become their biases (zero, or what a test sets)."""
    for layer in (
        head.roi_heads.box_predictor.cls_score,
        head.roi_heads.box_predictor.bbox_pred,
        head.rpn.rpn_head.objectness_logits,
        head.rpn.rpn_head.anchor_deltas,
    ):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def _anchors_by_hand(image_size):
    """All anchors of the head on an image of ``image_size`` (no padding), in the RPN's order:
    level by level, location by location (row-major, centred on stride * (x, y)), then
    ratio-major: w = stride * scale / sqrt(ratio), h = stride * scale * sqrt(ratio) with
    scale = 4 * 2^(i / 3)."""
    height, width = image_size
    anchors = []
    for stride in STRIDES:
        cells = []
        for ratio in (0.5, 1.0, 2.0):
            for i in range(3):
                scale = 4.0 * 2 ** (i / 3)
                w, h = stride * scale / math.sqrt(ratio), stride * scale * math.sqrt(ratio)
                cells.append([-w / 2, -h / 2, w / 2, h / 2])
        for y in range(math.ceil(height / stride)):
            for x in range(math.ceil(width / stride)):
                shift = [x * stride, y * stride] * 2
                anchors += [[c + o for c, o in zip(cell, shift)] for cell in cells]
    return torch.tensor(anchors, dtype=torch.float64)


def _box(cx, cy, w, h):
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


# what the RoI head samples from PROPOSALS with ground truth A (class 1) and B (class 2)
SAMPLED_ROWS = [
    (tuple(GT_A), 1, tuple(GT_A)),  # ground truth added as a proposal
    (tuple(GT_B), 2, tuple(GT_B)),  # ground truth added as a proposal
    (tuple(PROPOSALS["equal_to_a"]), 1, tuple(GT_A)),
    (tuple(PROPOSALS["near_a"]), 1, tuple(GT_A)),
    (tuple(PROPOSALS["half_of_b"]), 2, tuple(GT_B)),
    (tuple(PROPOSALS["under_half_of_b"]), NUM_CLASSES, (0.0, 0.0, 0.0, 0.0)),
    (tuple(PROPOSALS["far"]), NUM_CLASSES, (0.0, 0.0, 0.0, 0.0)),
]


class TestRCNNAuxHeadConfiguration(unittest.TestCase):
    def test_anchors_match_mmdet_in_order(self):
        head = _build()
        one_location = [torch.zeros(1, CHANNELS, 1, 1)] * len(LEVELS)
        # the anchors at the first location of the stride-4 level, centred on (0, 0)
        cell_anchors = head.rpn.anchor_generator(one_location)[0].tensor
        # mmdet: w = stride * scale / sqrt(ratio), h = stride * scale * sqrt(ratio), ratio-major
        mmdet = []
        for ratio in (0.5, 1.0, 2.0):
            for i in range(3):
                scale = 4.0 * 2 ** (i / 3)
                w, h = 4 * scale / math.sqrt(ratio), 4 * scale * math.sqrt(ratio)
                mmdet.append([-w / 2, -h / 2, w / 2, h / 2])
        torch.testing.assert_close(cell_anchors, torch.tensor(mmdet), rtol=1e-6, atol=1e-5)
        self.assertEqual(head.rpn.anchor_generator.strides, STRIDES)
        self.assertEqual(head.rpn.rpn_head.objectness_logits.out_channels, 9)

    def test_rpn_and_roi_settings(self):
        head = _build()
        self.assertEqual(head.kind, "two-stage")
        rpn, roi = head.rpn, head.roi_heads
        self.assertIsInstance(rpn, RCNNAuxRPN)
        self.assertEqual(rpn.anchor_matcher.thresholds[1:-1], [0.3, 0.7])
        self.assertIsInstance(rpn.anchor_matcher, LowQualityMatcher)
        self.assertEqual(rpn.anchor_matcher.min_low_quality_iou, 0.3)
        self.assertTrue(roi.sample_as_authors)
        self.assertEqual((rpn.batch_size_per_image, rpn.positive_fraction), (256, 0.5))
        self.assertEqual(rpn.pre_nms_topk, {True: 4000, False: 1000})
        self.assertEqual(rpn.post_nms_topk, {True: 1000, False: 1000})
        self.assertEqual(rpn.nms_thresh, 0.7)
        # the authors' weights (the meta-architecture's lambda_2 multiplies them)
        self.assertEqual(rpn.loss_weight, {"loss_rpn_cls": 1.0, "loss_rpn_loc": 1.0})
        self.assertEqual((rpn.box_reg_loss_type, rpn.smooth_l1_beta), ("smooth_l1", 0.0))
        self.assertEqual(roi.proposal_matcher.thresholds[1:-1], [0.5])
        self.assertFalse(roi.proposal_matcher.allow_low_quality_matches)
        self.assertEqual((roi.batch_size_per_image, roi.positive_fraction), (512, 0.25))
        self.assertTrue(roi.proposal_append_gt)
        self.assertEqual(roi.box_in_features, LEVELS[:5])
        predictor = roi.box_predictor
        self.assertEqual(predictor.box2box_transform.weights, (10.0, 10.0, 5.0, 5.0))
        self.assertEqual(predictor.box_reg_loss_type, "giou")
        self.assertEqual(predictor.loss_weight, {"loss_cls": 1.0, "loss_box_reg": 10.0})
        self.assertEqual(predictor.bbox_pred.out_features, 4 * NUM_CLASSES)
        self.assertEqual(predictor.cls_score.out_features, NUM_CLASSES + 1)
        self.assertEqual(
            (predictor.test_score_thresh, predictor.test_nms_thresh, predictor.test_topk_per_image),
            (0.0, 0.5, 100),
        )
        self.assertEqual([fc.out_features for fc in roi.box_head.fcs], [16, 16])
        aligner = roi.box_pooler.level_poolers[0]
        self.assertTrue(aligner.aligned)
        self.assertEqual((aligner.output_size, aligner.sampling_ratio), ((7, 7), 0))

    def test_detectron2_training_conventions(self):
        head = _build(training_conventions="detectron2")
        self.assertIs(type(head.rpn), RPN)
        self.assertIs(type(head.rpn.anchor_matcher), Matcher)
        self.assertTrue(head.rpn.anchor_matcher.allow_low_quality_matches)
        self.assertFalse(head.roi_heads.sample_as_authors)
        with self.assertRaisesRegex(ValueError, "training_conventions.*'mmdet'"):
            _build(training_conventions="mmdet")

    def _levels(self, pooler, sizes):
        boxes = Boxes(torch.tensor([[0.0, 0.0, s, s] for s in sizes]))
        return assign_boxes_to_levels(
            [boxes],
            pooler.min_level,
            pooler.max_level,
            pooler.canonical_box_size,
            pooler.canonical_level,
        ).tolist()

    def test_roi_level_mapping_is_mmdet_finest_scale(self):
        # mmdet: level floor(log2(sqrt(area) / finest_scale)), clamped to the RoI levels
        pooler = _build().roi_heads.box_pooler
        sizes = [10.0, 111.9, 112.0, 223.9, 224.0, 448.0, 896.0, 5000.0]
        self.assertEqual(self._levels(pooler, sizes), [0, 0, 1, 1, 2, 3, 4, 4])
        # Co-Deformable-DETR: levels from stride 8, four RoI levels, finest_scale 112
        pooler = _build(in_features=LEVELS[1:], num_roi_levels=4, finest_scale=112)
        pooler = pooler.roi_heads.box_pooler
        sizes = [10.0, 223.9, 224.0, 448.0, 896.0, 5000.0]
        self.assertEqual(self._levels(pooler, sizes), [0, 0, 1, 2, 3, 3])

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "in_features"):
            _build(in_features=["p2", "p9"])
        for num_roi_levels in (0, len(LEVELS) + 1):
            with self.assertRaisesRegex(ValueError, "num_roi_levels"):
                _build(num_roi_levels=num_roi_levels)
        with self.assertRaisesRegex(ValueError, "num_classes"):
            _build(num_classes=0)
        shapes = {n: ShapeSpec(channels=CHANNELS, stride=s) for n, s in zip(LEVELS, STRIDES)}
        shapes["p7"] = ShapeSpec(channels=CHANNELS * 2, stride=128)
        with self.assertRaisesRegex(ValueError, "channel"):
            build_rcnn_aux_head(input_shape=shapes, in_features=LEVELS, num_classes=NUM_CLASSES)


class TestRCNNAuxHeadAssignment(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.image_sizes = [(64, 64)]
        self.features, self.images = _features(self.image_sizes)
        self.gt = [_gt((64, 64), [GT_A, GT_B], [1, 2])]

    def _run(self, head, gt):
        with EventStorage():
            return head(self.features, self.images, gt)

    def test_sampled_proposal_targets(self):
        head = _head_with_fixed_proposals([list(PROPOSALS.values())])
        _, (assignment,) = self._run(head, self.gt)
        # as the authors' sampler: the ground truth before the proposals, positives then
        # negatives, each in that order (nothing drawn: fewer candidates than wanted)
        self.assertEqual(_rows(assignment, in_order=True), SAMPLED_ROWS)

    def test_sampled_proposal_targets_detectron2(self):
        head = RCNNAuxHead(
            rpn=_FixedProposals([list(PROPOSALS.values())]),
            roi_heads=_build(training_conventions="detectron2").roi_heads,
        )
        _, (assignment,) = self._run(head, self.gt)
        self.assertEqual(_rows(assignment), sorted(SAMPLED_ROWS))
        # positives come first
        self.assertEqual(assignment.labels[:5].lt(NUM_CLASSES).tolist(), [True] * 5)

    def test_assignment_shapes_and_dtypes(self):
        head = _head_with_fixed_proposals([list(PROPOSALS.values())])
        _, assignments = self._run(head, self.gt)
        self.assertEqual(len(assignments), 1)
        assignment = assignments[0]
        self.assertIsInstance(assignment, AssignedCoords)
        self.assertEqual(assignment.boxes.shape, (7, 4))
        self.assertEqual(assignment.labels.shape, (7,))
        self.assertEqual(assignment.labels.dtype, torch.int64)
        self.assertEqual(assignment.target_boxes.shape, (7, 4))
        self.assertEqual(assignment.features.shape, (7, CHANNELS))

    def test_features_are_mean_of_pooled_features_pooled_once(self):
        head = _head_with_fixed_proposals([list(PROPOSALS.values())])
        pooler = head.roi_heads.box_pooler
        calls = []
        pooler.register_forward_hook(lambda module, inputs, output: calls.append(output))
        _, (assignment,) = self._run(head, self.gt)
        self.assertEqual(len(calls), 1)
        levels = [self.features[f] for f in LEVELS[:5]]
        pooled = pooler(levels, [Boxes(assignment.boxes)])
        self.assertEqual(pooled.shape, (7, CHANNELS, 7, 7))
        torch.testing.assert_close(assignment.features, pooled.mean(dim=(2, 3)))

    def test_losses_with_zero_predictors(self):
        # With zero outputs the box branch predicts uniform scores and the proposals themselves,
        # and the RPN predicts logit 0 for every anchor. Weights: the authors' times 12.
        head = _build(rpn_loss_weight=12.0, cls_loss_weight=12.0, giou_loss_weight=120.0)
        _zero_predictors(head)
        fixed = RCNNAuxHead(
            rpn=_FixedProposals([list(PROPOSALS.values())]), roi_heads=head.roi_heads
        )
        roi_losses, _ = self._run(fixed, self.gt)
        self.assertAlmostEqual(roi_losses["loss_cls"].item(), 12 * math.log(NUM_CLASSES + 1), 5)
        # 1 - GIoU of the positives: 0 for the boxes equal to a ground truth, 1 - 529 / 576 for
        # near_a and 1 - 0.5 for half_of_b (both enclosed by their ground truth); 7 sampled RoIs
        expected_giou = 120 * ((1 - 529 / 576) + 0.5) / 7
        self.assertAlmostEqual(roi_losses["loss_box_reg"].item(), expected_giou, 4)
        losses, _ = self._run(head, self.gt)
        # 256 sampled anchors, each with BCE log 2, normalised by 256 per image
        self.assertAlmostEqual(losses["loss_rpn_cls"].item(), 12 * math.log(2), 5)

    def test_rpn_box_loss_by_hand(self):
        # Zero deltas: the L1 loss (smooth L1, beta 0) of an anchor is the L1 norm of its target
        # deltas (weights 1): ((gx - ax) / aw, (gy - ay) / ah, log(gw / aw), log(gh / ah)).
        head = _build(rpn_loss_weight=1.5)
        _zero_predictors(head)
        # a thin box whose best anchors (4 of them, tied) have IoU .518 only: positive by the
        # low-quality rule alone
        thin = [30.0, 2.0, 62.0, 10.0]
        losses, _ = self._run(head, [_gt((64, 64), [GT_A, GT_B, thin], [1, 2, 0])])

        # the authors' matching: positive at IoU >= 0.7, negative below 0.3, and the anchors
        # at each ground truth's highest IoU (>= 0.3) positive for it (the later box wins)
        anchors = _anchors_by_hand((64, 64))
        gt_boxes = torch.tensor([GT_A, GT_B, thin], dtype=torch.float64)
        iou = box_iou(gt_boxes, anchors)  # (3, A)
        best_iou, matched = iou.max(0)
        positive = best_iou >= 0.7
        for g in range(3):
            highest = iou[g].max()
            self.assertGreaterEqual(highest.item(), 0.3)
            at_highest = iou[g] == highest
            positive |= at_highest
            matched[at_highest] = g
        self.assertEqual(int((matched[positive] == 2).sum()), 4)
        negative = (best_iou < 0.3) & ~positive
        # fewer positives than the 128 wanted: all of them are sampled, negatives fill 256
        num_positive = int(positive.sum())
        self.assertTrue(0 < num_positive <= 128, num_positive)
        self.assertGreater(int(negative.sum()), 256 - num_positive)

        a, g = anchors[positive], gt_boxes[matched[positive]]
        aw, ah = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
        gw, gh = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
        deltas = torch.stack(
            [
                ((g[:, 0] + g[:, 2]) - (a[:, 0] + a[:, 2])) / 2 / aw,
                ((g[:, 1] + g[:, 3]) - (a[:, 1] + a[:, 3])) / 2 / ah,
                torch.log(gw / aw),
                torch.log(gh / ah),
            ],
            1,
        )
        # normaliser: the 256 sampled anchors of the image
        expected = deltas.abs().sum() / 256 * 1.5
        torch.testing.assert_close(losses["loss_rpn_loc"].double(), expected, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(
            losses["loss_rpn_cls"].double(),
            torch.tensor(math.log(2) * 1.5, dtype=torch.float64),
            rtol=1e-6,
            atol=0.0,
        )

    def test_roi_losses_with_hand_set_predictions(self):
        # every RoI predicts the biases: class logits (1, .5, -.5, 0 for background); deltas
        # (weights 10, 10, 5, 5) zero for class 0, (1, -1, 0, 5 log 1.25) for class 1 (centre
        # moved by (.1, -.1) x size, height x 1.25), (0, 0, -5 log 2, 0) for class 2 (half width)
        head = _build(cls_loss_weight=1.5, giou_loss_weight=2.5)
        _zero_predictors(head)
        predictor = head.roi_heads.box_predictor
        with torch.no_grad():
            predictor.cls_score.bias.copy_(torch.tensor([1.0, 0.5, -0.5, 0.0]))
            predictor.bbox_pred.bias.copy_(
                torch.tensor(
                    [0.0, 0.0, 0.0, 0.0]
                    + [1.0, -1.0, 0.0, 5 * math.log(1.25)]
                    + [0.0, 0.0, -5 * math.log(2.0), 0.0]
                )
            )
        fixed = RCNNAuxHead(
            rpn=_FixedProposals([list(PROPOSALS.values())]), roi_heads=head.roi_heads
        )
        losses, _ = self._run(fixed, self.gt)

        # the 7 sampled RoIs (SAMPLED_ROWS), labels 1, 2, 1, 1, 2, 3, 3
        labels = torch.tensor([row[1] for row in SAMPLED_ROWS])
        self.assertEqual(labels.tolist(), [1, 2, 1, 1, 2, 3, 3])
        log_probs = torch.tensor([1.0, 0.5, -0.5, 0.0], dtype=torch.float64).log_softmax(0)
        expected_cls = -log_probs[labels].mean() * 1.5
        # the positives decoded with their class's deltas, against their ground truth
        predicted = torch.tensor(
            [
                _box(16 + 2.4, 16 - 2.4, 24, 30),  # GT_A (24 x 24 at (16, 16)), class 1
                _box(48, 48, 12, 24),  # GT_B (24 x 24 at (48, 48)), class 2
                _box(16 + 2.4, 16 - 2.4, 24, 30),  # equal_to_a
                _box(16.5 + 2.3, 16.5 - 2.3, 23, 28.75),  # near_a (23 x 23 at (16.5, 16.5))
                _box(42, 48, 6, 24),  # half_of_b (12 x 24 at (42, 48))
            ],
            dtype=torch.float64,
        )
        targets = torch.tensor([GT_A, GT_B, GT_A, GT_A, GT_B], dtype=torch.float64)
        giou_loss = 1 - generalized_box_iou(predicted, targets).diagonal()
        expected_box = giou_loss.sum() / 7 * 2.5  # mean over the sampled RoIs
        torch.testing.assert_close(losses["loss_cls"].double(), expected_cls, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(
            losses["loss_box_reg"].double(), expected_box, rtol=1e-5, atol=1e-7
        )

    def test_image_without_objects(self):
        head = _head_with_fixed_proposals([list(PROPOSALS.values())])
        logits = []
        head.roi_heads.box_predictor.cls_score.register_forward_hook(
            lambda m, i, out: logits.append(out.detach())
        )
        empty = [_gt((64, 64), [], [])]
        losses, (assignment,) = self._run(head, empty)
        self.assertEqual(len(assignment.labels), len(PROPOSALS))
        self.assertTrue(torch.all(assignment.labels == NUM_CLASSES))
        self.assertTrue(torch.all(assignment.target_boxes == 0))
        self.assertTrue(torch.equal(assignment.boxes, torch.tensor(list(PROPOSALS.values()))))
        self.assertEqual(losses["loss_box_reg"].item(), 0.0)
        # every RoI is background: the mean cross-entropy of the background class, weight 1
        (roi_logits,) = logits
        expected = -roi_logits.double().log_softmax(1)[:, NUM_CLASSES].mean()
        torch.testing.assert_close(losses["loss_cls"].double(), expected, rtol=1e-6, atol=1e-7)

    def test_batch_keeps_smallest_sample_count(self):
        # image 0 samples 7 RoIs (5 positive), image 1 only 3: both keep their first 3
        self.features, self.images = _features([(64, 64), (64, 48)])
        gt = self.gt + [_gt((64, 48), [[0.0, 0.0, 20.0, 20.0]], [0])]
        head = _head_with_fixed_proposals(
            [list(PROPOSALS.values()), [[0.0, 0.0, 20.0, 19.0], [30.0, 30.0, 40.0, 40.0]]]
        )
        _, assignments = self._run(head, gt)
        self.assertEqual([len(a.boxes) for a in assignments], [3, 3])
        self.assertEqual([len(a.features) for a in assignments], [3, 3])
        self.assertTrue(torch.all(assignments[0].labels < NUM_CLASSES))
        self.assertEqual(assignments[1].labels.tolist(), [0, 0, NUM_CLASSES])


class TestRCNNAuxHeadEndToEnd(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.head = _build()

    def _train_step(self, image_sizes, gt, requires_grad=False):
        features, images = _features(image_sizes, requires_grad)
        with EventStorage():
            losses, assignments = self.head(features, images, gt)
        return features, losses, assignments

    def test_losses_finite_and_named(self):
        gt = [_gt((64, 64), [GT_A, GT_B], [1, 2]), _gt((48, 64), [[8.0, 8.0, 40.0, 30.0]], [0])]
        _, losses, assignments = self._train_step([(64, 64), (48, 64)], gt)
        self.assertEqual(set(losses), LOSS_NAMES)
        for name, value in losses.items():
            self.assertEqual(value.dim(), 0, name)
            self.assertTrue(torch.isfinite(value), name)
        self.assertEqual(len(assignments), 2)
        for assignment, gt_i in zip(assignments, gt):
            positive = assignment.labels < NUM_CLASSES
            # every ground-truth box is among the sampled positives (added as a proposal)
            for box in gt_i.gt_boxes.tensor.tolist():
                self.assertIn(box, assignment.boxes[positive].tolist())
            self.assertTrue(torch.all(assignment.target_boxes[~positive] == 0))

    def test_gradient_reaches_features(self):
        gt = [_gt((64, 64), [GT_A, GT_B], [1, 2])]
        features, losses, (assignment,) = self._train_step([(64, 64)], gt, requires_grad=True)
        (sum(losses.values()) + assignment.features.sum()).backward()
        for name in ("p2", "p3"):
            grad = features[name].grad
            self.assertIsNotNone(grad, name)
            self.assertTrue(torch.isfinite(grad).all(), name)
            self.assertGreater(grad.abs().sum().item(), 0.0, name)
        self.assertIsNotNone(self.head.roi_heads.box_head.fc1.weight.grad)
        self.assertIsNotNone(self.head.rpn.rpn_head.conv.weight.grad)

    def test_batch_of_one_without_objects(self):
        _, losses, (assignment,) = self._train_step([(64, 64)], [_gt((64, 64), [], [])])
        self.assertEqual(set(losses), LOSS_NAMES)
        self.assertTrue(all(torch.isfinite(v) for v in losses.values()))
        self.assertEqual(losses["loss_box_reg"].item(), 0.0)
        self.assertEqual(losses["loss_rpn_loc"].item(), 0.0)
        self.assertGreater(len(assignment.labels), 0)
        self.assertTrue(torch.all(assignment.labels == NUM_CLASSES))
        self.assertTrue(torch.all(assignment.target_boxes == 0))

    def test_inference_contract(self):
        self.head.eval()
        features, images = _features([(64, 64), (40, 56)])
        with torch.no_grad():
            detections = self.head.inference(features, images)
        self.assertEqual(len(detections), 2)
        for instances, (height, width) in zip(detections, images.image_sizes):
            self.assertEqual(instances.image_size, (height, width))
            self.assertEqual(set(instances.get_fields()), {"pred_boxes", "scores", "pred_classes"})
            self.assertGreater(len(instances), 0)
            self.assertLessEqual(len(instances), 100)
            boxes = instances.pred_boxes.tensor
            self.assertTrue(torch.all(boxes >= 0))
            self.assertTrue(torch.all(boxes[:, 0::2] <= width))
            self.assertTrue(torch.all(boxes[:, 1::2] <= height))
            self.assertTrue(torch.all((instances.pred_classes >= 0)))
            self.assertTrue(torch.all(instances.pred_classes < NUM_CLASSES))
            scores = instances.scores
            self.assertTrue(torch.all(scores[:-1] >= scores[1:]))

    def test_inference_decodes_hand_set_predictions(self):
        # one proposal [8, 8, 40, 24] (32 x 16 at (24, 16)); class logits (2, 0, -1, .5 for
        # background); deltas (weights 10, 10, 5, 5): class 0 (1, 2, 5 log 2, 0), class 1 zero,
        # class 2 (-1, 0, 0, -5 log 2)
        head = _build()
        _zero_predictors(head)
        predictor = head.roi_heads.box_predictor
        with torch.no_grad():
            predictor.cls_score.bias.copy_(torch.tensor([2.0, 0.0, -1.0, 0.5]))
            predictor.bbox_pred.bias.copy_(
                torch.tensor(
                    [1.0, 2.0, 5 * math.log(2.0), 0.0]
                    + [0.0, 0.0, 0.0, 0.0]
                    + [-1.0, 0.0, 0.0, -5 * math.log(2.0)]
                )
            )
        fixed = RCNNAuxHead(
            rpn=_FixedProposals([[[8.0, 8.0, 40.0, 24.0]]]), roi_heads=head.roi_heads
        )
        fixed.eval()
        features, images = _features([(64, 48)])
        with torch.no_grad():
            (result,) = fixed.inference(features, images)
        probabilities = torch.tensor([2.0, 0.0, -1.0, 0.5]).softmax(0)
        # one detection per class, best first; class 0's box [-4.8, 11.2, 59.2, 27.2] is clipped
        # to the 48-wide image
        self.assertEqual(result.pred_classes.tolist(), [0, 1, 2])
        torch.testing.assert_close(result.scores, probabilities[:3])
        expected = torch.tensor(
            [[0.0, 11.2, 48.0, 27.2], [8.0, 8.0, 40.0, 24.0], [4.8, 12.0, 36.8, 20.0]]
        )
        torch.testing.assert_close(result.pred_boxes.tensor, expected, rtol=0, atol=1e-5)

    def test_mode_checks(self):
        features, images = _features([(64, 64)])
        with self.assertRaisesRegex(RuntimeError, "inference"):
            self.head.inference(features, images)
        with self.assertRaisesRegex(ValueError, "gt_instances"), EventStorage():
            self.head(features, images, [])
        self.head.eval()
        with self.assertRaisesRegex(RuntimeError, "training"):
            self.head(features, images, [_gt((64, 64), [], [])])

    def test_deterministic_with_fixed_seed(self):
        gt = [_gt((64, 64), [GT_A, GT_B], [1, 2])]
        results = []
        for _ in range(2):
            torch.manual_seed(3)
            self.head = _build()
            results.append(self._train_step([(64, 64)], gt))
        (_, losses_a, (a,)), (_, losses_b, (b,)) = results
        for name in LOSS_NAMES:
            self.assertEqual(losses_a[name].item(), losses_b[name].item(), name)
        for field in ("boxes", "labels", "target_boxes", "features"):
            torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=0, atol=0)


if __name__ == "__main__":
    unittest.main()


class TestConvBoxHead(unittest.TestCase):
    """The RoI box head of the authors' ViT-L COCO model: 4 GN convs, 1 FC, class-agnostic
    regression with target stds (0.05, 0.05, 0.1, 0.1)."""

    def test_layers_and_class_agnostic_decoding(self):
        torch.manual_seed(0)
        channels = 32  # GroupNorm(32)
        shapes = {n: ShapeSpec(channels=channels, stride=s) for n, s in zip(LEVELS, STRIDES)}
        head = build_rcnn_aux_head(
            input_shape=shapes,
            num_classes=NUM_CLASSES,
            fc_dim=16,
            num_box_head_convs=4,
            num_box_head_fcs=1,
            box_head_norm="GN",
            cls_agnostic_bbox_reg=True,
            box_reg_weights=(20.0, 20.0, 10.0, 10.0),
        )
        box_head = head.roi_heads.box_head
        convs = [box_head.get_submodule(f"conv{i}") for i in range(1, 5)]
        self.assertEqual([(c.in_channels, c.out_channels) for c in convs], [(channels,) * 2] * 4)
        self.assertTrue(
            all(isinstance(c.norm, torch.nn.GroupNorm) and c.bias is None for c in convs)
        )
        self.assertEqual(box_head.fc1.out_features, 16)
        self.assertFalse(hasattr(box_head, "fc2"))
        predictor = head.roi_heads.box_predictor
        self.assertEqual(predictor.bbox_pred.out_features, 4)
        # one delta for every class: (dx, dy) / 20 of the width / height, exp(dw / 10)
        proposal = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
        deltas = torch.tensor([[2.0, -4.0, 10.0 * math.log(2.0), 0.0]])
        decoded = predictor.box2box_transform.apply_deltas(deltas, proposal)
        # centre (20, 40) moves by (0.1 * 20, -0.2 * 40); width 20 doubles; height 40 stays
        torch.testing.assert_close(decoded, torch.tensor([[2.0, 12.0, 42.0, 52.0]]))
