import unittest

import torch
import torch.nn.functional as F
from detectron2.config import LazyCall as L
from detectron2.config import instantiate
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import get_fed_loss_cls_weights

from codetr.modeling.fed_loss import FED_LOSS_DRAW_PURPOSE, fed_loss_classes
from codetr.modeling.losses import DetectionLoss
from codetr.modeling.random_draws import RandomDraws, random_draws_from


class _Uniforms(RandomDraws):
    """Hands out the given uniforms (or float64 ones from ``generator``); records the draws."""

    def __init__(self, values=None, generator=None):
        self.values, self.generator, self.draws = values, generator, []

    def uniform(self, purpose, shape, device):
        self.draws.append((purpose, tuple(shape)))
        if self.values is not None:
            return self.values
        return torch.rand(tuple(shape), dtype=torch.float64, generator=self.generator)


def _labels(classes, num_queries, num_classes):
    """(B, Q) labels: image b's queries labelled with classes[b], then background."""
    labels = torch.full((len(classes), num_queries), num_classes)
    for image, image_classes in enumerate(classes):
        labels[image, : len(image_classes)] = torch.tensor(image_classes, dtype=torch.int64)
    return labels


class TestFedLossClasses(unittest.TestCase):
    def test_ground_truth_classes_and_count(self):
        torch.manual_seed(0)
        weights = torch.rand(30) + 0.1
        # 0, 3 (one repeated) and 10 ground-truth classes; 8 classes kept per image
        classes = [[], [4, 4, 17, 29], list(range(0, 30, 3))]
        labels = _labels(classes, 12, 30)
        for _ in range(20):
            counted = fed_loss_classes(labels, weights, 8)
            self.assertEqual(counted.shape, (3, 30))
            self.assertEqual(counted.dtype, torch.bool)
            for image, image_classes in enumerate(classes):
                self.assertTrue(counted[image, image_classes].all())
            self.assertEqual(counted.sum(dim=1).tolist(), [8, 8, 10])

    def test_same_draws_as_torch_multinomial(self):
        # torch.multinomial(w, n, replacement=False) takes the n largest w / E, E exponential
        # from float64 uniforms: given those uniforms, the same classes are drawn
        weights = torch.arange(1, 41, dtype=torch.float32) ** 0.5
        classes = [[], [3], [0, 39, 39, 7], list(range(10, 19))]
        labels = _labels(classes, 15, 40)
        for seed in range(10):
            draws = _Uniforms(generator=torch.Generator().manual_seed(seed))
            with random_draws_from(draws):
                counted = fed_loss_classes(labels, weights, 10)
            self.assertEqual(draws.draws, [(FED_LOSS_DRAW_PURPOSE, (4, 40))])
            generator = torch.Generator().manual_seed(seed)
            for image, image_classes in enumerate(classes):
                kept = torch.tensor(sorted(set(image_classes)), dtype=torch.int64)
                prob = weights.clone()
                prob[kept] = 0
                drawn = torch.multinomial(
                    prob, 10 - len(kept), replacement=False, generator=generator
                )
                expected = torch.zeros(40, dtype=torch.bool)
                expected[torch.cat([kept, drawn])] = True
                self.assertTrue(torch.equal(counted[image], expected), (seed, image))

    def test_frequent_classes_drawn_more_often(self):
        torch.manual_seed(0)
        weights = torch.tensor([1.0, 1.0, 1.0, 100.0])
        counted = fed_loss_classes(_labels([[0]] * 200, 2, 4), weights, 2)
        self.assertTrue(counted[:, 0].all())
        self.assertGreater(counted[:, 3].sum().item(), 190)

    def test_all_classes_when_fewer_than_kept(self):
        counted = fed_loss_classes(_labels([[1], []], 3, 4), torch.ones(4), 50)
        self.assertTrue(counted.all())

    def test_bad_shapes(self):
        with self.assertRaisesRegex(ValueError, "labels"):
            fed_loss_classes(torch.zeros(3, dtype=torch.int64), torch.ones(4), 2)


def _focal_terms(logits, targets, alpha=0.25, gamma=2.0):
    """Elementwise sigmoid focal loss, written out."""
    prob = logits.sigmoid()
    bce = -(targets * prob.log() + (1 - targets) * (1 - prob).log())
    prob_t = prob * targets + (1 - prob) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * (1 - prob_t) ** gamma * bce


def _quality_focal_terms(logits, targets, positive, beta=2.0):
    """Elementwise quality focal loss, written out; ``targets`` the soft targets."""
    prob = logits.sigmoid()
    bce = -(targets * prob.log() + (1 - targets) * (1 - prob).log())
    factor = torch.where(positive, (targets - prob).abs(), prob) ** beta
    return bce * factor


