"""
One training step of ours against the authors' code (``tests/parity/training_reference.pt``,
written by ``tools/training_parity_official.py``): the tiny parity models, converted from the
authors' weights, on the same two images and ground truth, with the authors' random draws
replayed through :func:`codetr.modeling.random_draws.random_draws_from` and the order of their
RPN proposals whose scores tie replayed by :class:`ReplayedProposalOrder`.

Checked for every set-up of the fixture (both models with all heads, without auxiliary heads,
without positive queries; Co-DINO with ATSS only and without denoising), to 1e-4 relative:
every loss term (names mapped by :func:`our_loss_name`), the total, and every recorded gradient
(relative norm of the difference).
"""

import os
import re
import unittest
from typing import Dict, List, NamedTuple

import torch
from detectron2.config import instantiate
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from torchvision.ops import box_iou

from codetr.checkpoint import convert_official_state_dict, load_official_checkpoint
from codetr.modeling.aux_heads.rcnn import RCNNAuxRPN
from codetr.modeling.random_draws import RandomDraws, random_draws_from

from . import TINY_CO_DINO_CHECKPOINT, edited_state_dict, tiny_co_dino_config
from .common import TINY_CO_DEFORMABLE_DETR_CHECKPOINT, tiny_co_deformable_detr_config

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "training_reference.pt")
RELATIVE_TOLERANCE = 1e-4
# the authors' modules of the positive queries (under query_head.transformer.)
POSITIVE_QUERY_MODULES = ("aux_pos_trans", "pos_feats_trans", "pos_feats_norm", "head_pos_embed")
CO_DINO = "tiny_co_dino_5scale_r50_1x_coco"
CO_DEFORMABLE_DETR = "tiny_co_deformable_detr_r50_1x_coco"

# the authors' loss names -> ours, applied in order (first match); "{i}" is an auxiliary
# head's index in the authors' numbering, which is ours for these models
LOSS_NAMES = (
    (r"^(d\d+\.)?(enc_|dn_)?loss_cls(_aux\d+)?$", r"\1\2loss_class\3"),
    (r"^(d\d+\.)?(enc_|dn_)?loss_iou(_aux\d+)?$", r"\1\2loss_giou\3"),
    (r"^(d\d+\.)?(enc_|dn_)?loss_bbox(_aux\d+)?$", r"\1\2loss_bbox\3"),
)
# the auxiliary heads' own terms: the authors' name (less the head's index) -> ours, by the
# kind of head; the authors' RPN terms carry no index (the model has one RPN)
AUX_LOSS_NAMES = {
    "two-stage": {
        "loss_rpn_cls": "loss_rpn_cls",
        "loss_rpn_bbox": "loss_rpn_loc",
        "loss_cls": "loss_cls",
        "loss_bbox": "loss_box_reg",
    },
    "one-stage": {
        "loss_cls": "loss_cls",
        "loss_bbox": "loss_bbox",
        "loss_centerness": "loss_centerness",
    },
}

# where the authors' code draws -> the purpose our code asks random_draws() for
DRAW_PURPOSES = (
    ("query_denoising.py:__call__", "rand_like", 1, "denoising.label_flip"),
    ("query_denoising.py:__call__", "randint_like", 1, "denoising.label"),
    ("query_denoising.py:__call__", "randint_like", 2, "denoising.box_sign"),
    ("query_denoising.py:__call__", "rand_like", 2, "denoising.box_shift"),
    ("co_deformable_detr_head.py:get_aux_targets:419", "randperm", 1, "positive_queries.positive"),
    ("co_deformable_detr_head.py:get_aux_targets:444", "randperm", 1, "positive_queries.negative"),
)
# mmdet's RandomSampler draws for both R-CNN stages: (caller that tells the stage, stage),
# (sampler method, kind)
SAMPLER_STAGES = (("anchor_head.py:_get_targets_single", "rpn"), ("co_roi_head.py:", "roi"))
SAMPLER_KINDS = (
    ("random_sampler.py:_sample_pos", "positive"),
    ("random_sampler.py:_sample_neg", "negative"),
)


