import math
import unittest

import torch

from codetr.modeling.distributed import average_across_workers
from codetr.modeling.losses import DetectionLoss, quality_focal_loss
from codetr.modeling.matcher import HungarianMatcher, hungarian_targets


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def _bce(x, target):
    prob = _sigmoid(x)
    return -(target * math.log(prob) + (1 - target) * math.log(1 - prob))


class TestQualityFocalLoss(unittest.TestCase):
    def test_hand_computed_2x3(self):
        logits = torch.tensor([[0.5, -1.0, 2.0], [0.0, 1.0, -0.5]], dtype=torch.float64)
        labels = torch.tensor([1, 3])  # query 0 is class 1, query 1 is background
        quality = torch.tensor([0.6, 0.9], dtype=torch.float64)  # 0.9 ignored (background)
        row0 = (
            _bce(0.5, 0.0) * _sigmoid(0.5) ** 2
            + _bce(-1.0, 0.6) * abs(0.6 - _sigmoid(-1.0)) ** 2
            + _bce(2.0, 0.0) * _sigmoid(2.0) ** 2
        )
        row1 = sum(_bce(x, 0.0) * _sigmoid(x) ** 2 for x in (0.0, 1.0, -0.5))
        loss = quality_focal_loss(logits, labels, quality)
        self.assertEqual(loss.shape, (2,))
        torch.testing.assert_close(loss, torch.tensor([row0, row1], dtype=torch.float64))

    def test_beta(self):
        logits = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
        labels = torch.tensor([0])
        quality = torch.tensor([0.25], dtype=torch.float64)
        expected = (
            _bce(0.3, 0.25) * abs(0.25 - _sigmoid(0.3)) ** 3
            + _bce(-0.2, 0.0) * _sigmoid(-0.2) ** 3
        )
        loss = quality_focal_loss(logits, labels, quality, beta=3.0)
        torch.testing.assert_close(loss, torch.tensor([expected], dtype=torch.float64))

    def test_bad_shapes(self):
        with self.assertRaisesRegex(ValueError, "labels"):
            quality_focal_loss(torch.zeros(2, 3), torch.zeros(3, dtype=torch.int64), torch.zeros(3))


def _dense(boxes, labels, target_boxes):
    """(Q, 4), (Q,), (Q, 4) lists -> batched tensors with B = 1."""
    return (
        torch.tensor([boxes]),
        torch.tensor([labels]),
        torch.tensor([target_boxes]),
    )


def _pixels(batch_size, size=(640.0, 480.0)):
    """(B, 4) box normalisers (w, h, w, h) of B images of ``size`` (w, h) pixels."""
    width, height = size
    return torch.tensor([[width, height, width, height]]).expand(batch_size, 4)


