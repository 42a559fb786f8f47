"""
Export of a :class:`~codetr.export.DeployableDetector` to ONNX and TorchScript.

Both trace the detector once on sample inputs (``torch.jit.trace``; for ONNX through the
TorchScript-based exporter, ``torch.onnx.export(..., dynamo=False)``): every size is recorded
from tensor shapes, so the graphs take any batch size and image size, and the soft-NMS, a
TorchScript function, stays a loop (an ONNX ``Loop``).
"""

import copy
import logging
import os
import warnings
from typing import Dict, Tuple, Union

import torch
from torch import Tensor

from codetr.modeling import CoDETR

from .deployable import INPUT_NAMES, OUTPUT_NAMES, DeployableDetector

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "export_onnx", "export_torchscript"]

logger = logging.getLogger(__name__)

# ONNX GridSample (the deformable attention's sampling) exists from opset 16; 17 adds
# LayerNormalization
DEFAULT_OPSET = 17
MIN_OPSET = 16


def _deployable(model: Union[CoDETR, DeployableDetector]) -> DeployableDetector:
    return model if isinstance(model, DeployableDetector) else DeployableDetector(model)


def _quiet_trace():
    """Silences the tracer's and exporters' warnings about the deprecated TorchScript API and
    about Python values recorded as constants (the model's configuration: class count,
    thresholds, ...)."""
    context = warnings.catch_warnings()
    context.__enter__()
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
    return context


def export_onnx(
    model: Union[CoDETR, DeployableDetector],
    images: Tensor,
    image_sizes: Tensor,
    path: str,
    *,
    opset: int = DEFAULT_OPSET,
) -> str:
    """
    Writes the ONNX graph of ``DeployableDetector(model)`` to ``path``.

    Args:
        model: a CoDETR (wrapped here) or a DeployableDetector.
        images, image_sizes: sample inputs of the graph (see :class:`DeployableDetector`); their
            dtypes are those of the graph's inputs (uint8 or float32 images), their sizes are
            not fixed: batch, height and width are dynamic axes.
        path: the ``.onnx`` file.
        opset: ONNX opset, at least :data:`MIN_OPSET` (GridSample).

    Returns:
        ``path``.
    """
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} < {MIN_OPSET}: ONNX GridSample needs opset >= 16")
    detector = _deployable(model).eval()
    dynamic_axes = {
        "images": {0: "batch", 2: "height", 3: "width"},
        "image_sizes": {0: "batch"},
        "boxes": {0: "batch"},
        "scores": {0: "batch"},
        "classes": {0: "batch"},
        "num_detections": {0: "batch"},
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    context = _quiet_trace()
    try:
        with torch.no_grad():
            torch.onnx.export(
                detector,
                (images, image_sizes),
                path,
                dynamo=False,
                opset_version=opset,
                input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
    finally:
        context.__exit__(None, None, None)
    _write_metadata(path, model_metadata(detector))
    logger.info(f"ONNX model (opset {opset}) written to {path}")
    return path


def model_metadata(detector: DeployableDetector) -> Dict[str, str]:
    """What a runtime needs to know of the exported model beyond its graph: the channel order
    of its images (``input_format``), its class count, its output size and test settings."""
    model = detector.model
    head = model.query_head
    return {
        "input_format": model.input_format,
        "num_classes": str(head.num_classes),
        "max_detections": str(detector.num_outputs),
        "num_candidates": str(detector.num_candidates),
        "soft_nms_iou_threshold": str(head.soft_nms_iou_threshold),
        "size_divisibility": str(model.size_divisibility),
        "query_head": type(head).__name__,
        "backbone": type(model.backbone).__name__,
    }


def _write_metadata(path: str, metadata: Dict[str, str]) -> None:
    """Stores ``metadata`` in the ONNX file as ``codetr.<key>`` metadata properties."""
    import onnx

    proto = onnx.load(path, load_external_data=False)
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"codetr.{key}", value
    onnx.save(proto, path)


def export_torchscript(
    model: Union[CoDETR, DeployableDetector], images: Tensor, image_sizes: Tensor, path: str
) -> torch.jit.ScriptModule:
    """
    Traces ``DeployableDetector(model)`` on the sample inputs and saves it to ``path``
    (``torch.jit.load`` reads it; ``forward(images, image_sizes)`` as the detector's).

    Returns:
        the traced module.
    """
    # a copy whose parameters need no gradient: the trace does not record torch.no_grad(), and
    # the traced module runs in-place operations (the feed-forward's relu_) on them
    detector = copy.deepcopy(_deployable(model)).eval().requires_grad_(False)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    context = _quiet_trace()
    try:
        with torch.no_grad():
            traced = torch.jit.trace(detector, (images, image_sizes), check_trace=False)
        torch.jit.save(traced, path)
    finally:
        context.__exit__(None, None, None)
    logger.info(f"TorchScript model written to {path}")
    return traced


def sample_inputs(
    height: int = 800, width: int = 1333, batch_size: int = 1, dtype: torch.dtype = torch.uint8
) -> Tuple[Tensor, Tensor]:
    """Random sample inputs of the given size (the graph's sizes are dynamic all the same)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 3, height, width), generator=generator)
    sizes = torch.tensor([[height, width]] * batch_size, dtype=torch.long)
    return images.to(dtype), sizes
