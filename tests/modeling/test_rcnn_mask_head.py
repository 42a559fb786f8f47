"""
The mask branch of the Faster R-CNN auxiliary head (``build_rcnn_aux_head(mask_on=True)``, the
authors' ``FCNMaskHead``): its targets and loss by hand, training batches with and without
objects, the masks it predicts, the error when the data carry no masks, and that the branch, off
by default, changes nothing of the box-only head.
"""

import inspect
import math
import unittest
from unittest import mock

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import detector_postprocess
from detectron2.modeling.roi_heads import mask_head as d2_mask_head
from detectron2.structures import BitMasks, Boxes, ImageList, Instances, PolygonMasks
from detectron2.utils.events import EventStorage
from torch import nn

from codetr.modeling.aux_heads.rcnn import RCNNAuxHead, build_rcnn_aux_head

NUM_CLASSES = 3
CHANNELS = 8
LEVELS = ["p2", "p3", "p4", "p5", "p6", "p7"]
STRIDES = [4, 8, 16, 32, 64, 128]
BOX_LOSS_NAMES = {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"}
LOSS_NAMES = BOX_LOSS_NAMES | {"loss_mask"}
MASK_SIZE = 28
MASK_FORMATS = ("polygon", "bitmask")

# One object in a 64x64 image: the square [8, 56) x [8, 56) (its box), class 1. The first
# proposal overlaps it at IoU 48^2 / 56^2 = 0.73 (positive), the second at IoU 256 / 2624
# (background).
IMAGE = (64, 64)
SQUARE = [8.0, 8.0, 56.0, 56.0]
PROPOSALS = [[0.0, 0.0, 56.0, 56.0], [40.0, 0.0, 64.0, 24.0]]


def _targets_by_hand():
    """The 28x28 targets of the two positive RoIs, in sampling order: the ground-truth box
    (added as a proposal) is covered by the mask; on [0, 56)^2 each target cell is 2x2 pixels
    and cells 4..27 of each axis lie in the square."""
    own_box = torch.ones(MASK_SIZE, MASK_SIZE)
    larger = torch.zeros(MASK_SIZE, MASK_SIZE)
    larger[4:, 4:] = 1.0
    return torch.stack([own_box, larger])


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


def _gt(image_size, boxes, classes, mask_format="polygon"):
    """Ground truth whose masks fill their boxes (None: no ``gt_masks`` field)."""
    gt = Instances(image_size)
    gt.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    gt.gt_classes = torch.tensor(classes, dtype=torch.int64)
    if mask_format == "polygon":
        gt.gt_masks = PolygonMasks([[[x0, y0, x1, y0, x1, y1, x0, y1]] for x0, y0, x1, y1 in boxes])
    elif mask_format == "bitmask":
        bitmaps = torch.zeros(len(boxes), *image_size, dtype=torch.bool)
        for bitmap, (x0, y0, x1, y1) in zip(bitmaps, boxes):
            bitmap[int(y0) : int(y1), int(x0) : int(x1)] = True
        gt.gt_masks = BitMasks(bitmaps)
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


def _with_fixed_proposals(boxes_per_image, **kwargs):
    return RCNNAuxHead(
        rpn=_FixedProposals(boxes_per_image), roi_heads=_build(mask_on=True, **kwargs).roi_heads
    )


def _set_mask_logits(head, logits_per_class):
    """The mask head predicts, for class c, the constant logit ``logits_per_class[c]``."""
    predictor = head.roi_heads.mask_head.predictor
    with torch.no_grad():
        predictor.weight.zero_()
        predictor.bias.copy_(torch.tensor(logits_per_class))


def _softplus(x):
    return math.log1p(math.exp(x))


class TestMaskTargetsAndLoss(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)

    def _train(self, head, image_sizes, gt):
        features, images = _features(image_sizes)
        with EventStorage():
            losses, _ = head(features, images, gt)
        return features, losses

    def test_targets_by_hand(self):
        for mask_format in MASK_FORMATS:
            with self.subTest(mask_format=mask_format):
                head = _with_fixed_proposals([PROPOSALS])
                gt = [_gt(IMAGE, [SQUARE], [1], mask_format)]
                loss = d2_mask_head.mask_rcnn_loss
                with mock.patch.object(d2_mask_head, "mask_rcnn_loss", wraps=loss) as spy:
                    self._train(head, [IMAGE], gt)
                (logits, (positives,), _), _ = spy.call_args
                self.assertEqual(tuple(logits.shape), (2, NUM_CLASSES, MASK_SIZE, MASK_SIZE))
                # the positive RoIs only: the ground truth, then the overlapping proposal
                self.assertEqual(positives.proposal_boxes.tensor.tolist(), [SQUARE, PROPOSALS[0]])
                self.assertEqual(positives.gt_classes.tolist(), [1, 1])
                targets = positives.gt_masks.crop_and_resize(
                    positives.proposal_boxes.tensor, MASK_SIZE
                )
                self.assertEqual(targets.dtype, torch.bool)
                torch.testing.assert_close(targets.float(), _targets_by_hand(), rtol=0, atol=0)

    def test_loss_by_hand_with_constant_logits(self):
        # class 1's mask logit is 0.7 everywhere; the other classes' would give other losses
        logit = 0.7
        ones = MASK_SIZE**2 + 24**2  # in the two targets
        zeros = 2 * MASK_SIZE**2 - ones
        expected = (ones * _softplus(-logit) + zeros * _softplus(logit)) / (2 * MASK_SIZE**2)
        for mask_format in MASK_FORMATS:
            for weight in (1.0, 2.5):
                with self.subTest(mask_format=mask_format, mask_loss_weight=weight):
                    head = _with_fixed_proposals([PROPOSALS], mask_loss_weight=weight)
                    _set_mask_logits(head, [-3.0, logit, 2.0])
                    gt = [_gt(IMAGE, [SQUARE], [1], mask_format)]
                    _, losses = self._train(head, [IMAGE], gt)
                    self.assertAlmostEqual(losses["loss_mask"].item(), weight * expected, places=6)

    def test_loss_is_bce_on_the_ground_truth_class_channel(self):
        # only the ground-truth boxes are positive (the proposals lie apart), each target is all
        # ones (the masks fill their boxes); three objects of three classes in two images
        boxes = [[[8.0, 8.0, 56.0, 56.0]], [[4.0, 4.0, 32.0, 32.0], [36.0, 8.0, 60.0, 60.0]]]
        classes = [[1], [2, 0]]
        head = _with_fixed_proposals([[[56.0, 0.0, 64.0, 8.0]], [[0.0, 40.0, 24.0, 64.0]]])
        gt = [_gt(IMAGE, b, c) for b, c in zip(boxes, classes)]
        features, losses = self._train(head, [IMAGE, IMAGE], gt)

        roi_heads = head.roi_heads
        pooled = roi_heads.mask_pooler(
            [features[f] for f in roi_heads.mask_in_features],
            [Boxes(torch.tensor(b)) for b in boxes],
        )
        logits = roi_heads.mask_head.layers(pooled)  # (3, NUM_CLASSES, 28, 28)
        on_class = logits[torch.arange(3), torch.tensor([1, 2, 0])]
        expected = F.binary_cross_entropy_with_logits(on_class, torch.ones_like(on_class))
        torch.testing.assert_close(losses["loss_mask"], expected, rtol=1e-6, atol=0)


class TestMaskTraining(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)

    def _train_step(self, head, image_sizes, gt):
        features, images = _features(image_sizes, requires_grad=True)
        with EventStorage():
            losses, assignments = head(features, images, gt)
        sum(losses.values()).backward()
        return features, losses, assignments

    def test_batch_with_an_image_without_objects(self):
        for conventions in ("authors", "detectron2"):
            with self.subTest(training_conventions=conventions):
                head = _build(mask_on=True, training_conventions=conventions)
                # detectron2's mapper gives an image without objects no gt_masks field
                gt = [_gt(IMAGE, [], [], mask_format=None), _gt(IMAGE, [SQUARE], [1])]
                features, losses, assignments = self._train_step(head, [IMAGE, IMAGE], gt)
                self.assertEqual(set(losses), LOSS_NAMES)
                for name, value in losses.items():
                    self.assertTrue(torch.isfinite(value), name)
                self.assertGreater(losses["loss_mask"].item(), 0.0)
                self.assertEqual(len(assignments), 2)
                mask_head = head.roi_heads.mask_head
                for name, parameter in mask_head.named_parameters():
                    self.assertGreater(parameter.grad.abs().sum().item(), 0.0, name)
                self.assertTrue(all(torch.isfinite(f.grad).all() for f in features.values()))

    def test_batch_of_one(self):
        head = _build(mask_on=True)
        _, losses, _ = self._train_step(head, [IMAGE], [_gt(IMAGE, [SQUARE], [1], "bitmask")])
        self.assertEqual(set(losses), LOSS_NAMES)
        self.assertGreater(losses["loss_mask"].item(), 0.0)
        self.assertTrue(torch.isfinite(losses["loss_mask"]))

    def test_batch_of_one_without_objects(self):
        head = _build(mask_on=True)
        for mask_format in ("polygon", None):  # empty masks, or none
            with self.subTest(mask_format=mask_format):
                head.zero_grad(set_to_none=True)
                gt = [_gt(IMAGE, [], [], mask_format)]
                _, losses, (assignment,) = self._train_step(head, [IMAGE], gt)
                self.assertEqual(set(losses), LOSS_NAMES)
                # no positive RoI: no mask loss, but a graph through the mask head (0 gradients)
                self.assertEqual(losses["loss_mask"].item(), 0.0)
                self.assertIsNotNone(losses["loss_mask"].grad_fn)
                for name, parameter in head.roi_heads.mask_head.named_parameters():
                    self.assertEqual(parameter.grad.abs().sum().item(), 0.0, name)
                self.assertTrue(torch.all(assignment.labels == NUM_CLASSES))

    def test_missing_gt_masks_is_an_error(self):
        head = _build(mask_on=True)
        features, images = _features([IMAGE, IMAGE])
        gt = [_gt(IMAGE, [SQUARE], [1]), _gt(IMAGE, [SQUARE], [1], mask_format=None)]
        with EventStorage(), self.assertRaisesRegex(ValueError, r"image\(s\) \[1\]") as error:
            head(features, images, gt)
        message = str(error.exception)
        self.assertIn("mask_on=True", message)
        self.assertIn("gt_masks", message)
        self.assertIn("dataloader.train.mapper.use_instance_mask=True", message)


class TestMaskInference(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)

    def test_pred_masks_shape_and_type(self):
        head = _build(mask_on=True).eval()
        features, images = _features([(64, 64), (40, 56)])
        with torch.no_grad():
            results = head.inference(features, images)
        output_sizes = [(128, 128), (40, 56)]
        for instances, (height, width) in zip(results, output_sizes):
            self.assertEqual(
                set(instances.get_fields()), {"pred_boxes", "scores", "pred_classes", "pred_masks"}
            )
            self.assertGreater(len(instances), 0)
            masks = instances.pred_masks
            self.assertEqual(tuple(masks.shape), (len(instances), 1, MASK_SIZE, MASK_SIZE))
            self.assertEqual(masks.dtype, torch.float32)
            self.assertTrue(torch.all((masks >= 0) & (masks <= 1)))
            pasted = detector_postprocess(instances, height, width).pred_masks
            self.assertEqual(tuple(pasted.shape), (len(instances), height, width))
            self.assertEqual(pasted.dtype, torch.bool)

    def test_masks_by_hand(self):
        # one proposal [8, 8, 40, 24] in a 64-wide, 48-high image; box outputs zero except the
        # class scores (2, 0, -1; background 0.5): three detections on the proposal, of classes
        # 0, 1, 2; mask logits 2.2 for class 0, -2.2 for the others
        head = _with_fixed_proposals([[[8.0, 8.0, 40.0, 24.0]]]).eval()
        predictor = head.roi_heads.box_predictor
        for layer in (predictor.cls_score, predictor.bbox_pred):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        with torch.no_grad():
            predictor.cls_score.bias.copy_(torch.tensor([2.0, 0.0, -1.0, 0.5]))
        _set_mask_logits(head, [2.2, -2.2, -2.2])
        features, images = _features([(48, 64)])
        with torch.no_grad():
            (result,) = head.inference(features, images)
        self.assertEqual(result.pred_classes.tolist(), [0, 1, 2])
        probabilities = torch.tensor([2.2, -2.2, -2.2]).sigmoid()[:, None, None, None]
        torch.testing.assert_close(
            result.pred_masks, probabilities.expand(3, 1, MASK_SIZE, MASK_SIZE), rtol=0, atol=0
        )
        # pasted and thresholded at 0.5: the box's pixels for class 0, none for the others
        pasted = detector_postprocess(result, 48, 64).pred_masks
        expected = torch.zeros(3, 48, 64, dtype=torch.bool)
        expected[0, 8:24, 8:40] = True
        self.assertTrue(torch.equal(pasted, expected))


class TestMaskBranchOff(unittest.TestCase):
    """Off by default; when on, it adds its parameters and ``loss_mask`` and changes nothing
    else."""

    def test_off_by_default(self):
        parameters = inspect.signature(build_rcnn_aux_head).parameters
        self.assertIs(parameters["mask_on"].default, False)
        self.assertEqual(parameters["mask_on"].kind, inspect.Parameter.KEYWORD_ONLY)
        head = _build()
        self.assertFalse(head.roi_heads.mask_on)
        self.assertFalse([name for name in head.state_dict() if "mask" in name])

    def test_box_branch_unchanged_by_the_mask_branch(self):
        heads = {}
        for mask_on in (False, True):
            torch.manual_seed(5)
            heads[mask_on] = _build(mask_on=mask_on)
        box_only, with_masks = heads[False].state_dict(), heads[True].state_dict()
        self.assertEqual(
            set(with_masks) - set(box_only),
            {
                f"roi_heads.mask_head.{name}"
                for name, _ in heads[True].roi_heads.mask_head.named_parameters()
            },
        )
        for name, value in box_only.items():
            self.assertTrue(torch.equal(value, with_masks[name]), name)

        gt = [_gt(IMAGE, [SQUARE], [1]), _gt(IMAGE, [[4.0, 4.0, 32.0, 32.0]], [2])]
        outputs = {}
        for mask_on, head in heads.items():
            torch.manual_seed(6)
            features, images = _features([IMAGE, (48, 56)])
            with EventStorage():
                losses, assignments = head(features, images, gt)
            head.eval()
            with torch.no_grad():
                detections = head.inference(features, images)
            outputs[mask_on] = losses, assignments, detections
        (losses_a, assign_a, det_a), (losses_b, assign_b, det_b) = outputs[False], outputs[True]
        self.assertEqual(set(losses_a), BOX_LOSS_NAMES)
        self.assertEqual(set(losses_b), LOSS_NAMES)
        for name in BOX_LOSS_NAMES:
            self.assertEqual(losses_a[name].item(), losses_b[name].item(), name)
        for a, b in zip(assign_a, assign_b):
            for field in ("boxes", "labels", "target_boxes", "features"):
                self.assertTrue(torch.equal(getattr(a, field), getattr(b, field)), field)
        for a, b in zip(det_a, det_b):
            self.assertEqual(set(a.get_fields()), {"pred_boxes", "scores", "pred_classes"})
            self.assertTrue(torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor))
            self.assertTrue(torch.equal(a.scores, b.scores))
            self.assertTrue(torch.equal(a.pred_classes, b.pred_classes))


if __name__ == "__main__":
    unittest.main()