class TestDetectionLoss(unittest.TestCase):
    def test_focal_hand_computed(self):
        logits = torch.tensor([[[1.5, -0.5], [0.2, -2.0]]])
        # query 0 is class 1, query 1 is background; boxes exact, so box losses are zero
        boxes, labels, target_boxes = _dense(
            [[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]],
            [1, 2],
            [[0.5, 0.5, 0.2, 0.2], [0.9, 0.9, 0.1, 0.1]],
        )
        alpha, gamma = 0.25, 2.0

        def focal(x, target):
            prob = _sigmoid(x)
            prob_t = prob * target + (1 - prob) * (1 - target)
            alpha_t = alpha * target + (1 - alpha) * (1 - target)
            return alpha_t * (1 - prob_t) ** gamma * _bce(x, target)

        total = focal(1.5, 0) + focal(-0.5, 1) + focal(0.2, 0) + focal(-2.0, 0)
        criterion = DetectionLoss(num_classes=2, class_loss="focal", class_weight=2.0)
        losses = criterion(logits, boxes, labels, target_boxes, box_normalizers=_pixels(1),
                           num_positives=3.0)
        torch.testing.assert_close(losses["loss_class"], torch.tensor(total / 3.0 * 2.0))
        torch.testing.assert_close(losses["loss_bbox"], torch.tensor(0.0))
        torch.testing.assert_close(losses["loss_giou"], torch.tensor(0.0), atol=1e-6, rtol=0)

    def test_box_losses_hand_computed(self):
        # query 0 overlaps its target: L1 = 0.1, IoU = GIoU = 1/3
        # query 1 is disjoint from its target: L1 = 0.5, GIoU = -(0.14 - 0.08) / 0.14
        # query 2 is background: its (far away) target box is ignored
        boxes, labels, target_boxes = _dense(
            [[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2], [0.5, 0.5, 0.1, 0.1]],
            [0, 1, 3],
            [[0.6, 0.5, 0.2, 0.2], [0.7, 0.2, 0.2, 0.2], [0.1, 0.9, 0.3, 0.1]],
        )
        logits = torch.zeros(1, 3, 3)
        criterion = DetectionLoss(num_classes=3, class_loss="focal", class_weight=2.0)
        losses = criterion(logits, boxes, labels, target_boxes, box_normalizers=_pixels(1),
                           num_positives=4.0)
        giou_sum = (1 - 1 / 3) + (1 + 0.06 / 0.14)
        torch.testing.assert_close(losses["loss_bbox"], torch.tensor(0.6 / 4.0 * 5.0))
        torch.testing.assert_close(losses["loss_giou"], torch.tensor(giou_sum / 4.0 * 2.0))

        weighted = DetectionLoss(
            num_classes=3, class_loss="focal", class_weight=2.0, l1_weight=1.0, giou_weight=3.0
        )(logits, boxes, labels, target_boxes, box_normalizers=_pixels(1), num_positives=2.0)
        torch.testing.assert_close(weighted["loss_bbox"], torch.tensor(0.6 / 2.0))
        torch.testing.assert_close(weighted["loss_giou"], torch.tensor(giou_sum / 2.0 * 3.0))

    def test_giou_does_not_depend_on_the_image_sizes(self):
        # the hand case above in two images of different sizes and aspect ratios: the boxes are
        # scaled back to pixels per image and axis, which leaves every (G)IoU unchanged
        boxes, labels, target_boxes = _dense(
            [[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2]],
            [0, 1],
            [[0.6, 0.5, 0.2, 0.2], [0.7, 0.2, 0.2, 0.2]],
        )
        boxes, target_boxes = boxes.repeat(2, 1, 1), target_boxes.repeat(2, 1, 1)
        labels = labels.repeat(2, 1)
        criterion = DetectionLoss(num_classes=3, class_loss="focal", class_weight=2.0)
        giou_sum = 2 * ((1 - 1 / 3) + (1 + 0.06 / 0.14))
        for normalizers in (
            _pixels(2),
            torch.tensor([[640.0, 480.0, 640.0, 480.0], [37.0, 1000.0, 37.0, 1000.0]]),
            torch.ones(2, 4),
        ):
            losses = criterion(torch.zeros(2, 2, 3), boxes, labels, target_boxes,
                               box_normalizers=normalizers, num_positives=4.0)
            torch.testing.assert_close(losses["loss_giou"], torch.tensor(giou_sum / 4.0 * 2.0))

    def test_quality_focal_uses_detached_iou(self):
        # IoU = 0.01 / 0.07 = 1/7 while GIoU = 1/7 - 0.02/0.09
        boxes, labels, target_boxes = _dense(
            [[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]],
            [1, 2],
            [[0.6, 0.6, 0.2, 0.2], [0.0, 0.0, 0.0, 0.0]],
        )
        boxes.requires_grad_(True)
        logits = torch.tensor([[[0.4, -0.3], [1.0, 0.0]]], requires_grad=True)
        criterion = DetectionLoss(num_classes=2, class_loss="quality_focal", class_weight=1.0)
        losses = criterion(logits, boxes, labels, target_boxes, box_normalizers=_pixels(1),
                           num_positives=5.0)
        expected = quality_focal_loss(
            logits.detach()[0], labels[0], torch.tensor([1 / 7, 0.0])
        ).sum() / 5.0
        torch.testing.assert_close(losses["loss_class"], expected)
        box_gradient, = torch.autograd.grad(losses["loss_class"], boxes, allow_unused=True)
        self.assertIsNone(box_gradient)

    def test_all_background(self):
        torch.manual_seed(0)
        logits = torch.randn(2, 4, 3, requires_grad=True)
        boxes = torch.rand(2, 4, 4).mul(0.5).add(0.1).requires_grad_(True)
        labels = torch.full((2, 4), 3)
        target_boxes = torch.zeros(2, 4, 4)
        for class_loss in ("quality_focal", "focal"):
            criterion = DetectionLoss(num_classes=3, class_loss=class_loss, class_weight=1.0)
            losses = criterion(logits, boxes, labels, target_boxes,
                               box_normalizers=_pixels(2), num_positives=1.0)
            self.assertTrue(torch.isfinite(losses["loss_class"]))
            self.assertGreater(losses["loss_class"].item(), 0.0)
            self.assertEqual(losses["loss_bbox"].item(), 0.0)
            self.assertEqual(losses["loss_giou"].item(), 0.0)
            # the box losses stay connected to the graph with a zero gradient
            box_gradient, = torch.autograd.grad(
                losses["loss_bbox"] + losses["loss_giou"], boxes
            )
            self.assertEqual(box_gradient.abs().sum().item(), 0.0)

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "class_loss"):
            DetectionLoss(num_classes=2, class_loss="softmax", class_weight=1.0)
        criterion = DetectionLoss(num_classes=2, class_loss="focal", class_weight=1.0)
        with self.assertRaisesRegex(ValueError, "logits"):
            criterion(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.zeros(1, 2).long(),
                      torch.zeros(1, 2, 4), box_normalizers=_pixels(1), num_positives=1.0)
        with self.assertRaisesRegex(ValueError, "target_labels"):
            criterion(torch.zeros(1, 2, 2), torch.zeros(1, 2, 4), torch.zeros(2).long(),
                      torch.zeros(1, 2, 4), box_normalizers=_pixels(1), num_positives=1.0)


