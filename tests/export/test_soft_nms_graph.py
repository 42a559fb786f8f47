"""
The bounded, vectorised soft-NMS of the exported graphs (``codetr.export.soft_nms_padded``)
returns what ``batched_soft_nms`` returns, bitwise, in Python, traced (a TorchScript loop) and
exported to ONNX (an ONNX Loop run by ONNX Runtime), for any number of problems and candidates.
"""

import onnx
import onnxruntime as ort
import pytest
import torch

from codetr.export import soft_nms_padded
from codetr.layers import batched_soft_nms

from ..layers.test_soft_nms import _mmcv_soft_nms_reference


def _problem(seed: int, num_boxes: int = 120, num_classes: int = 3):
    """Random boxes with exact duplicates, a zero-area box and coarse scores (many ties), as
    in tests/layers/test_soft_nms.py."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.rand(num_boxes, 2, generator=generator) * 60
    sizes = torch.rand(num_boxes, 2, generator=generator) * 30 + 5
    boxes = torch.cat([centers - sizes / 2, centers + sizes / 2], dim=1).clamp(min=0)
    boxes[10:20] = boxes[:10]
    boxes[20] = torch.tensor([3.0, 3.0, 3.0, 9.0])
    scores = torch.randint(1, 20, (num_boxes,), generator=generator).float() / 20
    scores[::7] = torch.rand(len(scores[::7]), generator=generator)
    labels = torch.randint(0, num_classes, (num_boxes,), generator=generator)
    return boxes, scores, labels


def _batch(problems):
    return [torch.stack(parts) for parts in zip(*problems)]


def _assert_rows_equal(keep, kept_scores, num_kept, problems, **settings):
    keep, kept_scores, num_kept = (torch.as_tensor(t) for t in (keep, kept_scores, num_kept))
    for row, (boxes, scores, labels) in enumerate(problems):
        expected_keep, expected_scores = batched_soft_nms(boxes, scores, labels, **settings)
        count = int(num_kept[row])
        assert count == len(expected_keep)
        assert keep[row, :count].tolist() == expected_keep.tolist()
        assert torch.equal(kept_scores[row, :count], expected_scores)  # bitwise
        assert not keep[row, count:].any() and not kept_scores[row, count:].any()


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("max_keep", [1, 15, 500])
def test_equals_batched_soft_nms(seed, max_keep):
    iou_threshold, min_score = [(0.3, 1e-3), (0.5, 0.05), (0.8, 1e-3)][seed]
    problems = [_problem(seed * 10 + row) for row in range(3)]
    settings = dict(iou_threshold=iou_threshold, min_score=min_score, max_keep=max_keep)
    keep, kept_scores, num_kept = soft_nms_padded(*_batch(problems), **settings)
    assert keep.shape == kept_scores.shape == (3, min(max_keep, 120))
    assert keep.dtype == num_kept.dtype == torch.long
    _assert_rows_equal(keep, kept_scores, num_kept, problems, **settings)


@pytest.mark.parametrize("seed", range(3))
def test_equals_per_box_mmcv_reference(seed):
    boxes, scores, labels = _problem(100 + seed)
    iou_threshold, min_score = [(0.3, 1e-3), (0.5, 0.05), (0.8, 1e-3)][seed]
    expected_keep, expected_scores = _mmcv_soft_nms_reference(
        boxes, scores, labels, iou_threshold, min_score
    )
    keep, kept_scores, num_kept = soft_nms_padded(
        boxes[None],
        scores[None],
        labels[None],
        iou_threshold=iou_threshold,
        min_score=min_score,
        max_keep=len(boxes),
    )
    count = int(num_kept[0])
    assert keep[0, :count].tolist() == expected_keep
    assert kept_scores[0, :count].tolist() == [float(s) for s in expected_scores]


class _SoftNMS(torch.nn.Module):
    def forward(self, boxes, scores, labels):
        return soft_nms_padded(
            boxes, scores, labels, iou_threshold=0.5, min_score=0.05, max_keep=40
        )


_SETTINGS = dict(iou_threshold=0.5, min_score=0.05, max_keep=40)


def test_traced_keeps_a_loop_for_any_size():
    problems = [_problem(0, num_boxes=30)]
    traced = torch.jit.trace(_SoftNMS(), tuple(_batch(problems)), check_trace=False)
    assert "prim::Loop" in str(traced.inlined_graph)
    for sizes in [(2, 120), (3, 50), (1, 30)]:
        problems = [
            _problem(20 + row, num_boxes=sizes[1], num_classes=4) for row in range(sizes[0])
        ]
        _assert_rows_equal(*traced(*_batch(problems)), problems, **_SETTINGS)


def test_onnx_loop_equals_batched_soft_nms(tmp_path):
    path = str(tmp_path / "soft_nms.onnx")
    problems = [_problem(0, num_boxes=30)] * 2
    dynamic = {0: "problems", 1: "candidates"}
    torch.onnx.export(
        _SoftNMS(),
        tuple(_batch(problems)),
        path,
        dynamo=False,
        opset_version=17,
        input_names=["boxes", "scores", "labels"],
        output_names=["keep", "kept_scores", "num_kept"],
        dynamic_axes={"boxes": dynamic, "scores": dynamic, "labels": dynamic},
    )
    graph = onnx.load(path).graph
    # one Loop node: the 40 steps are not unrolled (one step is about 50 nodes)
    assert [node.op_type for node in graph.node].count("Loop") == 1
    assert len(graph.node) < 500
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for sizes in [(1, 120), (3, 90), (2, 25)]:
        problems = [
            _problem(40 + row, num_boxes=sizes[1], num_classes=5) for row in range(sizes[0])
        ]
        boxes, scores, labels = _batch(problems)
        outputs = session.run(
            None, {"boxes": boxes.numpy(), "scores": scores.numpy(), "labels": labels.numpy()}
        )
        _assert_rows_equal(*outputs, problems, **_SETTINGS)


def test_rejects_invalid_arguments():
    boxes, scores, labels = (t[None] for t in _problem(0, num_boxes=30))
    with pytest.raises(ValueError, match="boxes"):
        soft_nms_padded(boxes[0], scores, labels, iou_threshold=0.5, max_keep=3)
    with pytest.raises(ValueError, match="scores and labels"):
        soft_nms_padded(boxes, scores[:, :29], labels, iou_threshold=0.5, max_keep=3)
    with pytest.raises(ValueError, match="max_keep"):
        soft_nms_padded(boxes, scores, labels, iou_threshold=0.5, max_keep=0)