class ReplayedDraws(RandomDraws):
    """Hands out the authors' recorded draws, in order, per purpose."""

    def __init__(self, draws: List[Dict]):
        self.queues: Dict[str, List[torch.Tensor]] = {}
        for draw in draws:
            purpose = self.purpose(draw)
            self.queues.setdefault(purpose, []).append(draw["value"])

    @staticmethod
    def purpose(draw: Dict) -> str:
        caller, value = draw["callers"][0], draw["value"]
        for prefix, function, ndim, purpose in DRAW_PURPOSES:
            if caller.startswith(prefix) and draw["function"] == function and value.dim() == ndim:
                return purpose
        if caller.startswith("random_sampler.py:random_choice"):
            callers = draw["callers"]
            stage = [s for c, s in SAMPLER_STAGES if any(x.startswith(c) for x in callers)]
            kind = [k for c, k in SAMPLER_KINDS if any(x.startswith(c) for x in callers)]
            if len(stage) == 1 and len(kind) == 1:
                return f"{stage[0]}.{kind[0]}"
        return f"not replayed: {caller}"

    def _next(self, purpose: str, shape) -> torch.Tensor:
        queue = self.queues.get(purpose)
        if not queue:
            raise AssertionError(f"our model draws {purpose!r}, the authors' code did not")
        value = queue.pop(0)
        if tuple(value.shape) != tuple(shape):
            raise AssertionError(f"{purpose}: ours {tuple(shape)}, theirs {tuple(value.shape)}")
        return value

    def uniform(self, purpose, shape, device):
        return self._next(purpose, shape).float().to(device)

    def integers(self, purpose, high, shape, device):
        return self._next(purpose, shape).long().to(device)

    def permutation(self, purpose, n, device):
        return self._next(purpose, (n,)).long().to(device)

    def unused(self) -> Dict[str, int]:
        return {p: len(q) for p, q in self.queues.items() if q and not p.startswith("not ")}


class ReplayedProposalOrder:
    """
    Puts our RPN proposals in the authors' order (``expected``: per image their (P, 5) boxes and
    scores). Both rank by float32 probability; proposals whose probabilities tie, or differ by
    an ulp or two because the logits differ by ~1e-7, come in an order that is a coin toss, and
    the RoI sampler's draws pick by position. The same coin toss decides which of two tied
    proposals that overlap by more than the NMS threshold survives the NMS (seen: two boxes at
    the image border, a stride apart, with the same score to 1e-7); such a
    proposal of ours is replaced by the authors' and counted in ``nms_ties``. Checked on the
    way: the same boxes (to 1e-3 pixels), and only positions and NMS survivors whose scores are
    within ``TIE`` of the authors' replayed.
    """

    TIE = 2e-7

    def __init__(self, expected: List[torch.Tensor]):
        self.expected = expected
        # per call (image): proposals put in the authors' order, tied NMS survivors replaced
        self.moved: List[int] = []
        self.nms_ties: List[int] = []
        self.largest_gap = 0.0

    def __enter__(self):
        self.original = RCNNAuxRPN.predict_proposals
        replay = self

        def predict_proposals(rpn, *args, **kwargs):
            results = replay.original(rpn, *args, **kwargs)
            return [replay.reordered(i, r, rpn.nms_thresh) for i, r in enumerate(results)]

        RCNNAuxRPN.predict_proposals = predict_proposals
        return self

    def __exit__(self, *exc):
        RCNNAuxRPN.predict_proposals = self.original

    def reordered(self, image: int, instances: Instances, nms_threshold: float) -> Instances:
        theirs = self.expected[image]
        assert len(instances) == theirs.shape[0], (image, len(instances), theirs.shape)
        instances = self.tied_survivors_replaced(image, instances, nms_threshold)
        ours = instances.proposal_boxes.tensor
        same = torch.cdist(theirs[:, :4], ours, p=float("inf")) < 1e-3
        # one of ours per proposal of theirs, the one at the same position where it can be
        # (clipped proposals can coincide)
        free = torch.ones(len(ours), dtype=torch.bool)
        order = []
        for position, candidates in enumerate(same):
            candidates = (candidates & free).nonzero().flatten().tolist()
            assert candidates, f"image {image}: the authors' proposal {position} is not ours"
            match = position if position in candidates else candidates[0]
            free[match] = False
            order.append(match)
        order = torch.tensor(order)
        moved = order != torch.arange(len(order))
        self.moved.append(int(moved.sum()))
        gap = (instances.objectness_logits - theirs[:, 4]).abs()[moved]
        self.largest_gap = max([self.largest_gap] + gap.tolist())
        return instances[order]

    def tied_survivors_replaced(
        self, image: int, instances: Instances, nms_threshold: float
    ) -> Instances:
        """``instances`` with each proposal that the authors' NMS suppressed in favour of a tied
        one (score within ``TIE``, IoU above ``nms_threshold``) replaced by the authors'."""
        theirs = self.expected[image]
        ours = instances.proposal_boxes.tensor
        same = torch.cdist(theirs[:, :4], ours, p=float("inf")) < 1e-3
        extra = (~same.any(0)).nonzero().flatten().tolist()
        missing = (~same.any(1)).nonzero().flatten().tolist()
        self.nms_ties.append(len(missing))
        if not missing:
            return instances
        boxes, logits = ours.clone(), instances.objectness_logits.clone()
        overlaps = box_iou(theirs[missing, :4], ours)
        for row, position in enumerate(missing):
            gaps = (logits - theirs[position, 4]).abs()
            tied = [
                i for i in extra if overlaps[row, i] > nms_threshold and gaps[i] <= self.TIE
            ]
            assert tied, f"image {image}: the authors' proposal {position} is not ours"
            extra.remove(tied[0])
            boxes[tied[0]], logits[tied[0]] = theirs[position, :4], theirs[position, 4]
            self.largest_gap = max(self.largest_gap, float(gaps[tied[0]]))
        replaced = Instances(instances.image_size)
        replaced.proposal_boxes, replaced.objectness_logits = Boxes(boxes), logits
        return replaced