class TestHungarianTargets(unittest.TestCase):
    def test_scatter(self):
        # image 0: queries 2 and 0 predict gts 0 and 1; image 1 has no objects
        gt_boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]])
        boxes = torch.tensor(
            [
                [[0.7, 0.6, 0.3, 0.2], [0.1, 0.9, 0.1, 0.1], [0.3, 0.3, 0.2, 0.2]],
                [[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1]],
            ]
        )
        logits = torch.full((2, 3, 4), -3.0)
        logits[0, 2, 1] = 3.0
        logits[0, 0, 3] = 3.0
        targets = [
            {"labels": torch.tensor([1, 3]), "boxes": gt_boxes},
            {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
        ]
        target_labels, target_boxes, num_matched = hungarian_targets(
            HungarianMatcher(), logits, boxes, targets, 4
        )
        self.assertEqual(num_matched, 2)
        self.assertEqual(target_labels.dtype, torch.int64)
        self.assertEqual(target_labels.tolist(), [[3, 4, 1], [4, 4, 4]])
        expected_boxes = torch.zeros(2, 3, 4)
        expected_boxes[0, 0] = gt_boxes[1]
        expected_boxes[0, 2] = gt_boxes[0]
        torch.testing.assert_close(target_boxes, expected_boxes)

    def test_wrong_number_of_targets(self):
        with self.assertRaisesRegex(ValueError, "targets"):
            hungarian_targets(HungarianMatcher(), torch.zeros(2, 3, 4), torch.zeros(2, 3, 4),
                              [], 4)


class TestAverageAcrossWorkers(unittest.TestCase):
    def test_not_distributed(self):
        device = torch.device("cpu")
        self.assertEqual(average_across_workers(3.5, device), 3.5)
        self.assertEqual(average_across_workers(7, device), 7.0)
        self.assertEqual(average_across_workers(0.0, device), 1.0)
        self.assertEqual(average_across_workers(0.25, device), 1.0)


if __name__ == "__main__":
    unittest.main()
