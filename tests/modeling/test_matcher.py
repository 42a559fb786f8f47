import itertools
import math
import unittest

import torch

from codetr.modeling.matcher import HungarianMatcher


def _cxcywh(x1, y1, x2, y2):
    return [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]


def _hand_cost(logit, box, label, gt_box, weights=(2.0, 5.0, 2.0), alpha=0.25, gamma=2.0):
    """Cost of one (query, ground truth) pair, written out with the math module."""
    prob = 1 / (1 + math.exp(-logit[label]))
    positive = -math.log(prob + 1e-12) * alpha * (1 - prob) ** gamma
    negative = -math.log(1 - prob + 1e-12) * (1 - alpha) * prob**gamma
    l1 = sum(abs(a - b) for a, b in zip(box, gt_box))

    def xyxy(b):
        return b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2

    (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = xyxy(box), xyxy(gt_box)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    enclosing = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    giou = inter / union - (enclosing - union) / enclosing
    return weights[0] * (positive - negative) + weights[1] * l1 - weights[2] * giou


class TestHungarianMatcher(unittest.TestCase):
    def setUp(self):
        self.gt_boxes = torch.tensor(
            [_cxcywh(0.1, 0.1, 0.3, 0.4), _cxcywh(0.5, 0.5, 0.9, 0.8), _cxcywh(0.2, 0.6, 0.4, 0.9)]
        )
        self.gt_labels = torch.tensor([0, 2, 1])
        # query i predicts gt i exactly and is confident in its class
        self.logits = torch.full((3, 3), -4.0)
        self.logits[torch.arange(3), self.gt_labels] = 4.0

    def test_obvious_diagonal(self):
        query_indices, gt_indices = HungarianMatcher()(
            self.logits, self.gt_boxes, self.gt_labels, self.gt_boxes
        )
        self.assertEqual(query_indices.tolist(), [0, 1, 2])
        self.assertEqual(gt_indices.tolist(), [0, 1, 2])
        self.assertEqual(query_indices.dtype, torch.int64)
        self.assertEqual(gt_indices.dtype, torch.int64)

    def test_permuted(self):
        permutation = torch.tensor([2, 0, 1])  # query q predicts gt permutation[q]
        query_indices, gt_indices = HungarianMatcher()(
            self.logits[permutation], self.gt_boxes[permutation], self.gt_labels, self.gt_boxes
        )
        self.assertEqual(query_indices.tolist(), [0, 1, 2])
        self.assertEqual(gt_indices.tolist(), [2, 0, 1])

    def test_more_queries_than_gts(self):
        boxes = torch.tensor(
            [
                _cxcywh(0.7, 0.0, 0.9, 0.2),
                self.gt_boxes[1].tolist(),
                _cxcywh(0.0, 0.8, 0.1, 1.0),
                self.gt_boxes[0].tolist(),
                _cxcywh(0.8, 0.8, 1.0, 1.0),
            ]
        )
        logits = torch.full((5, 3), -4.0)
        logits[1, 2] = 4.0
        logits[3, 0] = 4.0
        query_indices, gt_indices = HungarianMatcher()(
            logits, boxes, self.gt_labels[:2], self.gt_boxes[:2]
        )
        self.assertEqual(query_indices.tolist(), [1, 3])
        self.assertEqual(gt_indices.tolist(), [1, 0])

    def test_no_ground_truth(self):
        query_indices, gt_indices = HungarianMatcher()(
            self.logits, self.gt_boxes, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4)
        )
        self.assertEqual(query_indices.shape, (0,))
        self.assertEqual(gt_indices.shape, (0,))
        self.assertEqual(query_indices.dtype, torch.int64)
        self.assertEqual(gt_indices.dtype, torch.int64)

    def test_weights_change_the_decision(self):
        # query 0: right class, box far away; query 1: wrong class, box exact
        gt_box = torch.tensor([_cxcywh(0.4, 0.4, 0.6, 0.6)])
        boxes = torch.tensor([_cxcywh(0.0, 0.0, 0.2, 0.2), gt_box[0].tolist()])
        logits = torch.tensor([[5.0, -5.0], [-5.0, 5.0]])
        gt_label = torch.tensor([0])
        box_driven = HungarianMatcher(class_weight=0.1)
        class_driven = HungarianMatcher(class_weight=2.0, l1_weight=0.1, giou_weight=0.1)
        self.assertEqual(box_driven(logits, boxes, gt_label, gt_box)[0].tolist(), [1])
        self.assertEqual(class_driven(logits, boxes, gt_label, gt_box)[0].tolist(), [0])

    def _random_case(self):
        generator = torch.Generator().manual_seed(0)
        logits = torch.randn(4, 3, generator=generator) * 2
        centers = torch.rand(4, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(4, 2, generator=generator) * 0.3 + 0.05
        boxes = torch.cat([centers, sizes], dim=1)
        gt_boxes = boxes[[2, 0, 3]] + torch.rand(3, 4, generator=generator) * 0.1
        gt_labels = torch.tensor([1, 1, 2])
        return logits, boxes, gt_labels, gt_boxes

    def test_cost_matrix_hand_computed(self):
        logits, boxes, gt_labels, gt_boxes = self._random_case()
        for weights, alpha, gamma in (((2.0, 5.0, 2.0), 0.25, 2.0), ((3.0, 1.0, 4.0), 0.4, 1.5)):
            matcher = HungarianMatcher(
                class_weight=weights[0], l1_weight=weights[1], giou_weight=weights[2],
                focal_alpha=alpha, focal_gamma=gamma,
            )
            expected = [
                [
                    _hand_cost(logits[q].tolist(), boxes[q].tolist(), int(gt_labels[g]),
                               gt_boxes[g].tolist(), weights, alpha, gamma)
                    for g in range(3)
                ]
                for q in range(4)
            ]
            torch.testing.assert_close(
                matcher.cost_matrix(logits, boxes, gt_labels, gt_boxes), torch.tensor(expected)
            )

    def test_matches_brute_force_on_hand_costs(self):
        logits, boxes, gt_labels, gt_boxes = self._random_case()
        weights = (3.0, 1.0, 4.0)
        costs = [
            [
                _hand_cost(logits[q].tolist(), boxes[q].tolist(), int(gt_labels[g]),
                           gt_boxes[g].tolist(), weights)
                for g in range(3)
            ]
            for q in range(4)
        ]
        best = min(
            itertools.permutations(range(4), 3),
            key=lambda queries: sum(costs[q][g] for g, q in enumerate(queries)),
        )
        matcher = HungarianMatcher(class_weight=3.0, l1_weight=1.0, giou_weight=4.0)
        query_indices, gt_indices = matcher(logits, boxes, gt_labels, gt_boxes)
        self.assertEqual(
            sorted(zip(query_indices.tolist(), gt_indices.tolist())),
            sorted((q, g) for g, q in enumerate(best)),
        )

    def test_bad_shapes(self):
        matcher = HungarianMatcher()
        with self.assertRaisesRegex(ValueError, "boxes"):
            matcher(self.logits, self.gt_boxes[:2], self.gt_labels, self.gt_boxes)
        with self.assertRaisesRegex(ValueError, "gt_boxes"):
            matcher(self.logits, self.gt_boxes, self.gt_labels, self.gt_boxes[:2])


if __name__ == "__main__":
    unittest.main()
