import math
import unittest

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn
from torchvision.ops import generalized_box_iou, sigmoid_focal_loss

from codetr.modeling.aux_heads.atss import ATSSHead, atss_assign

# Hand-built anchors used throughout: level 0 has five 8x8 anchors in a row, level 1 three
# 16x16 anchors (what a stride 8 / stride 16 generator with offset 0.5 gives on 1x5 and 1x3
# feature maps).
LEVEL0 = torch.tensor(
    [[0, 0, 8, 8], [8, 0, 16, 8], [16, 0, 24, 8], [24, 0, 32, 8], [32, 0, 40, 8]],
    dtype=torch.float32,
)
LEVEL1 = torch.tensor([[0, 0, 16, 16], [16, 0, 32, 16], [32, 0, 48, 16]], dtype=torch.float32)


def _instances(image_size, boxes, classes) -> Instances:
    return Instances(
        image_size,
        gt_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)),
        gt_classes=torch.tensor(classes, dtype=torch.long),
    )


def _small_anchor_head(**kwargs) -> ATSSHead:
    """A head whose anchors are LEVEL0 / LEVEL1 on 1x5 / 1x3 feature maps."""
    channels = kwargs.pop("channels", 32)
    anchor_generator = DefaultAnchorGenerator(
        sizes=[[8], [16]], aspect_ratios=[1.0], strides=[8, 16], offset=0.5
    )
    return ATSSHead(
        input_shape={
            "p3": ShapeSpec(channels=channels, stride=8),
            "p4": ShapeSpec(channels=channels, stride=16),
        },
        in_features=["p3", "p4"],
        num_classes=2,
        anchor_generator=anchor_generator,
        **kwargs,
    )


def _zero_conv_weights(head: ATSSHead) -> None:
    """Every prediction becomes its conv bias: class logit = prior, deltas 0, centerness 0."""
    for module in head.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.zeros_(module.weight)


def _co_dino_like_head(seed: int = 0, **kwargs) -> ATSSHead:
    torch.manual_seed(seed)
    return ATSSHead(
        input_shape={
            "p2": ShapeSpec(channels=32, stride=4),
            "p3": ShapeSpec(channels=32, stride=8),
        },
        in_features=["p2", "p3"],
        num_classes=3,
        **kwargs,
    )


def _co_dino_like_batch(seed: int = 0):
    torch.manual_seed(seed)
    features = {
        "p2": torch.randn(2, 32, 16, 16, requires_grad=True),
        "p3": torch.randn(2, 32, 8, 8, requires_grad=True),
    }
    images = ImageList(torch.zeros(2, 3, 64, 64), [(64, 64), (48, 40)])
    gt_instances = [
        _instances((64, 64), [[4, 6, 40, 34], [2, 4, 62, 60]], [2, 0]),
        _instances((48, 40), [[10, 10, 38, 44]], [1]),
    ]
    return features, images, gt_instances


def _decode_by_hand(deltas, anchors):
    """Deltas with weights (10, 10, 5, 5) applied to XYXY anchors; the size deltas clamped to
    +-log(1000 / 16), as the authors' coder."""
    limit = math.log(1000.0 / 16)
    widths, heights = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    cx, cy = anchors[:, 0] + widths / 2, anchors[:, 1] + heights / 2
    cx = cx + deltas[:, 0] / 10 * widths
    cy = cy + deltas[:, 1] / 10 * heights
    widths = widths * torch.exp((deltas[:, 2] / 5).clamp(-limit, limit))
    heights = heights * torch.exp((deltas[:, 3] / 5).clamp(-limit, limit))
    return torch.stack([cx - widths / 2, cy - heights / 2, cx + widths / 2, cy + heights / 2], 1)


def _prediction_hooks(head):
    """Records the outputs of the three prediction convs, per level."""
    outputs = {"cls_score": [], "bbox_pred": [], "centerness": []}
    for name, record in outputs.items():
        getattr(head, name).register_forward_hook(
            lambda m, i, out, record=record: record.append(out.detach())
        )
    return outputs


