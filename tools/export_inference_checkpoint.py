#!/usr/bin/env python
"""
Write an inference checkpoint of a CoDETR training checkpoint: the same weights without the
auxiliary heads, their extra feature level and the positive-query projections.

    python tools/export_inference_checkpoint.py IN.pth OUT.pth [--ema]

With ``--ema`` the weights are the EMA of the weights that a run with ``train.model_ema``
saved in ``IN.pth`` ("model_ema"); without it, the raw weights ("model").
``OUT.pth`` loads strictly into the training config with
``model.aux_heads=[] model.positive_queries=null`` and gives identical ``detr`` outputs.
The optimizer / scheduler state of a training checkpoint is not kept.
"""

import argparse
import os
import sys
from typing import List, Optional

import torch

from codetr.checkpoint import inference_state_dict
from codetr.engine import EMA_WEIGHTS_KEY, atomic_write


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("input", metavar="IN.pth", help="a checkpoint written by train_net.py")
    parser.add_argument("output", metavar="OUT.pth", help="the inference checkpoint to write")
    parser.add_argument(
        "--ema",
        action="store_true",
        help=f"export the EMA of the weights ('{EMA_WEIGHTS_KEY}') instead of the raw weights",
    )
    args = parser.parse_args(argv)
    if not os.path.isfile(args.input):
        parser.error(f"{args.input!r} does not exist")
    try:
        checkpoint = torch.load(args.input, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        print(f"ERROR: cannot read {args.input!r} as a PyTorch checkpoint: {e}", file=sys.stderr)
        return 1
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        print(
            f"ERROR: {args.input!r} is not a detectron2 checkpoint ({{'model': state_dict}}); "
            f"authors' checkpoints are converted with tools/convert_official_checkpoint.py",
            file=sys.stderr,
        )
        return 1
    has_ema = isinstance(checkpoint.get(EMA_WEIGHTS_KEY), dict)
    if args.ema and not has_ema:
        print(
            f"ERROR: {args.input!r} holds no EMA of the weights ('{EMA_WEIGHTS_KEY}'): it was "
            "not trained with train.model_ema.enabled=True; export it without --ema",
            file=sys.stderr,
        )
        return 1
    weights = checkpoint[EMA_WEIGHTS_KEY if args.ema else "model"]
    model = inference_state_dict(weights)
    dropped = len(weights) - len(model)
    atomic_write(args.output, lambda f: torch.save({"model": model}, f))
    kind = "EMA weights" if args.ema else "raw weights"
    print(f"wrote {args.output}: {len(model)} tensors of the {kind} ({dropped} auxiliary dropped)")
    if has_ema and not args.ema:
        print(f"note: {args.input!r} also holds an EMA of the weights; --ema exports it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