def our_loss_name(name: str, aux_kinds: List[str]) -> str:
    """Our name of the authors' loss ``name``; ``aux_kinds``: the ``kind`` of each of our
    auxiliary heads."""
    for pattern, replacement in LOSS_NAMES:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    match = re.match(r"^(loss_rpn_\w+|loss_[a-z]+?)(\d*)$", name)
    if match:
        term, index = match.groups()
        head = aux_kinds.index("two-stage") if term.startswith("loss_rpn") else int(index)
        return f"aux{head}.{AUX_LOSS_NAMES[aux_kinds[head]][term]}"
    return name


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).norm() / theirs.norm().clamp(min=1e-12))


def converted_model(
    *, model_name: str, setup: str, renamed: Dict[str, str], dropped: List[str]
) -> torch.nn.Module:
    """Our model of ``setup``, in training mode, with the authors' weights as their model of the
    set-up loaded them (``renamed`` / ``dropped``: as recorded in the fixture)."""
    dino = model_name == CO_DINO
    with_aux = setup != "no_aux_heads"
    config = (tiny_co_dino_config if dino else tiny_co_deformable_detr_config)(with_aux)
    if setup == "no_positive_queries":
        config.positive_queries = None
    if setup == "atss_only":
        config.aux_heads = [h for h in config.aux_heads if "ATSS" in h._partial_target_]
    if setup == "no_denoising":
        config.query_head.denoising = None
    model = instantiate(config)
    checkpoint = load_official_checkpoint(
        TINY_CO_DINO_CHECKPOINT if dino else TINY_CO_DEFORMABLE_DETR_CHECKPOINT
    )
    dropped = list(dropped)
    # the authors' model keeps the (unused) modules of a part that is off, ours has none
    if setup == "no_denoising":
        dropped.append("query_head.label_embedding.")
    if setup == "no_positive_queries":
        dropped += [f"query_head.transformer.{name}" for name in POSITIVE_QUERY_MODULES]
    checkpoint = edited_state_dict(checkpoint, renamed, dropped)
    converted, report = convert_official_state_dict(checkpoint, model, keep_aux=with_aux)
    assert report.ok, report.summary()
    model.load_state_dict(converted, strict=True)
    return model.train()


class ReplayedStep(NamedTuple):
    """Our losses of one step with the authors' draws and proposal order replayed; the draws
    left over (by purpose) and the reordering of the proposals."""

    losses: Dict[str, torch.Tensor]
    unused_draws: Dict[str, int]
    proposal_order: ReplayedProposalOrder


def replayed_step(
    *, model: torch.nn.Module, inputs: List[Dict], draws: List[Dict], proposals: List[torch.Tensor]
) -> ReplayedStep:
    """The forward pass of ``model`` on ``inputs`` with the authors' ``draws`` and the order of
    their ``proposals`` (as recorded for the step)."""
    replayed = ReplayedDraws(draws)
    proposal_order = ReplayedProposalOrder(proposals)
    with random_draws_from(replayed), proposal_order, EventStorage(0):
        losses = model(inputs)
    return ReplayedStep(losses, replayed.unused(), proposal_order)