def _default_anchors(strides, sizes):
    """The default anchors: a square of 8 x stride centred on stride * (x, y), row-major."""
    anchors = []
    for stride, (height, width) in zip(strides, sizes):
        ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        centres = torch.stack([xs.flatten(), ys.flatten()], 1).float() * stride
        anchors.append(torch.cat([centres - 4 * stride, centres + 4 * stride], 1))
    return anchors


class TestATSSAssign(unittest.TestCase):
    def test_two_levels(self):
        anchors = torch.cat([LEVEL0, LEVEL1])
        gt_boxes = torch.tensor([[0, 0, 10, 8], [14, 0, 40, 16]], dtype=torch.float32)
        # Box 0, centre (5, 4): candidates are anchors 0, 1, 2 (level 0) and 5, 6, 7 (level 1,
        # all three since topk = 3) with IoUs .8, .125, 0, .3125, 0, 0: mean .2063, std .3156,
        # threshold .5219 -> anchor 0 (centre (4, 4) inside).
        # Box 1, centre (27, 8): candidates 3, 2, 4 (IoU 4/26 each) and 6, 7, 5 (IoUs 16/26,
        # 8/34, .05): mean .2270, std .1991, threshold .4262 -> anchor 6.
        matched = atss_assign(anchors, [5, 3], gt_boxes, topk=3)
        self.assertEqual(matched.tolist(), [0, -1, -1, -1, -1, -1, 1, -1])

    def test_threshold_uses_unbiased_std(self):
        # Candidates 1, 2, 0 with IoUs 4/7, .375, 0: mean .3155 + unbiased std .2903 = .6058
        # exceeds the best IoU, so nothing is positive (the population std, .2370, would make
        # anchor 1 positive).
        gt_boxes = torch.tensor([[8, 0, 22, 8]], dtype=torch.float32)
        self.assertEqual(atss_assign(LEVEL0, [5], gt_boxes, topk=3).tolist(), [-1] * 5)

    def test_center_must_be_strictly_inside(self):
        # Anchor 0 has IoU .5 (candidates .5, 0, 0: threshold .1667 + .2887 = .4553) but its
        # centre x = 4 lies on the right side of the box: not positive.
        on_border = torch.tensor([[0, 0, 4, 8]], dtype=torch.float32)
        self.assertEqual(atss_assign(LEVEL0, [5], on_border, topk=3).tolist(), [-1] * 5)
        # Widened by 0.5: IoU .5625 >= threshold .5123 and the centre is 0.5 inside.
        inside = torch.tensor([[0, 0, 4.5, 8]], dtype=torch.float32)
        self.assertEqual(atss_assign(LEVEL0, [5], inside, topk=3).tolist(), [0, -1, -1, -1, -1])

    def test_anchor_positive_for_two_boxes_takes_highest_iou(self):
        # Anchor 1 is positive for both boxes: IoU 1 with [8, 0, 16, 8] (threshold .9107) and
        # 2/3 with [6, 0, 18, 8] (threshold .6171); it goes to the first.
        exact, wide = [8, 0, 16, 8], [6, 0, 18, 8]
        matched = atss_assign(LEVEL0, [5], torch.tensor([exact, wide], dtype=torch.float32), topk=3)
        self.assertEqual(matched.tolist(), [-1, 0, -1, -1, -1])
        matched = atss_assign(LEVEL0, [5], torch.tensor([wide, exact], dtype=torch.float32), topk=3)
        self.assertEqual(matched.tolist(), [-1, 1, -1, -1, -1])

    def test_no_ground_truth(self):
        matched = atss_assign(LEVEL0, [5], torch.zeros(0, 4), topk=3)
        self.assertEqual(matched.tolist(), [-1] * 5)
        self.assertEqual(matched.dtype, torch.long)

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "num_anchors_per_level"):
            atss_assign(LEVEL0, [4], torch.zeros(0, 4), topk=3)
        with self.assertRaisesRegex(ValueError, "topk"):
            atss_assign(LEVEL0, [5], torch.zeros(0, 4), topk=0)


