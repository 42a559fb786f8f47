#!/usr/bin/env python
"""
Parameter counts of the authors' models, built by their code, beside ours built from our configs,
for the model zoo table of README (our counts at inference: without the training-only branch).

    python tools/parameter_counts_official.py --codetr-root /path/to/Co-DETR \
        --mmcv-root /path/to/src OURS.py=THEIRS.py [...]

``OURS.py`` is under ``configs/``, ``THEIRS.py`` under ``--codetr-root``; the authors' code is
imported as by ``tools/benchmark_official.py`` (same arguments and requirements). Their models
are built on the CPU with random weights (their ViT reads numbers back from tensors, so the meta
device cannot be used); ours on the meta device. Prints one JSON line per pair.
"""

import argparse
import json
import os
import sys
from typing import List, Optional

import torch

from benchmark_official import build_model, import_authors_code

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from tests.test_configs import (  # noqa: E402
    TRAINING_ONLY_PREFIXES,
    _load,
    build_on_meta,
    inference_parameter_count,
)

# the authors' training-only modules: auxiliary heads, positive-query projections, extra level
AUTHORS_TRAINING_ONLY = (
    "rpn_head.",
    "roi_head.",
    "bbox_head.",
    "query_head.downsample.",
    "query_head.transformer.aux_pos_trans",
    "query_head.transformer.pos_feats",
    "query_head.transformer.head_pos_embed",
)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--codetr-root", required=True, metavar="DIR")
    parser.add_argument("--mmcv-root", required=True, metavar="DIR")
    parser.add_argument("pairs", nargs="+", metavar="OURS.py=THEIRS.py")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    import_authors_code(args)
    for pair in args.pairs:
        ours, _, theirs = pair.partition("=")
        our_model = build_on_meta(_load(ours).model)
        torch.manual_seed(0)
        _, their_model = build_model(os.path.join(args.codetr_root, theirs))
        their_params = dict(their_model.named_parameters())
        row = {
            "ours": ours,
            "theirs": theirs,
            "inference_ours": inference_parameter_count(our_model),
            "inference_theirs": sum(
                p.numel()
                for n, p in their_params.items()
                if not n.startswith(AUTHORS_TRAINING_ONLY)
            ),
            "total_ours": sum(p.numel() for p in our_model.parameters()),
            "total_theirs": sum(p.numel() for p in their_params.values()),
        }
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
