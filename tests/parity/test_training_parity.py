"""
One training step of ours against the authors' code (``tests/parity/training_reference.pt``,
written by ``tools/training_parity_official.py``): the tiny parity models, converted from the
authors' weights, on the same two images and ground truth, with the authors' random draws
replayed through :func:`codetr.modeling.random_draws.random_draws_from`.

Checked here, to 1e-4 relative: every loss term (names mapped by :data:`LOSS_NAMES`), the
total, and every recorded gradient (relative norm of the difference), for the set-ups whose
every part is already the authors': DINO / Deformable-DETR without auxiliary heads, and
Co-DINO without denoising or auxiliary heads. In the set-ups with auxiliary heads, the terms
of the one-to-one query head (matching, encoder proposals, denoising) are checked; the
auxiliary heads' own terms are not yet equal (README "Parity with the authors' code").
"""

import os
import re
import unittest
from typing import Dict, List

import torch
from detectron2.config import instantiate
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from codetr.checkpoint import convert_official_state_dict, load_official_checkpoint
from codetr.modeling.random_draws import RandomDraws, random_draws_from

from . import TINY_CO_DINO_CHECKPOINT, tiny_co_dino_config
from .common import TINY_CO_DEFORMABLE_DETR_CHECKPOINT, tiny_co_deformable_detr_config

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "training_reference.pt")
RELATIVE_TOLERANCE = 1e-4
CO_DINO = "tiny_co_dino_5scale_r50_1x_coco"
CO_DEFORMABLE_DETR = "tiny_co_deformable_detr_r50_1x_coco"

# the authors' loss names -> ours, applied in order (first match); "{i}" is an auxiliary
# head's index in the authors' numbering, which is ours for these models
LOSS_NAMES = (
    (r"^(d\d+\.)?(enc_|dn_)?loss_cls(_aux\d+)?$", r"\1\2loss_class\3"),
    (r"^(d\d+\.)?(enc_|dn_)?loss_iou(_aux\d+)?$", r"\1\2loss_giou\3"),
    (r"^(d\d+\.)?(enc_|dn_)?loss_bbox(_aux\d+)?$", r"\1\2loss_bbox\3"),
)

# where the authors' code draws -> the purpose our code asks random_draws() for
DRAW_PURPOSES = (
    ("query_denoising.py:__call__", "rand_like", 1, "denoising.label_flip"),
    ("query_denoising.py:__call__", "randint_like", 1, "denoising.label"),
    ("query_denoising.py:__call__", "randint_like", 2, "denoising.box_sign"),
    ("query_denoising.py:__call__", "rand_like", 2, "denoising.box_shift"),
    ("co_deformable_detr_head.py:get_aux_targets:419", "randperm", 1, "positive_queries.positive"),
    ("co_deformable_detr_head.py:get_aux_targets:444", "randperm", 1, "positive_queries.negative"),
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


def our_loss_name(name: str) -> str:
    for pattern, replacement in LOSS_NAMES:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    return name


def edited_state_dict(state_dict, renamed: Dict[str, str], dropped: List[str]):
    """The checkpoint as the authors' model of a set-up loaded it (see the generator)."""
    kept = {k: v for k, v in state_dict.items() if not any(k.startswith(p) for p in dropped)}
    edited = {}
    for key, value in kept.items():
        for old, new in renamed.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        edited[key] = value
    return edited


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).norm() / theirs.norm().clamp(min=1e-12))


