#!/usr/bin/env python
"""
Write an inference checkpoint of a CoDETR training checkpoint: the same weights without the
auxiliary heads, their extra feature level and the positive-query projections.

    python tools/export_inference_checkpoint.py IN.pth OUT.pth

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
from codetr.engine import atomic_write


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("input", metavar="IN.pth", help="a checkpoint written by train_net.py")
    parser.add_argument("output", metavar="OUT.pth", help="the inference checkpoint to write")
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
    model = inference_state_dict(checkpoint["model"])
    dropped = len(checkpoint["model"]) - len(model)
    atomic_write(args.output, lambda f: torch.save({"model": model}, f))
    print(f"wrote {args.output}: {len(model)} tensors ({dropped} auxiliary tensors dropped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