class TestATSSHeadTraining(unittest.TestCase):
    # the authors' weights 1, 2, 1 times the 12 the meta-architecture multiplies them by
    WEIGHTS_X12 = dict(cls_loss_weight=12.0, bbox_loss_weight=24.0, centerness_loss_weight=12.0)

    def _hand_case(self, **kwargs):
        head = _small_anchor_head(**(kwargs or self.WEIGHTS_X12))
        _zero_conv_weights(head)
        features = {"p3": torch.randn(2, 32, 1, 5), "p4": torch.randn(2, 32, 1, 3)}
        # The second image covers 3 of the 5 level-0 columns and 2 of the 3 level-1 columns.
        images = ImageList(torch.zeros(2, 3, 8, 40), [(8, 40), (8, 20)])
        return head, features, images

    def test_targets(self):
        head, features, images = self._hand_case()
        gt_instances = [
            _instances((8, 40), [[0, 0, 10, 8], [14, 0, 40, 16]], [1, 0]),
            # Candidates among the valid anchors only: 0, 1, 2 and 5, 6 (IoUs .8, .125, 0,
            # .3125, 0): threshold .2475 + .3343 = .5818 -> anchor 0.
            _instances((8, 20), [[0, 0, 10, 8]], [1]),
        ]
        _, assignments = head(features, images, gt_instances)
        self.assertEqual(len(assignments), 2)
        first, second = assignments

        self.assertTrue(torch.equal(first.boxes, torch.cat([LEVEL0, LEVEL1])))
        self.assertEqual(first.labels.tolist(), [1, 2, 2, 2, 2, 2, 0, 2])
        expected_targets = torch.zeros(8, 4)
        expected_targets[0] = torch.tensor([0, 0, 10, 8])
        expected_targets[6] = torch.tensor([14, 0, 40, 16])
        self.assertTrue(torch.equal(first.target_boxes, expected_targets))
        self.assertIsNone(first.features)

        # Anchors outside the second image's valid cells are unassigned zero boxes.
        expected_boxes = torch.cat([LEVEL0, LEVEL1])
        expected_boxes[[3, 4, 7]] = 0
        self.assertTrue(torch.equal(second.boxes, expected_boxes))
        self.assertEqual(second.labels.tolist(), [1, 2, 2, 2, 2, 2, 2, 2])
        expected_targets = torch.zeros(8, 4)
        expected_targets[0] = torch.tensor([0, 0, 10, 8])
        self.assertTrue(torch.equal(second.target_boxes, expected_targets))

        # Centre (4, 4) in [0, 0, 10, 8]: l, r = 4, 6; t, b = 4, 4. Centre (24, 8) in
        # [14, 0, 40, 16]: l, r = 10, 16; t, b = 8, 8.
        centerness = ATSSHead.centerness_targets(
            torch.stack([LEVEL0[0], LEVEL1[1]]),
            expected_targets.new_tensor([[0, 0, 10, 8], [14, 0, 40, 16]]),
        )
        torch.testing.assert_close(centerness, torch.tensor([math.sqrt(4 / 6), math.sqrt(10 / 16)]))

    def test_losses_by_hand(self):
        head, features, images = self._hand_case()
        gt_instances = [
            _instances((8, 40), [[0, 0, 10, 8], [14, 0, 40, 16]], [1, 0]),
            _instances((8, 20), [], []),
        ]
        losses, _ = head(features, images, gt_instances)
        self.assertEqual(set(losses), {"loss_cls", "loss_bbox", "loss_centerness"})

        # Positives: anchor 0 -> box 0 (class 1), anchor 6 -> box 1 (class 0). Normaliser:
        # 2 positives + 1 for the image without any = 3.
        prior = 0.01
        positive_focal = 0.25 * (1 - prior) ** 2 * -math.log(prior)
        negative_focal = 0.75 * prior**2 * -math.log(1 - prior)
        # (8 + 5 valid anchors) x 2 classes = 26 terms, 2 of them positive.
        expected_cls = (2 * positive_focal + 24 * negative_focal) / 3 * 12.0
        # Zero deltas decode to the anchors: GIoU .8 (anchor 0) and 256/416 (anchor 6, the
        # enclosing box is the ground truth), weighted by the centerness targets.
        ctr0, ctr6 = math.sqrt(4 / 6), math.sqrt(10 / 16)
        expected_bbox = ((1 - 0.8) * ctr0 + (1 - 256 / 416) * ctr6) / (ctr0 + ctr6) * 24.0
        # Centerness logit 0: BCE = log 2 whatever the target.
        expected_centerness = 2 * math.log(2) / 3 * 12.0

        self.assertAlmostEqual(losses["loss_cls"].item(), expected_cls, places=4)
        self.assertAlmostEqual(losses["loss_bbox"].item(), expected_bbox, places=4)
        self.assertAlmostEqual(losses["loss_centerness"].item(), expected_centerness, places=4)

    def test_batch_without_objects(self):
        head, features, images = self._hand_case()
        gt_instances = [_instances((8, 40), [], []), _instances((8, 20), [], [])]
        losses, assignments = head(features, images, gt_instances)
        # 13 valid anchors x 2 classes, all negative; normaliser 1 per image.
        negative_focal = 0.75 * 0.01**2 * -math.log(0.99)
        self.assertAlmostEqual(losses["loss_cls"].item(), 26 * negative_focal / 2 * 12.0, places=6)
        self.assertEqual(losses["loss_bbox"].item(), 0.0)
        self.assertEqual(losses["loss_centerness"].item(), 0.0)
        for loss in losses.values():
            self.assertTrue(loss.requires_grad)
        sum(losses.values()).backward()
        self.assertIsNotNone(head.bbox_pred.weight.grad)
        self.assertIsNotNone(head.centerness.weight.grad)
        for assignment in assignments:
            self.assertTrue((assignment.labels == 2).all())
            self.assertTrue((assignment.target_boxes == 0).all())

    def test_losses_with_hand_set_predictions(self):
        # every anchor predicts its conv biases: class logits (.5, -1), deltas (1, -2, 1.5, -.5)
        # (level 1: times its scale 2), centerness logit .8
        head, features, images = self._hand_case(
            cls_loss_weight=1.5, bbox_loss_weight=2.5, centerness_loss_weight=0.5
        )
        with torch.no_grad():
            head.cls_score.bias.copy_(torch.tensor([0.5, -1.0]))
            head.bbox_pred.bias.copy_(torch.tensor([1.0, -2.0, 1.5, -0.5]))
            head.centerness.bias.fill_(0.8)
            head.scales[1].scale.fill_(2.0)
        gt_instances = [
            _instances((8, 40), [[0, 0, 10, 8], [14, 0, 40, 16]], [1, 0]),
            _instances((8, 20), [], []),
        ]
        losses, _ = head(features, images, gt_instances)

        # Positives (test_targets): anchor 0 [0, 0, 8, 8] -> box 0 (class 1), anchor 6
        # [16, 0, 32, 16] -> box 1 (class 0). Decoded with weights (10, 10, 5, 5):
        # anchor 0, deltas (.1, -.2, .3, -.1) x size 8: centre (4.8, 2.4), size 8e^.3 x 8e^-.1;
        # anchor 6, deltas (.2, -.4, .6, -.2) x size 16: centre (27.2, 1.6), 16e^.6 x 16e^-.2.
        def box(cx, cy, w, h):
            return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]

        predicted = torch.tensor(
            [
                box(4.8, 2.4, 8 * math.exp(0.3), 8 * math.exp(-0.1)),
                box(27.2, 1.6, 16 * math.exp(0.6), 16 * math.exp(-0.2)),
            ],
            dtype=torch.float64,
        )
        targets = torch.tensor([[0, 0, 10, 8], [14, 0, 40, 16]], dtype=torch.float64)
        giou_loss = 1 - generalized_box_iou(predicted, targets).diagonal()
        centerness = torch.tensor([math.sqrt(4 / 6), math.sqrt(10 / 16)], dtype=torch.float64)
        expected_bbox = (giou_loss * centerness).sum() / centerness.sum() * 2.5

        # focal loss over the 13 valid anchors x 2 classes: 12 background terms and one positive
        # per class; normaliser 2 positives + 1 for the image without any
        logits = torch.tensor([0.5, -1.0], dtype=torch.float64)
        background = sigmoid_focal_loss(logits, torch.zeros(2, dtype=torch.float64))
        foreground = sigmoid_focal_loss(logits, torch.ones(2, dtype=torch.float64))
        expected_cls = (12 * background.sum() + foreground.sum()) / 3 * 1.5
        expected_centerness = (
            F.binary_cross_entropy_with_logits(
                torch.full((2,), 0.8, dtype=torch.float64), centerness, reduction="sum"
            )
            / 3
            * 0.5
        )
        for name, expected in [
            ("loss_cls", expected_cls),
            ("loss_bbox", expected_bbox),
            ("loss_centerness", expected_centerness),
        ]:
            torch.testing.assert_close(
                losses[name].double(), expected, rtol=1e-6, atol=1e-7, msg=name
            )

    def test_losses_recomputed_from_the_predictions(self):
        head = _co_dino_like_head(
            cls_loss_weight=1.5, bbox_loss_weight=2.5, centerness_loss_weight=0.5
        )
        outputs = _prediction_hooks(head)
        features, images, gt_instances = _co_dino_like_batch()
        losses, assignments = head(features, images, gt_instances)

        def per_anchor(maps):  # per level (B, C, H, W) -> (B, A, C), float64
            return torch.cat([m.flatten(2) for m in maps], 2).transpose(1, 2).double()

        logits = per_anchor(outputs["cls_score"])
        deltas = per_anchor(outputs["bbox_pred"])  # the level scales are 1
        centerness_logits = per_anchor(outputs["centerness"])[..., 0]
        level_sizes = [(16, 16), (8, 8)]
        anchors = torch.cat(_default_anchors([4, 8], level_sizes)).double()
        # an image's anchors: the locations within its ceil(size / stride) cells per level
        valid = []
        for height, width in images.image_sizes:
            masks = []
            for stride, (rows, columns) in zip([4, 8], level_sizes):
                ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(columns), indexing="ij")
                inside = (xs < math.ceil(width / stride)) & (ys < math.ceil(height / stride))
                masks.append(inside.flatten())
            valid.append(torch.cat(masks))
        valid = torch.stack(valid)
        self.assertEqual(valid.sum(1).tolist(), [16 * 16 + 8 * 8, 12 * 10 + 6 * 5])
        for assignment, image_valid in zip(assignments, valid):
            # the anchors, zero outside the image's valid cells
            torch.testing.assert_close(
                assignment.boxes.double(), anchors * image_valid[:, None], rtol=0, atol=0
            )

        labels = torch.stack([a.labels for a in assignments])
        targets = torch.stack([a.target_boxes for a in assignments]).double()
        positive = labels < 3
        num_positive = positive.sum(1)
        self.assertTrue((num_positive > 0).all(), num_positive)
        normalizer = num_positive.clamp(min=1).sum().item()

        one_hot = F.one_hot(labels, 4)[..., :3].double()
        focal = sigmoid_focal_loss(logits, one_hot, alpha=0.25, gamma=2.0, reduction="none")
        expected_cls = (focal * valid[..., None]).sum() / normalizer * 1.5

        positive_anchors = anchors.expand(2, -1, -1)[positive]
        positive_targets = targets[positive]
        centres = (positive_anchors[:, :2] + positive_anchors[:, 2:]) / 2
        left_top = centres - positive_targets[:, :2]
        right_bottom = positive_targets[:, 2:] - centres
        ratios = left_top.minimum(right_bottom) / left_top.maximum(right_bottom)
        centerness = (ratios[:, 0] * ratios[:, 1]).sqrt()
        predicted = _decode_by_hand(deltas[positive], positive_anchors)
        giou_loss = 1 - generalized_box_iou(predicted, positive_targets).diagonal()
        expected_bbox = (giou_loss * centerness).sum() / centerness.sum() * 2.5
        expected_centerness = (
            F.binary_cross_entropy_with_logits(
                centerness_logits[positive], centerness, reduction="sum"
            )
            / normalizer
            * 0.5
        )
        for name, expected in [
            ("loss_cls", expected_cls),
            ("loss_bbox", expected_bbox),
            ("loss_centerness", expected_centerness),
        ]:
            torch.testing.assert_close(
                losses[name].double(), expected, rtol=1e-5, atol=1e-7, msg=name
            )

    def test_gradients_reach_features(self):
        head = _co_dino_like_head()
        features, images, gt_instances = _co_dino_like_batch()
        losses, _ = head(features, images, gt_instances)
        sum(losses.values()).backward()
        for feature in features.values():
            self.assertGreater(feature.grad.abs().sum().item(), 0.0)
        for name, param in head.named_parameters():
            self.assertIsNotNone(param.grad, name)
            self.assertGreater(param.grad.abs().sum().item(), 0.0, name)

    def test_batch_size_one(self):
        head = _co_dino_like_head()
        features, images, gt_instances = _co_dino_like_batch()
        _, batch_assignments = head(features, images, gt_instances)
        features = {k: v[1:] for k, v in features.items()}
        images = ImageList(images.tensor[1:], images.image_sizes[1:])
        losses, assignments = head(features, images, gt_instances[1:])
        self.assertEqual(set(losses), {"loss_cls", "loss_bbox", "loss_centerness"})
        self.assertEqual(len(assignments), 1)
        num_anchors = 16 * 16 + 8 * 8
        self.assertEqual(assignments[0].boxes.shape, (num_anchors, 4))
        # an image's assignment does not depend on the other images of its batch
        for field in ("boxes", "labels", "target_boxes"):
            self.assertTrue(
                torch.equal(getattr(assignments[0], field), getattr(batch_assignments[1], field)),
                field,
            )

    def test_deterministic_with_seed(self):
        results = []
        for _ in range(2):
            head = _co_dino_like_head(seed=3)
            losses, _ = head(*_co_dino_like_batch(seed=4))
            results.append(torch.stack([losses[k] for k in sorted(losses)]))
        self.assertTrue(torch.equal(results[0], results[1]))

    def test_mismatched_batch(self):
        head = _co_dino_like_head()
        features, images, gt_instances = _co_dino_like_batch()
        with self.assertRaisesRegex(ValueError, "gt_instances"):
            head(features, images, gt_instances[:1])


