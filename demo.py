#!/usr/bin/env python
"""
Draw a Co-DETR model's detections on images.

    python demo.py --config-file configs/co_dino/co_dino_5scale_r50_1x_coco.py \\
        --input IMAGE|DIR|GLOB --output OUT_DIR [--confidence-threshold 0.3] \\
        train.init_checkpoint=model.pth [key=value ...]
    python demo.py --config-file CONFIG --onnx OUT_DIR/model.onnx --input ... --output ...

The weights are those of ``train.init_checkpoint`` (set it with an override); with ``--onnx``
the detections are those of a model exported by ``tools/deploy/export_model.py``, run by ONNX
Runtime (``codetr.export.OnnxPredictor``; the config then gives the test augmentations and
the class names only). Each input image is written, with its detections drawn in the names
and colours of the test dataset's metadata (``dataloader.test.dataset.names``), to OUT_DIR
under its own file name. Every file of a folder (or that a glob matches) is an input: a file
that is not an image (by its extension) or that cannot be read is reported by name and the
others are drawn; the exit status is then 1.
"""

import argparse
import glob
import logging
import os
import sys
from typing import Callable, List, Optional

from codetr import check_prerequisites

check_prerequisites()  # explains a missing torch / detectron2 before they are imported

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from codetr_toy import register_toy_datasets  # noqa: E402
from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.data.catalog import Metadata  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.structures import Instances  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from detectron2.utils.visualizer import Visualizer  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from codetr.engine import (  # noqa: E402
    LazyPredictor,
    flush_denormals,
    load_lazy_config,
    reuse_freed_memory,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

logger = logging.getLogger("codetr.demo")


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="LazyConfig file")
    parser.add_argument(
        "--input", required=True, help="an image file, a folder of images, or a glob pattern"
    )
    parser.add_argument("--output", required=True, help="folder for the drawn images")
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.3,
        help="draw the detections with at least this score",
    )
    parser.add_argument(
        "--onnx",
        default=None,
        metavar="FILE",
        help="run this exported ONNX model with ONNX Runtime instead of the PyTorch model",
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[], help="config overrides: key=value ..."
    )
    return parser


def list_inputs(pattern: str) -> List[str]:
    """
    The files named by ``pattern``: a file, the regular files of a folder (sorted), or the
    files that a glob pattern matches (sorted). Those that are not images are listed too:
    :func:`main` reports them.

    Raises:
        FileNotFoundError: if it names no file.
    """
    if os.path.isdir(pattern):
        paths = [os.path.join(pattern, name) for name in sorted(os.listdir(pattern))]
        paths = [p for p in paths if os.path.isfile(p)]
    elif os.path.isfile(pattern):
        paths = [pattern]
    else:
        paths = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
    if not paths:
        raise FileNotFoundError(f"--input {pattern!r} names no file")
    return paths


def is_image_file(path: str) -> bool:
    """Whether ``path`` has an image file extension (:data:`IMAGE_EXTENSIONS`)."""
    return path.lower().endswith(IMAGE_EXTENSIONS)


def metadata_dataset_name(cfg: DictConfig) -> str:
    """The (first) dataset name of ``cfg.dataloader.test.dataset.names``."""
    names = cfg.dataloader.test.dataset.names
    return names if isinstance(names, str) else names[0]


def main(argv: Optional[List[str]] = None) -> int:
    """
    Draw the detections on every image of ``--input``. A file that is not an image, or an
    image that cannot be read, is reported by name and the others are still drawn.

    Returns:
        the exit status: 0 when every input file was drawn, 1 when some failed.
    """
    args = build_argument_parser().parse_args(argv)
    setup_logger(name="codetr")
    setup_logger()
    flush_denormals()
    register_toy_datasets()  # for the class names of a toy model (its config may be a yaml)
    cfg = load_lazy_config(args.config_file, args.opts)
    if args.onnx is None and not cfg.train.init_checkpoint:
        raise ValueError("No weights: give them with the override train.init_checkpoint=PATH")
    paths = list_inputs(args.input)
    if args.onnx is not None:
        from codetr.export.onnx_predictor import OnnxPredictor  # needs onnxruntime

        predictor = OnnxPredictor.from_config(cfg, args.onnx)
    else:
        predictor = LazyPredictor(cfg)
    metadata = MetadataCatalog.get(metadata_dataset_name(cfg))

    os.makedirs(args.output, exist_ok=True)
    drawn, failed = 0, []
    with reuse_freed_memory():
        for path in paths:
            if not is_image_file(path):
                logger.error(f"skipped: not an image: {path}")
                failed.append(path)
                continue
            image = read_input_image(path)
            if image is None:
                failed.append(path)
                continue
            draw_predictions(predictor, metadata, path, image, args)
            drawn += 1
    summary = f"{drawn} drawn, {len(failed)} failed"
    if failed:
        logger.error(f"{summary}: {', '.join(failed)}")
        return 1
    logger.info(summary)
    return 0


def read_input_image(path: str) -> Optional[np.ndarray]:
    """The image at ``path`` in BGR order; None, reported with the reason, if unreadable."""
    try:
        return read_image(path, format="BGR")
    except Exception as e:  # the decoders raise many kinds on a corrupt or truncated file
        logger.error(f"skipped: cannot read the image {path}: {type(e).__name__}: {e}")
        return None


def draw_predictions(
    predictor: Callable[[np.ndarray], Instances],
    metadata: Metadata,
    path: str,
    image: np.ndarray,
    args: argparse.Namespace,
) -> None:
    """Predicts ``image`` (BGR), read from ``path``, and writes the drawing into ``args.output``."""
    instances = predictor(image).to("cpu")
    instances = instances[instances.scores >= args.confidence_threshold]
    visualizer = Visualizer(image[:, :, ::-1], metadata)
    drawn = visualizer.draw_instance_predictions(instances).get_image()
    out_path = os.path.join(args.output, os.path.basename(path))
    cv2.imwrite(out_path, drawn[:, :, ::-1])
    logger.info(f"{path}: {len(instances)} detections -> {out_path}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))  # pragma: no cover
