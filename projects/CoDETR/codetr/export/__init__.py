"""
Deployment: the inference model of a Co-DETR detector as an ONNX or TorchScript graph
(:class:`DeployableDetector`, :func:`export_onnx`, :func:`export_torchscript`), and ONNX
Runtime inference giving detectron2 ``Instances`` (:class:`OnnxDetector`,
:class:`OnnxPredictor`, in :mod:`codetr.export.onnx_predictor`, which imports onnxruntime).
"""

from .deployable import INPUT_NAMES, OUTPUT_NAMES, DeployableDetector, batch_images
from .exporting import export_onnx, export_torchscript
from .soft_nms_graph import soft_nms_padded

__all__ = [
    "DeployableDetector",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "batch_images",
    "export_onnx",
    "export_torchscript",
    "soft_nms_padded",
]
