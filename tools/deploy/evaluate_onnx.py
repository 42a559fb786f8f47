#!/usr/bin/env python
"""
Evaluate an exported ONNX model (``tools/deploy/export_model.py``) with ONNX Runtime on the
test data of a config, as ``train_net.py --eval-only`` evaluates the PyTorch model:
``dataloader.test`` through the model, ``dataloader.evaluator`` on its detections.

    python tools/deploy/evaluate_onnx.py --config-file configs/co_dino/co_dino_5scale_r50_1x_coco.py \\
        --onnx OUT_DIR/model.onnx [--num-threads N] [--register-coco NAME JSON IMAGE_ROOT] \\
        [key=value ...]

The config gives the data only (its model settings are those the graph was exported with);
``--register-coco`` registers a COCO-format dataset as ``train_net.py`` does (then use it with
``dataloader.test.dataset.names=NAME``). Prints the results table and returns the results.
"""

import argparse
import logging
import os
import sys
from typing import Any, Dict, List, Optional

from codetr_toy import register_toy_datasets
from detectron2.config import instantiate
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils.logger import setup_logger

from codetr.data import register_objects365
from codetr.engine import load_lazy_config
from codetr.export.onnx_predictor import OnnxDetector

logger = logging.getLogger("codetr.evaluate_onnx")


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="LazyConfig file")
    parser.add_argument("--onnx", required=True, metavar="FILE", help="the exported model")
    parser.add_argument(
        "--num-threads", type=int, default=None, help="ONNX Runtime intra-op threads"
    )
    parser.add_argument(
        "--register-coco",
        nargs=3,
        action="append",
        metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format dataset under NAME (repeatable)",
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[], help="config overrides: key=value ..."
    )
    return parser


def register_datasets(specs: Optional[List[List[str]]]) -> None:
    """The toy datasets, Objects365 and the ``--register-coco`` datasets (as train_net.py)."""
    register_toy_datasets()
    register_objects365()
    for name, json_file, image_root in specs or []:
        for path in (json_file, image_root):
            if not os.path.exists(path):
                raise FileNotFoundError(f"--register-coco {name}: {path!r} does not exist")
        register_coco_instances(name, {}, json_file, image_root)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = build_argument_parser().parse_args(argv)
    setup_logger(name="codetr")
    setup_logger()
    register_datasets(args.register_coco)
    cfg = load_lazy_config(args.config_file, args.opts)
    if "evaluator" not in cfg.dataloader:
        raise KeyError("cfg.dataloader has no evaluator")
    detector = OnnxDetector(args.onnx, num_threads=args.num_threads)
    logger.info(f"Evaluating {args.onnx} ({detector.metadata}) with ONNX Runtime")
    results = inference_on_dataset(
        detector, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    print_csv_format(results)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])  # pragma: no cover
