#!/usr/bin/env python
"""
Train or evaluate a Co-DETR model described by a LazyConfig.

    python train_net.py --config-file configs/toy/dino_toy.py [--eval-only] [--resume]
        [--num-gpus N] [--num-machines M --machine-rank R --dist-url URL] [key=value ...]

- ``key=value`` overrides config fields (``train.max_iter=100``,
  ``dataloader.train.total_batch_size=8``); a key missing from the config is an error, use
  ``+key=value`` to add one.
- ``--resume`` continues from the last checkpoint in ``train.output_dir`` (exactly, when
  ``train.seed >= 0``); without it, training starts at iteration 0 from the weights of
  ``train.init_checkpoint``.
- ``--eval-only`` evaluates ``train.init_checkpoint`` (with ``--resume``: the last checkpoint
  of ``train.output_dir``) on ``dataloader.test`` with ``dataloader.evaluator``; with
  ``train.model_ema.enabled``, the EMA of the weights that the checkpoint holds.
- ``--register-coco NAME JSON IMAGE_ROOT`` (repeatable) registers a COCO-format dataset
  under NAME; use it with ``dataloader.train.dataset.names=NAME`` (and ``.test``).
- The number of classes follows the dataset: ``model.query_head.num_classes`` is set from the
  ``thing_classes`` of the first training dataset (of the test dataset with ``--eval-only``).
- ``--num-gpus N`` starts N processes on this machine, one per GPU. Without GPUs it starts N
  CPU processes that train together with the gloo backend (set ``train.device=cpu``, the
  default when no GPU is visible); ``dataloader.train.total_batch_size`` must be divisible
  by the total number of processes.
"""

import argparse
import os
import sys
from typing import Any, Dict, List, Optional

from codetr import check_prerequisites

check_prerequisites()  # explains a missing torch / detectron2 before they are imported

from codetr_toy import register_toy_datasets  # noqa: E402
from detectron2.data.datasets import register_coco_instances  # noqa: E402
from detectron2.engine import default_argument_parser, default_setup, launch  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from codetr.data import register_objects365  # noqa: E402
from codetr.engine import (  # noqa: E402
    AtomicCheckpointer,
    LazyConfigTrainer,
    check_training_masks,
    flush_denormals,
    load_lazy_config,
    min_loaded_shares,
    model_ema_enabled,
    reuse_freed_memory,
    sync_num_classes,
)


def register_datasets(specs: Optional[List[List[str]]]) -> None:
    """Registers, in this process, the built-in toy datasets and Objects365 (a saved
    ``config.yaml`` names them without importing the data config that registers them) and the
    ``--register-coco NAME JSON IMAGE_ROOT`` datasets."""
    register_toy_datasets()
    register_objects365()
    for name, json_file, image_root in specs or []:
        for path in (json_file, image_root):
            if not os.path.exists(path):
                raise FileNotFoundError(f"--register-coco {name}: {path!r} does not exist")
        register_coco_instances(name, {}, json_file, image_root)


def main(args) -> Optional[Dict[str, Any]]:
    """
    Run one process of the job described by the parsed command line ``args``.

    Returns:
        the evaluation results (of the last evaluation when training), if any.
    """
    register_datasets(args.register_coco)
    flush_denormals()
    cfg = load_lazy_config(args.config_file, args.opts or [])
    sync_num_classes(cfg, eval_only=args.eval_only)
    default_setup(cfg, args)  # sets up the "detectron2" and "fvcore" loggers
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="codetr")

    if args.eval_only:
        model = LazyConfigTrainer.build_model(cfg)
        model = LazyConfigTrainer.build_ddp_model(cfg, model)
        AtomicCheckpointer(
            model,
            cfg.train.output_dir,
            load_ema_weights=model_ema_enabled(cfg),
            **min_loaded_shares(cfg),
        ).resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
        with reuse_freed_memory():
            return LazyConfigTrainer.test(cfg, model)

    trainer = LazyConfigTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def build_argument_parser() -> argparse.ArgumentParser:
    """detectron2's ``default_argument_parser``, with this script's usage as its epilog."""
    parser = default_argument_parser(epilog=__doc__)
    parser.add_argument(
        "--register-coco",
        nargs=3,
        action="append",
        metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format dataset under NAME (repeatable)",
    )
    return parser


def invoke_main(argv: Optional[List[str]] = None) -> None:
    """Parse ``argv``, check the config and its overrides, and launch :func:`main`."""
    parser = build_argument_parser()
    args = parser.parse_args(argv)
    if not args.config_file:
        parser.error("--config-file is required")
    # A bad config path, override key or dataset fails here once, not in every worker.
    register_datasets(args.register_coco)
    cfg = load_lazy_config(args.config_file, args.opts or [])
    if not args.eval_only:
        check_training_masks(cfg)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main(sys.argv[1:])  # pragma: no cover