class TestATSSHeadInference(unittest.TestCase):
    def test_scores_topk_nms_and_clipping(self):
        # No towers; class logit k = feature channel k, centerness logit = channel 2, zero
        # deltas: each detection is an anchor with hand-chosen probabilities.
        head = _small_anchor_head(
            channels=3, num_convs=0, test_topk_candidates=3, max_detections_per_image=4
        )
        _zero_conv_weights(head)
        for k in range(2):
            head.cls_score.weight.data[k, k, 1, 1] = 1.0
        head.cls_score.bias.data.zero_()
        head.centerness.weight.data[0, 2, 1, 1] = 1.0

        def level(class0, class1, centerness):
            probs = torch.tensor([class0, class1, centerness], dtype=torch.float64)
            return torch.log(probs / (1 - probs)).float()[None, :, None, :]

        features = {
            "p3": level(
                [0.9, 0.2, 0.5, 0.3, 0.6], [0.1, 0.8, 0.4, 0.05, 0.7], [0.5, 0.9, 0.95, 0.6, 0.2]
            ),
            "p4": level([0.95, 0.15, 0.6], [0.45, 0.55, 0.65], [0.2, 0.8, 0.9]),
        }
        images = ImageList(torch.zeros(1, 3, 8, 40), [(8, 36)])
        (result,) = head.inference(features, images)

        # Top 3 (anchor, class) pairs by class probability per level, scores x centerness:
        #   level 0: (0, c0) .9 x .5, (1, c1) .8 x .9, (4, c1) .7 x .2  [(2, c0) .5 x .95 = .475
        #            is not a candidate: the pre-NMS top-k uses the class probability alone]
        #   level 1: (5, c0) .95 x .2, (7, c1) .65 x .9, (7, c0) .6 x .9
        # Boxes clipped to 8 x 36: anchors 4 and 7 both become [32, 0, 36, 8]; class-aware
        # NMS drops (4, c1) for (7, c1) but keeps (7, c0). Then the best 4.
        self.assertEqual(result.image_size, (8, 36))
        torch.testing.assert_close(
            result.scores, torch.tensor([0.72, 0.585, 0.54, 0.45]), rtol=0, atol=1e-6
        )
        self.assertEqual(result.pred_classes.tolist(), [1, 1, 0, 0])
        expected_boxes = torch.tensor(
            [[8, 0, 16, 8], [32, 0, 36, 8], [32, 0, 36, 8], [0, 0, 8, 8]], dtype=torch.float32
        )
        torch.testing.assert_close(result.pred_boxes.tensor, expected_boxes)

    def test_size_deltas_clamped_from_below(self):
        # As the authors' coder: exp(dw) is bounded to [16 / 1000, 1000 / 16].
        head = _small_anchor_head(channels=3, num_convs=0)
        _zero_conv_weights(head)
        head.bbox_pred.bias.data = torch.tensor([0.0, 0.0, -100.0, -100.0])
        features = {"p3": torch.zeros(1, 3, 1, 5), "p4": torch.zeros(1, 3, 1, 3)}
        (result,) = head.inference(features, ImageList(torch.zeros(1, 3, 16, 48), [(16, 48)]))
        self.assertEqual(len(result), 16)  # 8 disjoint boxes x 2 classes, none clipped
        boxes = result.pred_boxes.tensor
        widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        # 5 level-0 anchors (size 8) and 3 level-1 anchors (size 16), 2 classes each.
        expected = torch.tensor([8 * 0.016] * 10 + [16 * 0.016] * 6)
        torch.testing.assert_close(widths.sort().values, expected)
        torch.testing.assert_close(heights, widths)

    def test_decoding_of_hand_set_deltas(self):
        # every anchor predicts class logits (2, -2) and deltas (1, -.5, 5 log 2, 0): centre
        # moved by (.1, -.05) x its size, width doubled; class 1 (.12) is under the threshold
        head = _small_anchor_head(channels=3, num_convs=0, test_score_thresh=0.5)
        _zero_conv_weights(head)
        with torch.no_grad():
            head.cls_score.bias.copy_(torch.tensor([2.0, -2.0]))
            head.bbox_pred.bias.copy_(torch.tensor([1.0, -0.5, 5 * math.log(2.0), 0.0]))
        features = {"p3": torch.zeros(1, 3, 1, 5), "p4": torch.zeros(1, 3, 1, 3)}
        (result,) = head.inference(features, ImageList(torch.zeros(1, 3, 16, 48), [(16, 48)]))
        # level 0, anchor [8k, 0, 8k + 8, 8]: centre (8k + 4.8, 3.6), 16 x 8;
        # level 1, anchor [16k, 0, 16k + 16, 16]: centre (16k + 9.6, 7.2), 32 x 16;
        # clipped to 48 x 16 (no two boxes overlap at IoU 0.6: all kept)
        expected = [[8 * k - 3.2, -0.4, 8 * k + 12.8, 7.6] for k in range(5)]
        expected += [[16 * k - 6.4, -0.8, 16 * k + 25.6, 15.2] for k in range(3)]
        expected = torch.tensor(expected)
        expected[:, 0::2] = expected[:, 0::2].clamp(0, 48)
        expected[:, 1::2] = expected[:, 1::2].clamp(0, 16)
        boxes = result.pred_boxes.tensor
        order = torch.argsort(boxes[:, 0] * 1000 + boxes[:, 2])
        expected_order = torch.argsort(expected[:, 0] * 1000 + expected[:, 2])
        torch.testing.assert_close(boxes[order], expected[expected_order], rtol=0, atol=1e-5)
        self.assertEqual(result.pred_classes.tolist(), [0] * 8)
        # class probability x centerness probability (logit 0)
        torch.testing.assert_close(
            result.scores, torch.full((8,), torch.sigmoid(torch.tensor(2.0)).item() * 0.5)
        )

    def test_output_contract(self):
        head = _co_dino_like_head()
        head.eval()
        features, images, _ = _co_dino_like_batch()
        with torch.no_grad():
            results = head.inference(features, images)
        self.assertEqual(len(results), 2)
        for result, (height, width) in zip(results, images.image_sizes):
            self.assertEqual(result.image_size, (height, width))
            self.assertEqual(set(result.get_fields()), {"pred_boxes", "scores", "pred_classes"})
            self.assertGreater(len(result), 0)
            self.assertLessEqual(len(result), 100)
            boxes = result.pred_boxes.tensor
            self.assertTrue((boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= width).all())
            self.assertTrue((boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= height).all())
            scores = result.scores
            self.assertTrue(((scores > 0) & (scores <= 1)).all())
            self.assertTrue((scores[:-1] >= scores[1:]).all())
            self.assertEqual(result.pred_classes.dtype, torch.long)
            self.assertTrue(((result.pred_classes >= 0) & (result.pred_classes < 3)).all())


