"""
Tiny models of every architecture exported to ONNX (run by ONNX Runtime) and TorchScript,
traced on one random image: on the two parity images of different sizes, batched and alone,
the exported models give PyTorch's detections (same detections in the
same order, boxes and scores to 1e-4 relative, soft-NMS included) without re-export.
"""

import onnx
import onnxruntime as ort
import pytest
import torch

from codetr.export import INPUT_NAMES, OUTPUT_NAMES, batch_images
from codetr.export.exporting import export_onnx, export_torchscript

from .models import (
    ARCHITECTURES,
    assert_same_detections,
    build_tiny_model,
    decayed_by_soft_nms,
    parity_images,
    pytorch_detections,
)


def _image_batches():
    """The two parity images (243 x 192, 183 x 215) batched, and the second alone: other batch
    sizes and image sizes than the trace's."""
    first, second = parity_images()
    return [[first, second], [second]]


_BASE_DETECTORS = ("dino", "deformable_detr")


class _Exported:
    """One tiny architecture with its exports, traced on a random 150 x 170 image, and
    PyTorch's detections of every batch of :func:`_image_batches` (computed once)."""

    def __init__(self, name, directory):
        self.name = name
        self.model = build_tiny_model(name)
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (1, 3, 150, 170), generator=generator).to(torch.uint8)
        sizes = torch.tensor([[150, 170]])
        self.onnx_path = export_onnx(self.model, images, sizes, str(directory / "model.onnx"))
        export_torchscript(self.model, images, sizes, str(directory / "model.ts"))
        self.session = ort.InferenceSession(self.onnx_path, providers=["CPUExecutionProvider"])
        self.traced = torch.jit.load(str(directory / "model.ts"))
        # DINO and Deformable-DETR give the graphs of Co-DINO and Co-Deformable-DETR (the
        # auxiliary heads are not part of the inference): the batch of two images is enough
        self.batches = _image_batches()[: 1 if name in _BASE_DETECTORS else None]
        self.expected = [pytorch_detections(self.model, images) for images in self.batches]
        self.decayed = None
        if name == "dino":
            self.decayed = decayed_by_soft_nms(self.model, self.batches[0], self.expected[0])


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def exported(request, tmp_path_factory):
    return _Exported(request.param, tmp_path_factory.mktemp(request.param))


def test_onnx_runtime_gives_pytorch_s_detections(exported):
    errors = []
    for images, expected in zip(exported.batches, exported.expected):
        batch, sizes = batch_images(images)
        outputs = exported.session.run(
            None, {"images": batch.numpy(), "image_sizes": sizes.numpy()}
        )
        errors.append(assert_same_detections(outputs, expected))
    print(exported.name, "onnx", errors)


def test_torchscript_gives_pytorch_s_detections(exported):
    errors = []
    for images, expected in zip(exported.batches, exported.expected):
        batch, sizes = batch_images(images)
        with torch.no_grad():
            outputs = exported.traced(batch, sizes)
        errors.append(assert_same_detections(outputs, expected))
    print(exported.name, "torchscript", errors)


def test_onnx_graph_is_standard_with_dynamic_sizes(exported):
    model, session = exported.model, exported.session
    assert [i.name for i in session.get_inputs()] == list(INPUT_NAMES)
    assert [o.name for o in session.get_outputs()] == list(OUTPUT_NAMES)
    images = session.get_inputs()[0]
    assert images.type == "tensor(uint8)"
    assert images.shape[1] == 3 and all(isinstance(d, str) for d in images.shape[::2][:2])
    assert isinstance(images.shape[3], str)
    graph = onnx.load(exported.onnx_path).graph
    domains = {node.domain for node in graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    op_types = {node.op_type for node in graph.node}
    assert "GridSample" in op_types and "ATen" not in op_types
    assert ("Loop" in op_types) == (model.query_head.soft_nms_iou_threshold is not None)


def test_the_soft_nms_acts_in_the_comparisons(exported):
    # the DINO models' detections compared above include boxes that the soft-NMS decayed
    if exported.decayed is not None:
        assert exported.decayed >= 10