class TestFedDetectionLoss(unittest.TestCase):
    # 2 images x 3 queries x 4 classes; image 0 has class 2, image 1 classes 0 and 3
    LABELS = torch.tensor([[2, 4, 4], [4, 0, 3]])
    # uniforms that draw, with weights 1, 2, 3, 4 and 3 classes per image, classes 0 and 3 in
    # image 0 and class 1 in image 1 (largest w / -log(1 - u) among the others)
    UNIFORMS = torch.tensor([[0.1, 0.9, 0.5, 0.6], [0.2, 0.3, 0.7, 0.1]])
    COUNTED = torch.tensor([[True, False, True, True], [True, True, False, True]])

    def _inputs(self):
        torch.manual_seed(0)
        logits = torch.randn(2, 3, 4, dtype=torch.float64).float().requires_grad_(True)
        # exact boxes: IoU quality targets of 1
        boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.6, 0.1, 0.3], [0.6, 0.4, 0.2, 0.1]])
        boxes = boxes.expand(2, 3, 4)
        return logits, boxes, torch.tensor([[64.0, 48.0, 64.0, 48.0]]).expand(2, 4)

    def _criterion(self, class_loss, **kwargs):
        fed_loss = {
            "fed_loss_class_weights": torch.tensor([1.0, 2.0, 3.0, 4.0]),
            "fed_loss_num_classes": 3,
        }
        return DetectionLoss(
            num_classes=4, class_loss=class_loss, class_weight=2.0, **{**fed_loss, **kwargs}
        )

    def test_uniforms_draw_the_documented_classes(self):
        with random_draws_from(_Uniforms(self.UNIFORMS)):
            counted = fed_loss_classes(self.LABELS, torch.tensor([1.0, 2.0, 3.0, 4.0]), 3)
        self.assertTrue(torch.equal(counted, self.COUNTED))

    def test_focal_against_direct_computation(self):
        logits, boxes, normalizers = self._inputs()
        with random_draws_from(_Uniforms(self.UNIFORMS)):
            losses = self._criterion("focal")(
                logits, boxes, self.LABELS, boxes, box_normalizers=normalizers, num_positives=3.0
            )
        targets = F.one_hot(self.LABELS, 5)[..., :4].double()
        terms = _focal_terms(logits.double(), targets) * self.COUNTED[:, None, :]
        expected = terms.sum() / 3.0 * 2.0
        torch.testing.assert_close(losses["loss_class"].double(), expected)
        # the classes left out get no gradient
        (gradient,) = torch.autograd.grad(losses["loss_class"], logits)
        self.assertTrue((gradient[~self.COUNTED[:, None, :].expand(2, 3, 4)] == 0).all())
        self.assertTrue((gradient[self.COUNTED[:, None, :].expand(2, 3, 4)] != 0).all())

    def test_quality_focal_against_direct_computation(self):
        logits, boxes, normalizers = self._inputs()
        with random_draws_from(_Uniforms(self.UNIFORMS)):
            losses = self._criterion("quality_focal")(
                logits, boxes, self.LABELS, boxes, box_normalizers=normalizers, num_positives=2.0
            )
        targets = F.one_hot(self.LABELS, 5)[..., :4].double()  # IoU 1 with the exact boxes
        terms = _quality_focal_terms(logits.double(), targets, targets.bool())
        expected = (terms * self.COUNTED[:, None, :]).sum() / 2.0 * 2.0
        torch.testing.assert_close(losses["loss_class"].double(), expected)
        self.assertEqual(losses["loss_bbox"].item(), 0.0)

    def test_all_classes_counted_is_the_plain_loss(self):
        logits, boxes, normalizers = self._inputs()
        for class_loss in ("focal", "quality_focal"):
            plain = DetectionLoss(num_classes=4, class_loss=class_loss, class_weight=2.0)
            federated = self._criterion(class_loss, fed_loss_num_classes=4)
            args = (logits, boxes, self.LABELS, boxes)
            kwargs = {"box_normalizers": normalizers, "num_positives": 3.0}
            expected, losses = plain(*args, **kwargs), federated(*args, **kwargs)
            for name in ("loss_class", "loss_bbox", "loss_giou"):
                self.assertTrue(torch.equal(losses[name], expected[name]), (class_loss, name))

    def test_off_by_default_and_not_in_the_state_dict(self):
        plain = DetectionLoss(num_classes=4, class_loss="focal", class_weight=2.0)
        self.assertIsNone(plain.fed_loss_class_weights)
        federated = self._criterion("focal").to(torch.float64)
        self.assertEqual(dict(federated.state_dict()), {})
        self.assertEqual(federated.fed_loss_class_weights.tolist(), [1.0, 2.0, 3.0, 4.0])
        logits, boxes, normalizers = self._inputs()
        draws = _Uniforms(self.UNIFORMS)
        with random_draws_from(draws):
            plain(logits, boxes, self.LABELS, boxes, box_normalizers=normalizers, num_positives=1)
        self.assertEqual(draws.draws, [])

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "shape"):
            self._criterion("focal", fed_loss_class_weights=torch.ones(3))
        with self.assertRaisesRegex(ValueError, "positive and finite"):
            self._criterion("focal", fed_loss_class_weights=torch.tensor([1.0, 0.0, 1.0, 1.0]))
        with self.assertRaisesRegex(ValueError, "fed_loss_num_classes"):
            self._criterion("focal", fed_loss_num_classes=0)

    def test_weights_from_dataset_metadata(self):
        name = "test_fed_loss_metadata"
        MetadataCatalog.get(name).set(
            class_image_count=[
                {"id": 3, "image_count": 9},
                {"id": 1, "image_count": 4},
                {"id": 2, "image_count": 1},
            ]
        )
        try:
            criterion = instantiate(
                L(DetectionLoss)(
                    num_classes=3,
                    class_loss="quality_focal",
                    class_weight=1.0,
                    fed_loss_class_weights=L(get_fed_loss_cls_weights)(
                        dataset_names=name, freq_weight_power=0.5
                    ),
                )
            )
        finally:
            MetadataCatalog.remove(name)
        self.assertEqual(criterion.fed_loss_class_weights.tolist(), [2.0, 1.0, 3.0])


if __name__ == "__main__":
    unittest.main()
