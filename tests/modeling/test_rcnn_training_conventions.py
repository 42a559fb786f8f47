"""
The authors' (mmdet's) training conventions of the R-CNN auxiliary head, on hand-computed
cases: low-quality matching, sampling, the anchors an image owns, the RPN loss normaliser, the
order of the proposals.
"""

import math
import unittest
from typing import Dict, List

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.matcher import Matcher
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage

from codetr.modeling.aux_heads.anchors import RatioMajorAnchorGenerator, valid_anchor_mask
from codetr.modeling.aux_heads.rcnn import build_rcnn_aux_head
from codetr.modeling.aux_heads.sampling import LowQualityMatcher, sample_in_order
from codetr.modeling.random_draws import RandomDraws, random_draws_from

# IoU of 3 ground-truth boxes (rows) with 4 predictions (columns)
IOU = torch.tensor(
    [
        [0.50, 0.50, 0.10, 0.20],  # best 0.50 at predictions 0 and 1
        [0.45, 0.10, 0.10, 0.20],  # best 0.45 at prediction 0, which gt 0 has at 0.50
        [0.05, 0.10, 0.25, 0.20],  # best 0.25: below the 0.3 a low-quality match needs
    ]
)


class FixedPermutations(RandomDraws):
    """Hands out given permutations by purpose and records what was asked."""

    def __init__(self, permutations: Dict[str, List[int]]):
        self.permutations = permutations
        self.asked: List[str] = []

    def permutation(self, purpose, n, device):
        self.asked.append(purpose)
        values = torch.tensor(self.permutations[purpose])
        assert values.numel() == n, (purpose, n)
        return values


class TestLowQualityMatcher(unittest.TestCase):
    def test_min_iou_and_last_ground_truth_wins(self):
        matches, labels = LowQualityMatcher([0.3, 0.7], [0, -1, 1], min_low_quality_iou=0.3)(IOU)
        # 0: best of gt 0 and of gt 1, the later wins; 1: best of gt 0; 2: gt 2's best is
        # below 0.3, and 0.25 < 0.3 makes it negative; 3: negative
        self.assertEqual(labels.tolist(), [1, 1, 0, 0])
        self.assertEqual(matches[:2].tolist(), [1, 0])

    def test_detectron2_rule_differs(self):
        matches, labels = Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True)(IOU)
        self.assertEqual(labels.tolist(), [1, 1, 1, 0])
        self.assertEqual(matches[:3].tolist(), [0, 0, 2])

    def test_no_ground_truth(self):
        matches, labels = LowQualityMatcher([0.3, 0.7], [0, -1, 1], min_low_quality_iou=0.3)(
            torch.zeros(0, 5)
        )
        self.assertEqual(labels.tolist(), [0] * 5)
        self.assertEqual(matches.tolist(), [0] * 5)


class TestSampleInOrder(unittest.TestCase):
    # positives at 1, 4, 6, 9, 12; negatives elsewhere but at the ignored 0 and 14
    LABELS = torch.tensor([-1, 2, 5, 5, 0, 5, 1, 5, 5, 3, 5, 5, 1, 5, -1])

    def test_subsets_drawn_only_when_too_many_and_sorted(self):
        draws = FixedPermutations(
            {"roi.positive": [4, 0, 3, 1, 2], "roi.negative": [7, 0, 6, 5, 1, 2, 3, 4]}
        )
        with random_draws_from(draws):
            positive, negative = sample_in_order(self.LABELS, 8, 0.25, 5, "roi")
        # 2 of the 5 positives: positions 4 and 0 -> indices 12 and 1, in increasing order
        self.assertEqual(positive.tolist(), [1, 12])
        # 6 of the 8 negatives (2, 3, 5, 7, 8, 10, 11, 13): positions 7, 0, 6, 5, 1, 2
        # -> indices 13, 2, 11, 10, 3, 5
        self.assertEqual(negative.tolist(), [2, 3, 5, 10, 11, 13])
        self.assertEqual(draws.asked, ["roi.positive", "roi.negative"])

    def test_nothing_drawn_when_few(self):
        draws = FixedPermutations({})
        with random_draws_from(draws):
            positive, negative = sample_in_order(self.LABELS, 32, 0.5, 5, "rpn")
        self.assertEqual(positive.tolist(), [1, 4, 6, 9, 12])
        self.assertEqual(negative.tolist(), [2, 3, 5, 7, 8, 10, 11, 13])
        self.assertEqual(draws.asked, [])


class TestValidAnchorMask(unittest.TestCase):
    def test_locations_within_the_image(self):
        generator = RatioMajorAnchorGenerator(
            sizes=[[16.0], [32.0]], aspect_ratios=[[0.5, 1.0, 2.0]], strides=[4, 8], offset=0.0
        )
        # a batch padded to 16 x 16: 4 x 4 locations at stride 4, 2 x 2 at stride 8
        anchors = generator([torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 2)])

        def expected(rows_4, cols_4, rows_8, cols_8):
            mask = []
            for (height, width), rows, cols in (((4, 4), rows_4, cols_4), ((2, 2), rows_8, cols_8)):
                for y in range(height):
                    for x in range(width):
                        mask += [y < rows and x < cols] * 3
            return mask

        masks = valid_anchor_mask(anchors, [4, 8], 0.0, [(9, 16), (5, 7)])
        # 9 x 16 image: ceil(9 / 4) = 3 rows at stride 4, ceil(9 / 8) = 2 at stride 8
        self.assertEqual(masks[0].tolist(), expected(3, 4, 2, 2))
        # 5 x 7: 2 x 2 locations at stride 4, 1 x 1 at stride 8
        self.assertEqual(masks[1].tolist(), expected(2, 2, 1, 1))
        self.assertEqual(int(masks[1].sum()), 15)


