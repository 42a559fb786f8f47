#!/usr/bin/env python
"""
The effect of each of the authors' training conventions of the R-CNN auxiliary head on the loss
of the tiny Co-DINO of ``shared/reference/official_parity`` (authors' weights, the two images
and ground truth of ``tests/parity/training_reference.pt``): the head's four terms with every
convention the authors' (the default), with all of detectron2's
(``training_conventions="detectron2"``), and with one convention at a time put back to
detectron2's. Each row is the mean over ``--seeds`` seeds of torch's generator, since the
sampling draws differ between the variants. Run from the repository root:

    python tools/rcnn_conventions_effect.py [--seeds 10]

The single-convention rows swap one part of the built head for detectron2's (a measurement,
not a configuration the head offers: its switch is all or nothing).
"""

import argparse
import sys
from contextlib import ExitStack
from typing import Callable, Dict, List
from unittest import mock

import torch
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.utils.events import EventStorage

sys.path.insert(0, ".")  # the tests' parity helpers, from the repository root
from tests.parity import TINY_CO_DINO_CHECKPOINT, tiny_co_dino_config  # noqa: E402
from tests.parity.common import load_converted_model  # noqa: E402
from tests.parity.test_training_parity import REFERENCE, TrainingStep  # noqa: E402

from codetr.modeling.aux_heads import rcnn  # noqa: E402

TERMS = ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg")


def _detectron2_matcher(model):
    head = model.aux_heads[0]
    head.rpn.anchor_matcher = Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True)
    return []


def _all_anchors(model):
    return [
        mock.patch.object(
            rcnn,
            "valid_anchor_mask",
            lambda a, *_: torch.ones(sum(len(b) for b in a), dtype=torch.bool),
        )
    ]


def _detectron2_normaliser(model):
    return [mock.patch.object(rcnn.RCNNAuxRPN, "losses", RPN.losses)]


def _detectron2_proposals(model):
    return [mock.patch.object(rcnn.RCNNAuxRPN, "predict_proposals", RPN.predict_proposals)]


def _detectron2_rpn_sampling(model):
    # detectron2's label_and_sample_anchors samples with subsample_labels (and uses every anchor)
    return _all_anchors(model) + [
        mock.patch.object(rcnn.RCNNAuxRPN, "label_and_sample_anchors", RPN.label_and_sample_anchors)
    ]


def _detectron2_roi_sampling(model):
    model.aux_heads[0].roi_heads.sample_as_authors = False
    return []


# name -> edit of the built model (returns patches to hold during the forward)
VARIANTS: Dict[str, Callable] = {
    "authors' conventions (default)": lambda model: [],
    "RPN low-quality matching: detectron2's": _detectron2_matcher,
    "RPN anchors of the padded batch: all": _all_anchors,
    "RPN sampling: detectron2's (and all anchors)": _detectron2_rpn_sampling,
    "RPN loss normaliser: 256 x images": _detectron2_normaliser,
    "RPN proposals ranked by logit (detectron2)": _detectron2_proposals,
    "RoI sampling: detectron2's (gt appended)": _detectron2_roi_sampling,
}


def run(variant: str, config_edit: Callable, seeds: List[int], inputs) -> Dict[str, float]:
    config = tiny_co_dino_config(True)
    config_edit(config)
    model = load_converted_model(config, TINY_CO_DINO_CHECKPOINT, True).train()
    sums = dict.fromkeys(TERMS, 0.0)
    with ExitStack() as stack:
        for patch in VARIANTS.get(variant, lambda m: [])(model):
            stack.enter_context(patch)
        for seed in seeds:
            torch.manual_seed(seed)
            with EventStorage(0), torch.no_grad():
                losses = model(inputs)
            for term in TERMS:
                sums[term] += float(losses[f"aux0.{term}"]) / len(seeds)
    return sums


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args(argv)
    inputs = TrainingStep.inputs(torch.load(REFERENCE, weights_only=True))
    seeds = list(range(args.seeds))

    def detectron2(config):
        config.aux_heads[0].training_conventions = "detectron2"

    rows = {name: run(name, lambda c: None, seeds, inputs) for name in VARIANTS}
    rows["all of detectron2's (training_conventions)"] = run("", detectron2, seeds, inputs)
    base = rows["authors' conventions (default)"]
    print(f"mean over {args.seeds} seeds; tiny Co-DINO, R-CNN auxiliary head (weighted terms)")
    print("| variant | " + " | ".join(TERMS) + " |")
    print("|---|" + "---|" * len(TERMS))
    for name, values in rows.items():
        cells = [
            f"{values[t]:.4f}" + ("" if values is base else f" ({values[t] / base[t] - 1:+.1%})")
            for t in TERMS
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
