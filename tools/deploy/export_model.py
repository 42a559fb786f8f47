#!/usr/bin/env python
"""
Export the inference model of a Co-DETR detector (DINO, Co-DINO, Deformable-DETR,
Co-Deformable-DETR; ResNet or Swin backbone; test output of the DETR query head,
``model.eval_module=detr``) to ONNX or TorchScript, in the conventions of detectron2's
``tools/deploy/export_model.py``.

    python tools/deploy/export_model.py --config-file configs/co_dino/co_dino_5scale_r50_1x_coco.py \\
        --format onnx --output OUT_DIR [--sample-image IMG] [--opset 17] [--input-dtype uint8] \\
        train.init_checkpoint=model.pth [key=value ...]

Writes ``OUT_DIR/model.onnx`` (``--format onnx``) or ``OUT_DIR/model.ts`` (``--format
torchscript``, ``torch.jit.load``). The graph (:class:`codetr.export.DeployableDetector`):

* inputs ``images`` (B, 3, H, W) uint8 (``--input-dtype float32``: float32), 0-255, in the
  model's channel order (``model.input_format``, RGB for the authors' weights), images at the
  top-left, padding anywhere; ``image_sizes`` (B, 2) int64 (height, width) of every image.
  Batch size, height and width are dynamic.
* in the graph: normalisation, padding mask, backbone, neck, encoder, query selection, decoder,
  top-k and the model's soft-NMS (an ONNX ``Loop``).
* outputs ``boxes`` (B, D, 4) float32 XYXY in input pixels, ``scores`` (B, D), ``classes``
  (B, D) int64, ``num_detections`` (B,) int64: the first ``num_detections[i]`` are image i's
  detections, D = ``model.query_head.max_detections``.

The sample image only drives the trace (default: a random 640 x 640 image); with
``--sample-image`` it is read and transformed as the test data is. After the export, the
exported model is run on the sample and its detections are compared with PyTorch's (logged;
for ONNX when onnxruntime is installed; a difference is a warning). Weights: ``train.init_checkpoint`` (as ``train_net.py
--eval-only``: the EMA weights when ``train.model_ema.enabled``); without it the model keeps
its random initialisation (a warning). Run the ONNX model with ``codetr.export.OnnxPredictor``
or evaluate it with ``tools/deploy/evaluate_onnx.py``.
"""

import argparse
import logging
import os
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from detectron2.config import instantiate
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.utils.logger import setup_logger
from omegaconf import DictConfig
from torchvision.ops import box_iou

from codetr.engine import (
    AtomicCheckpointer,
    load_lazy_config,
    min_loaded_shares,
    model_ema_enabled,
)
from codetr.export import DeployableDetector, batch_images
from codetr.export.exporting import DEFAULT_OPSET, MIN_OPSET, export_onnx, export_torchscript

logger = logging.getLogger("codetr.export_model")

_DTYPES = {"uint8": torch.uint8, "float32": torch.float32}
_DEFAULT_SAMPLE_SIZE = (640, 640)


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="LazyConfig file")
    parser.add_argument(
        "--format", choices=["onnx", "torchscript"], default="onnx", help="output format"
    )
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument(
        "--sample-image", default=None, help="image that drives the trace (default: random)"
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help=f"ONNX opset (at least {MIN_OPSET}, for GridSample)",
    )
    parser.add_argument(
        "--input-dtype",
        choices=sorted(_DTYPES),
        default="uint8",
        help="dtype of the graph's images input",
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[], help="config overrides: key=value ..."
    )
    return parser


def build_model(cfg: DictConfig) -> torch.nn.Module:
    """The config's model on the CPU, in eval mode, with the weights of
    ``train.init_checkpoint`` (EMA weights when ``train.model_ema.enabled``)."""
    model = instantiate(cfg.model).eval()
    weights = cfg.train.get("init_checkpoint", "")
    if weights:
        AtomicCheckpointer(
            model, load_ema_weights=model_ema_enabled(cfg), **min_loaded_shares(cfg)
        ).load(weights, checkpointables=[])
    else:
        logger.warning("cfg.train.init_checkpoint is empty: the model has random weights.")
    return model