def _rpn(**kwargs):
    shapes = {"p2": ShapeSpec(channels=4, stride=4), "p3": ShapeSpec(channels=4, stride=8)}
    return build_rcnn_aux_head(
        input_shape=shapes, num_classes=2, num_roi_levels=2, fc_dim=8, **kwargs
    ).rpn


class TestRPNLossNormaliser(unittest.TestCase):
    def test_sampled_anchors_each_count_at_least_one(self):
        rpn = _rpn(rpn_loss_weight=12.0)
        anchors = [Boxes(torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 4))]
        # image 0: 1 positive, 2 negatives; image 1: no positive (counted as 1), 2 negatives
        gt_labels = [torch.tensor([1, 0, 0, -1]), torch.tensor([0, 0, -1, -1])]
        gt_boxes = [torch.tensor([[2.0, 0.0, 10.0, 8.0]] * 4), torch.zeros(4, 4)]
        logits = [torch.zeros(2, 4)]
        deltas = [torch.zeros(2, 4, 4)]
        with EventStorage():
            losses = rpn.losses(anchors, logits, gt_labels, deltas, gt_boxes)
        normaliser = (1 + 2) + (1 + 2)
        # 5 sampled anchors at probability 0.5; one positive whose target dx is 2 / 8
        self.assertAlmostEqual(losses["loss_rpn_cls"].item(), 12 * 5 * math.log(2) / normaliser, 5)
        self.assertAlmostEqual(losses["loss_rpn_loc"].item(), 12 * 0.25 / normaliser, 6)


class TestProposalOrder(unittest.TestCase):
    def _proposals(self, rpn, level_boxes, level_logits):
        rpn.eval()
        anchors = [Boxes(torch.tensor(boxes)) for boxes in level_boxes]
        logits = [torch.tensor([values]) for values in level_logits]
        deltas = [torch.zeros(1, len(boxes), 4) for boxes in level_boxes]
        (instances,) = rpn.predict_proposals(anchors, logits, deltas, [(100, 100)])
        return instances.proposal_boxes.tensor.tolist(), instances.objectness_logits

    def test_ties_by_position_and_nms_per_level(self):
        rpn = _rpn()
        level_0 = [[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0], [40.0, 0.0, 50.0, 10.0]]
        # level 1's first box is level 0's second: not suppressed (another level); its second
        # overlaps its first (IoU 0.9): suppressed
        level_1 = [[20.0, 0.0, 30.0, 10.0], [20.0, 0.0, 29.0, 10.0]]
        boxes, scores = self._proposals(rpn, [level_0, level_1], [[0.0, 2.0, 0.0], [2.0, 1.0]])
        # equal probabilities keep the order of the list: level 0 first, then by anchor
        self.assertEqual(boxes, [level_0[1], level_1[0], level_0[0], level_0[2]])
        torch.testing.assert_close(scores, torch.sigmoid(torch.tensor([2.0, 2.0, 0.0, 0.0])))

    def test_top_k_per_level_before_nms(self):
        rpn = _rpn()
        rpn.pre_nms_topk[False] = 2
        level_0 = [[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0], [40.0, 0.0, 50.0, 10.0]]
        level_1 = [[60.0, 0.0, 70.0, 10.0], [80.0, 0.0, 90.0, 10.0]]
        boxes, _ = self._proposals(rpn, [level_0, level_1], [[0.5, 2.0, 1.0], [0.0, 3.0]])
        self.assertEqual(boxes, [level_1[1], level_0[1], level_0[2], level_1[0]])

    def test_test_time_nms_threshold(self):
        # IoU 0.8 between the two boxes: suppressed at 0.7 (training), kept at 0.9 (test)
        level_0 = [[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 8.0]]
        rpn = _rpn(rpn_train_nms_thresh=0.7, rpn_test_nms_thresh=0.9)
        boxes, _ = self._proposals(rpn, [level_0], [[1.0, 0.0]])
        self.assertEqual(boxes, level_0)
        rpn.train()
        (instances,) = rpn.predict_proposals(
            [Boxes(torch.tensor(level_0))],
            [torch.tensor([[1.0, 0.0]])],
            [torch.zeros(1, 2, 4)],
            [(100, 100)],
        )
        boxes = instances.proposal_boxes.tensor.tolist()
        self.assertEqual(boxes, level_0[:1])

    def test_detectron2_conventions_take_one_nms_threshold(self):
        with self.assertRaisesRegex(
            ValueError, "rpn_train_nms_thresh=0.7.*rpn_test_nms_thresh=0.9"
        ):
            _rpn(
                training_conventions="detectron2",
                rpn_train_nms_thresh=0.7,
                rpn_test_nms_thresh=0.9,
            )


if __name__ == "__main__":
    unittest.main()