class TrainingStep:
    """Our model of ``setup``, the authors' weights, one replayed step: losses and gradients."""

    def __init__(self, reference: Dict, model_name: str, setup: str):
        self.expected = reference["models"][model_name][setup]
        dino = model_name == CO_DINO
        with_aux = setup != "no_aux_heads"
        config = (tiny_co_dino_config if dino else tiny_co_deformable_detr_config)(with_aux)
        if setup == "no_positive_queries":
            config.positive_queries = None
        if setup == "atss_only":
            config.aux_heads = [h for h in config.aux_heads if "ATSS" in str(h._target_)]
            config.positive_queries.num_heads = 1
        if setup == "no_denoising":
            config.query_head.denoising = None
        self.model = instantiate(config)
        checkpoint = load_official_checkpoint(
            TINY_CO_DINO_CHECKPOINT if dino else TINY_CO_DEFORMABLE_DETR_CHECKPOINT
        )
        dropped = list(self.expected["dropped"])
        if setup == "no_denoising":
            # the authors' model keeps its (unused) label embedding, ours has none
            dropped.append("query_head.label_embedding.")
        checkpoint = edited_state_dict(checkpoint, self.expected["renamed"], dropped)
        converted, report = convert_official_state_dict(checkpoint, self.model, keep_aux=with_aux)
        assert report.ok, report.summary()
        self.model.load_state_dict(converted, strict=True)
        self.model.train()

        draws = ReplayedDraws(self.expected["draws"])
        with random_draws_from(draws), EventStorage(0):
            self.losses = self.model(self.inputs(reference))
        self.unused_draws = draws.unused()
        self.total = sum(self.losses.values())
        self.total.backward()
        self.expected_gradients, _ = convert_official_state_dict(
            self.expected["gradients"], self.model, keep_aux=with_aux
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


def query_head_term(name: str) -> bool:
    """A term of the one-to-one query head (not of an auxiliary head or positive queries)."""
    return not re.search(r"aux\d|rpn|\d$", name)


class TrainingParityMixin:
    """A test case sets ``model_name`` and ``setup`` (a key of the fixture)."""

    model_name = ""
    setup = ""
    # False: only the one-to-one query head's terms are compared
    complete = True

    @classmethod
    def setUpClass(cls):
        torch.manual_seed(0)
        reference = torch.load(REFERENCE, weights_only=True)
        cls.step = TrainingStep(reference, cls.model_name, cls.setup)

    def _compared_terms(self) -> Dict[str, float]:
        terms = self.step.expected["losses"]
        if not self.complete:
            terms = {k: v for k, v in terms.items() if query_head_term(k)}
        return terms

    def test_every_loss_term(self):
        ours = {k: float(v) for k, v in self.step.losses.items()}
        compared = self._compared_terms()
        self.assertGreater(len(compared), 0)
        for name, expected in compared.items():
            ours_name = our_loss_name(name)
            self.assertIn(ours_name, ours, f"the authors' {name}")
            error = abs(ours[ours_name] - expected) / max(abs(expected), 1e-12)
            self.assertLessEqual(
                error, RELATIVE_TOLERANCE, f"{name}: ours {ours[ours_name]}, theirs {expected}"
            )


class CompleteStepMixin(TrainingParityMixin):
    """Set-ups whose every term and gradient is the authors'."""

    def test_same_terms(self):
        self.assertEqual(
            sorted(our_loss_name(k) for k in self.step.expected["losses"]),
            sorted(self.step.losses),
        )

    def test_total(self):
        error = (
            abs(float(self.step.total) - self.step.expected["total"]) / self.step.expected["total"]
        )
        self.assertLessEqual(error, RELATIVE_TOLERANCE)

    def test_every_draw_replayed(self):
        self.assertEqual(self.step.unused_draws, {})

    def test_recorded_gradients(self):
        parameters = dict(self.step.model.named_parameters())
        self.assertEqual(len(self.step.expected_gradients), len(self.step.expected["gradients"]))
        for name, expected in self.step.expected_gradients.items():
            gradient = parameters[name].grad
            self.assertIsNotNone(gradient, name)
            self.assertLessEqual(relative_error(gradient, expected), RELATIVE_TOLERANCE, name)


class TestCoDINOWithoutAuxiliaryHeads(CompleteStepMixin, unittest.TestCase):
    model_name, setup = CO_DINO, "no_aux_heads"


class TestCoDeformableDETRWithoutAuxiliaryHeads(CompleteStepMixin, unittest.TestCase):
    model_name, setup = CO_DEFORMABLE_DETR, "no_aux_heads"


class TestCoDINOAllHeadsQueryHead(TrainingParityMixin, unittest.TestCase):
    model_name, setup, complete = CO_DINO, "all_heads", False


class TestCoDINOAtssOnlyQueryHead(TrainingParityMixin, unittest.TestCase):
    model_name, setup, complete = CO_DINO, "atss_only", False


class TestCoDINOWithoutDenoisingQueryHead(TrainingParityMixin, unittest.TestCase):
    model_name, setup, complete = CO_DINO, "no_denoising", False


class TestCoDeformableDETRAllHeadsQueryHead(TrainingParityMixin, unittest.TestCase):
    model_name, setup, complete = CO_DEFORMABLE_DETR, "all_heads", False


if __name__ == "__main__":
    unittest.main()