class TrainingStep:
    """Our model of ``setup``, the authors' weights, one replayed step: losses and gradients."""

    def __init__(self, reference: Dict, model_name: str, setup: str):
        self.expected = reference["models"][model_name][setup]
        self.model = converted_model(
            model_name=model_name,
            setup=setup,
            renamed=self.expected["renamed"],
            dropped=self.expected["dropped"],
        )
        self.aux_kinds = [head.kind for head in getattr(self.model, "aux_heads", [])]
        self.losses, self.unused_draws, self.proposal_order = replayed_step(
            model=self.model,
            inputs=self.inputs(reference),
            draws=self.expected["draws"],
            proposals=self.expected["proposals"],
        )
        self.total = sum(self.losses.values())
        self.total.backward()
        self.expected_gradients, _ = convert_official_state_dict(
            self.expected["gradients"], self.model, keep_aux=setup != "no_aux_heads"
        )

    @staticmethod
    def inputs(reference: Dict) -> List[Dict]:
        inputs = []
        for image, boxes, labels in zip(
            reference["images"], reference["gt_boxes"], reference["gt_labels"]
        ):
            instances = Instances(tuple(image.shape[:2]))
            instances.gt_boxes = Boxes(boxes.float())
            instances.gt_classes = labels.long()
            inputs.append(
                {"image": image.flip(-1).permute(2, 0, 1).float(), "instances": instances}
            )
        return inputs


class TrainingParityMixin:
    """A test case sets ``model_name`` and ``setup`` (a key of the fixture)."""

    model_name = ""
    setup = ""

    @classmethod
    def setUpClass(cls):
        torch.manual_seed(0)
        reference = torch.load(REFERENCE, weights_only=True)
        cls.step = TrainingStep(reference, cls.model_name, cls.setup)

    def test_same_terms(self):
        self.assertEqual(
            sorted(our_loss_name(k, self.step.aux_kinds) for k in self.step.expected["losses"]),
            sorted(self.step.losses),
        )

    def test_every_loss_term(self):
        ours = {k: float(v) for k, v in self.step.losses.items()}
        for name, expected in self.step.expected["losses"].items():
            ours_name = our_loss_name(name, self.step.aux_kinds)
            self.assertIn(ours_name, ours, f"the authors' {name}")
            error = abs(ours[ours_name] - expected) / max(abs(expected), 1e-12)
            self.assertLessEqual(
                error, RELATIVE_TOLERANCE, f"{name}: ours {ours[ours_name]}, theirs {expected}"
            )

    def test_total(self):
        error = (
            abs(float(self.step.total) - self.step.expected["total"]) / self.step.expected["total"]
        )
        self.assertLessEqual(error, RELATIVE_TOLERANCE)

    def test_every_draw_replayed(self):
        self.assertEqual(self.step.unused_draws, {})

    def test_proposals_reordered_only_at_ties(self):
        order = self.step.proposal_order
        self.assertEqual(len(order.moved), len(self.step.expected["proposals"]))
        self.assertLessEqual(order.largest_gap, ReplayedProposalOrder.TIE)

    def test_recorded_gradients(self):
        parameters = dict(self.step.model.named_parameters())
        self.assertEqual(len(self.step.expected_gradients), len(self.step.expected["gradients"]))
        for name, expected in self.step.expected_gradients.items():
            gradient = parameters[name].grad
            self.assertIsNotNone(gradient, name)
            self.assertLessEqual(relative_error(gradient, expected), RELATIVE_TOLERANCE, name)


class TestCoDINOAllHeads(TrainingParityMixin, unittest.TestCase):
    model_name, setup = CO_DINO, "all_heads"


class TestCoDINOWithoutAuxiliaryHeads(TrainingParityMixin, unittest.TestCase):
    model_name, setup = CO_DINO, "no_aux_heads"


class TestCoDINOWithoutPositiveQueries(TrainingParityMixin, unittest.TestCase):
    model_name, setup = CO_DINO, "no_positive_queries"


class TestCoDINOAtssOnly(TrainingParityMixin, unittest.TestCase):
    model_name, setup = CO_DINO, "atss_only"


class TestCoDINOWithoutDenoising(TrainingParityMixin, unittest.TestCase):
    model_name, setup = CO_DINO, "no_denoising"


class TestCoDeformableDETRAllHeads(TrainingParityMixin, unittest.TestCase):
    model_name, setup = CO_DEFORMABLE_DETR, "all_heads"


class TestCoDeformableDETRWithoutAuxiliaryHeads(TrainingParityMixin, unittest.TestCase):
    model_name, setup = CO_DEFORMABLE_DETR, "no_aux_heads"


class TestCoDeformableDETRWithoutPositiveQueries(TrainingParityMixin, unittest.TestCase):
    model_name, setup = CO_DEFORMABLE_DETR, "no_positive_queries"


if __name__ == "__main__":
    unittest.main()
