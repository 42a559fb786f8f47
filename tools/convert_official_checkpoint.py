#!/usr/bin/env python
"""
Convert an authors' Co-DETR checkpoint (mmdet 2.x ``{"meta", "state_dict"}``) to a detectron2
checkpoint of our model.

    python tools/convert_official_checkpoint.py IN.pth OUT.pth [--keep-aux]
        [--config-file CONFIG] [key=value ...]

The expected parameter names and shapes come from the model of ``--config-file`` (default
``configs/co_dino/co_dino_5scale_r50_1x_coco.py`` if it exists, else
``configs/models/dino_r50.py``), after the ``key=value`` overrides; its query head decides
whether the checkpoint is read as a Co-DINO or a Co-Deformable-DETR one (for the latter pass
e.g. ``--config-file configs/co_deformable_detr/co_deformable_detr_r50_1x_coco.py``; for the
ViT-L Co-DINO checkpoints ``configs/co_dino_vit/co_dino_5scale_vit_large_coco.py``, its LVIS
sibling ``co_dino_5scale_lsj_vit_large_lvis.py``, and for Objects365 the COCO one with
``model.query_head.num_classes=365``). Their EMA copies ``ema_*``, the ViT's RoPE tables and
the federated loss's ``fed_loss_weight`` are dropped (the report says so). Every
authors' key that fills no parameter, every parameter left unfilled and every shape mismatch is
listed; then the command exits with status 1 and writes nothing (so does a checkpoint of the
other architecture, with a hint). Without ``--keep-aux`` the auxiliary heads, their extra
feature level and the positive-query projections are dropped (enough for
``eval_module="detr"``). ``OUT.pth`` holds ``{"model": state_dict}`` for detectron2's
``DetectionCheckpointer`` (e.g. as ``train.init_checkpoint``).
"""
import argparse
import os
import sys
from typing import List, Optional

import torch
from detectron2.config import instantiate

from codetr.checkpoint import convert_official_state_dict, load_official_checkpoint
from codetr.checkpoint.official import model_architecture, official_architecture
from codetr.engine import load_lazy_config

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEFAULT_CONFIGS = [
    os.path.join(_REPO, "configs", "co_dino", "co_dino_5scale_r50_1x_coco.py"),
    os.path.join(_REPO, "configs", "models", "dino_r50.py"),
]
# a config for the authors' checkpoints of each architecture
_ARCHITECTURE_CONFIGS = {
    "co_dino": "configs/co_dino/co_dino_5scale_r50_1x_coco.py",
    "co_deformable_detr": "configs/co_deformable_detr/co_deformable_detr_r50_1x_coco.py",
}


def default_config_file() -> str:
    """The first of the default configs that exists."""
    return next((path for path in _DEFAULT_CONFIGS if os.path.isfile(path)), _DEFAULT_CONFIGS[-1])


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("input", metavar="IN.pth", help="the authors' checkpoint")
    parser.add_argument("output", metavar="OUT.pth", help="the detectron2 checkpoint to write")
    parser.add_argument(
        "--keep-aux", action="store_true",
        help="also convert the auxiliary heads and the positive-query projections",
    )
    parser.add_argument(
        "--config-file", default=default_config_file(), metavar="FILE",
        help="LazyConfig whose model defines the expected parameters (default: %(default)s)",
    )
    parser.add_argument(
        "opts", nargs="*", metavar="key=value", help="config overrides, key=value (e.g. "
        "model.query_head.num_classes=1203)",
    )
    return parser.parse_intermixed_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    """Returns the exit status: 0 when every parameter converted, 1 otherwise."""
    args = parse_args(argv)
    try:
        state_dict = load_official_checkpoint(args.input)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    cfg = load_lazy_config(args.config_file, args.opts)
    model = instantiate(cfg.model)
    try:
        target_architecture = model_architecture(model)
    except ValueError as e:
        print(f"error: {args.config_file}: {e}", file=sys.stderr)
        return 1
    source_architecture = official_architecture(state_dict)
    if source_architecture not in (None, target_architecture):
        print(
            f"error: {args.input} is a {source_architecture} checkpoint, but the model of "
            f"{args.config_file} is a {target_architecture}; pass a {source_architecture} "
            f"config, e.g. --config-file {_ARCHITECTURE_CONFIGS[source_architecture]}",
            file=sys.stderr,
        )
        return 1
    converted, report = convert_official_state_dict(state_dict, model, keep_aux=args.keep_aux)
    if not converted:
        print(
            f"error: {args.input}: none of its {len(state_dict)} keys is a parameter of the "
            f"authors' Co-DETR in the layout of {args.config_file} (first keys: "
            f"{list(state_dict)[:5]}); is it an official Co-DETR checkpoint?",
            file=sys.stderr,
        )
        return 1
    print(report.summary())
    if not report.ok:
        print(f"error: {args.input} does not convert cleanly; nothing written.", file=sys.stderr)
        return 1
    torch.save({"model": converted}, args.output)
    print(f"Wrote {len(converted)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