class TestATSSHeadConstruction(unittest.TestCase):
    def test_parameters_and_init(self):
        head = _co_dino_like_head()
        self.assertEqual(
            set(head.state_dict()),
            {
                "cls_tower.0.weight",
                "cls_tower.0.norm.weight",
                "cls_tower.0.norm.bias",
                "bbox_tower.0.weight",
                "bbox_tower.0.norm.weight",
                "bbox_tower.0.norm.bias",
                "cls_score.weight",
                "cls_score.bias",
                "bbox_pred.weight",
                "bbox_pred.bias",
                "centerness.weight",
                "centerness.bias",
                "scales.0.scale",
                "scales.1.scale",
            },
        )
        self.assertIsInstance(head.cls_tower[0].norm, nn.GroupNorm)
        self.assertEqual(head.cls_tower[0].norm.num_groups, 32)
        self.assertIsNone(head.cls_tower[0].bias)
        torch.testing.assert_close(
            head.cls_score.bias, torch.full((3,), -math.log(99.0)), rtol=0, atol=1e-6
        )
        self.assertTrue((head.bbox_pred.bias == 0).all() and (head.centerness.bias == 0).all())
        self.assertAlmostEqual(head.cls_tower[0].weight.std().item(), 0.01, delta=0.001)
        self.assertEqual([s.scale.item() for s in head.scales], [1.0, 1.0])
        # the authors' loss weights (the meta-architecture's lambda_2 multiplies them)
        self.assertEqual(
            (head.cls_loss_weight, head.bbox_loss_weight, head.centerness_loss_weight),
            (1.0, 2.0, 1.0),
        )

    def test_default_anchors_and_transform(self):
        head = _co_dino_like_head()
        anchors = head.anchor_generator([torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 1, 1)])
        # One 8 x stride square per location, centred on the location (offset 0).
        self.assertEqual(anchors[0].tensor[:2].tolist(), [[-16, -16, 16, 16], [-12, -16, 20, 16]])
        self.assertEqual(anchors[1].tensor.tolist(), [[-32, -32, 32, 32]])
        self.assertEqual(head.box2box_transform.weights, (10.0, 10.0, 5.0, 5.0))

    def test_bad_arguments(self):
        shape = {"p3": ShapeSpec(channels=32, stride=8), "p4": ShapeSpec(channels=32, stride=16)}
        with self.assertRaisesRegex(ValueError, "in_features"):
            ATSSHead(input_shape=shape, in_features=["p5"], num_classes=2)
        with self.assertRaisesRegex(ValueError, "strides"):
            ATSSHead(
                input_shape=shape,
                in_features=["p3", "p4"],
                num_classes=2,
                anchor_generator=DefaultAnchorGenerator(
                    sizes=[[64], [128]], aspect_ratios=[1.0], strides=[8, 32], offset=0.0
                ),
            )
        with self.assertRaisesRegex(ValueError, "one anchor per location"):
            ATSSHead(
                input_shape=shape,
                in_features=["p3", "p4"],
                num_classes=2,
                anchor_generator=DefaultAnchorGenerator(
                    sizes=[[64], [128]], aspect_ratios=[0.5, 1.0], strides=[8, 16], offset=0.0
                ),
            )


if __name__ == "__main__":
    unittest.main()
