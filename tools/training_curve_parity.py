#!/usr/bin/env python
"""
Trains our tiny Co-DINO (all heads) for the steps of the authors' training curve and compares
every step's total loss: the same converted weights, the same batch, plain SGD with the same
learning rate, and each step's random draws and order (and NMS survivors) of tied RPN proposals
replayed from the authors' run (``tests/parity/test_training_curve.py``, whose
:class:`ReplayedCurve` this runs for all the steps). Prints step, the authors' total, ours and the relative difference; exits
with status 1 when a step differs by more than 1e-3 relative (or a draw of the authors' was not
replayed, or proposals had to be reordered beyond ties).

    python tools/training_curve_parity.py [--reference tests/parity/training_curve_reference.pt]
        [--steps 30]

The reference is written by the authors' code with

    python tools/training_parity_official.py --codetr-root CO_DETR --mmcv-root MMCV_SRC \\
        --curve-output tests/parity/training_curve_reference.pt
"""

import argparse
import os
import sys
from typing import List, Optional

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the replay lives with the parity tests (tests/parity), imported as a package from the root
sys.path.insert(0, REPO_ROOT)

from tests.parity.test_training_curve import (  # noqa: E402
    CURVE_REFERENCE,
    CURVE_TOLERANCE,
    ReplayedCurve,
)
from tests.parity.test_training_parity import ReplayedProposalOrder  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reference", default=CURVE_REFERENCE, metavar="FILE")
    parser.add_argument(
        "--steps", type=int, default=None, metavar="N", help="the first N steps (default: all)"
    )
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    reference = torch.load(args.reference, weights_only=True)
    steps = len(reference["steps"]) if args.steps is None else args.steps
    curve = ReplayedCurve(reference=reference, steps=steps)
    differences = curve.total_differences()
    print(f"{reference['model']}, SGD lr {reference['lr']:g}, {steps} steps")
    print(f"{'step':>4}  {'authors':>12}  {'ours':>12}  {'rel. diff':>9}")
    for step, (ours, theirs, difference) in enumerate(
        zip(curve.steps, curve.expected, differences)
    ):
        print(f"{step:>4}  {theirs['total']:>12.6f}  {ours.total:>12.6f}  {difference:>9.2e}")
    largest = max(differences)
    print(f"max relative difference of the total {largest:.2e} (tolerance {CURVE_TOLERANCE:g})")
    difference, step, term = max(
        (difference, step, name)
        for step, terms in enumerate(curve.loss_term_differences())
        for name, difference in terms.items()
    )
    print(f"max relative difference of a loss term {difference:.2e} ({term}, step {step})")
    left_over = {
        step: ours.unused_draws for step, ours in enumerate(curve.steps) if ours.unused_draws
    }
    gap = max(ours.proposal_order.largest_gap for ours in curve.steps)
    print(f"draws not replayed: {left_over or 'none'}")
    nms_ties = {
        step: ours.proposal_order.nms_ties
        for step, ours in enumerate(curve.steps)
        if any(ours.proposal_order.nms_ties)
    }
    print(f"RPN proposals an NMS tie kept otherwise (step: per image): {nms_ties or 'none'}")
    print(
        f"largest score gap of the proposals put in the authors' order {gap:.1e} "
        f"(ties: up to {ReplayedProposalOrder.TIE:g})"
    )
    same = largest <= CURVE_TOLERANCE and not left_over and gap <= ReplayedProposalOrder.TIE
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