def sample_image(cfg: DictConfig, path: Optional[str], input_format: str) -> torch.Tensor:
    """(3, H, W) uint8 in ``input_format``: ``path`` read and transformed by the test
    augmentations, or a random image."""
    if path is None:
        generator = torch.Generator().manual_seed(0)
        return torch.randint(0, 256, (3, *_DEFAULT_SAMPLE_SIZE), generator=generator).to(
            torch.uint8
        )
    image = read_image(path, format=input_format)
    mapper = cfg.dataloader.test.mapper
    key = "augmentation" if "augmentation" in mapper else "augmentations"
    aug_input = T.AugInput(np.ascontiguousarray(image))
    T.AugmentationList(list(instantiate(mapper[key])))(aug_input)
    return torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))


def compare_with_pytorch(model: torch.nn.Module, outputs: Tuple, image: torch.Tensor) -> Dict:
    """
    Compares the exported model's ``outputs`` on ``image`` with ``model.inference`` and logs the
    result: how many detections are equal in both, in the same order (same class, box within
    1e-3 of the image size, score within 1e-3 relative), the largest differences among those,
    and how many of PyTorch's detections the exported model has at all (same class, IoU >=
    0.99). Rounding differences can order nearly equal scores differently (likely with random
    weights), and the soft-NMS then goes on differently: a warning, not an error.

    Returns:
        {"num_detections", "num_expected", "equal_prefix", "found", "boxes_px", "scores_rel"}.
    """
    with torch.no_grad():
        expected = model.inference([{"image": image.float()}], do_postprocess=False)[0]
    boxes, scores, classes, counts = (torch.as_tensor(np.asarray(o)) for o in outputs)
    count = int(counts[0])
    boxes, scores, classes = boxes[0, :count], scores[0, :count], classes[0, :count]
    size = max(image.shape[-2:])
    common = min(count, len(expected))
    box_errors = (boxes[:common] - expected.pred_boxes.tensor[:common]).abs().amax(-1)
    score_errors = (scores[:common] - expected.scores[:common]).abs() / expected.scores[
        :common
    ].abs().clamp(min=1e-12)
    equal = (
        (classes[:common] == expected.pred_classes[:common])
        & (box_errors <= 1e-3 * size)
        & (score_errors <= 1e-3)
    )
    prefix = int(equal.long().cumprod(0).sum())
    same_class = classes[:, None] == expected.pred_classes[None, :]
    found = int(((box_iou(boxes, expected.pred_boxes.tensor) >= 0.99) & same_class).any(0).sum())
    report = {
        "num_detections": count,
        "num_expected": len(expected),
        "equal_prefix": prefix,
        "found": found,
        "boxes_px": float(box_errors[:prefix].max()) if prefix else 0.0,
        "scores_rel": float(score_errors[:prefix].max()) if prefix else 0.0,
    }
    message = (
        f"Exported vs PyTorch on the sample: {count} vs {len(expected)} detections, the first "
        f"{prefix} equal (largest differences: boxes {report['boxes_px']:.3g} px, scores "
        f"{report['scores_rel']:.3g} relative), {found} of PyTorch's found"
    )
    if prefix == count == len(expected):
        logger.info(message)
    else:
        logger.warning(
            message + ": from there on nearly equal scores are ordered differently (rounding), "
            "which random weights make likely"
        )
    return report


def main(argv: Optional[List[str]] = None) -> str:
    """Exports the model; returns the path of the written file."""
    args = build_argument_parser().parse_args(argv)
    setup_logger(name="codetr")
    setup_logger()
    cfg = load_lazy_config(args.config_file, args.opts)
    model = build_model(cfg)
    detector = DeployableDetector(model)
    image = sample_image(cfg, args.sample_image, model.input_format)
    images, image_sizes = batch_images([image.to(_DTYPES[args.input_dtype])])
    os.makedirs(args.output, exist_ok=True)
    if args.format == "onnx":
        path = export_onnx(
            detector, images, image_sizes, os.path.join(args.output, "model.onnx"), opset=args.opset
        )
        try:
            from codetr.export.onnx_predictor import OnnxDetector
        except ImportError:
            logger.warning("onnxruntime is not installed: the exported model is not checked")
            return path
        outputs = OnnxDetector(path).run(images, image_sizes)
    else:
        path = os.path.join(args.output, "model.ts")
        traced = export_torchscript(detector, images, image_sizes, path)
        with torch.no_grad():
            outputs = traced(images, image_sizes)
    compare_with_pytorch(model, outputs, image)
    return path


if __name__ == "__main__":
    main(sys.argv[1:])  # pragma: no cover
