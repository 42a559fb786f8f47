"""
Tiny models of every exported architecture, the images they are tested on, and the comparison
of exported detections with PyTorch's.

The models are the tiny parity configs (``configs/parity``): Co-DINO and Co-Deformable-DETR
R50 shrunk to ResNet-18 at width 16 and a 64-dim transformer of 2 + 2 layers; DINO and
Deformable-DETR are them without auxiliary heads; the Swin model is Co-Deformable-DETR with a
tiny detectron2 Swin (embed 16, 2 blocks per stage, window 4). The DINO models' test output is
made to exercise the soft-NMS (60 candidates, 40 kept, IoU 0.3: boxes decay and some are
dropped by the limit); the last box and class layers get random weights so that the boxes
differ from the proposals, and three classes get a higher bias so that the candidates of a
class overlap.
"""

import os
from typing import Dict, List, Sequence

import numpy as np
import torch
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, instantiate
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.swin import SwinTransformer
from detectron2.structures import Instances
from torch import nn

from ..parity import REPO_ROOT, load_reference_outputs, reference_inputs

__all__ = [
    "ARCHITECTURES",
    "build_tiny_model",
    "parity_images",
    "assert_same_detections",
    "pytorch_detections",
    "decayed_by_soft_nms",
]

_PARITY_CONFIGS = os.path.join(REPO_ROOT, "configs", "parity")
# name -> (parity config, with auxiliary heads, Swin backbone)
ARCHITECTURES = {
    "dino": ("tiny_co_dino_r50.py", False, False),
    "co_dino": ("tiny_co_dino_r50.py", True, False),
    "deformable_detr": ("tiny_co_deformable_detr_r50.py", False, False),
    "co_deformable_detr": ("tiny_co_deformable_detr_r50.py", True, False),
    "co_deformable_detr_swin": ("tiny_co_deformable_detr_r50.py", True, True),
}


def tiny_model_config(name: str):
    """The model config of the tiny ``name`` model (see the module docstring)."""
    config_file, aux_heads, swin = ARCHITECTURES[name]
    model = LazyConfig.load(os.path.join(_PARITY_CONFIGS, config_file)).model
    if not aux_heads:
        model.aux_heads = []
        model.positive_queries = None
    if model.query_head.get("soft_nms_iou_threshold") is not None:
        model.query_head.update(num_candidates=60, max_detections=40, soft_nms_iou_threshold=0.3)
    if swin:
        model.backbone = L(SwinTransformer)(
            patch_size=4,
            embed_dim=16,
            depths=(2, 2, 2, 2),
            num_heads=(1, 2, 2, 4),
            window_size=4,
            drop_path_rate=0.0,
            out_indices=(1, 2, 3),
        )
        model.neck.input_shape = {
            f"p{i}": ShapeSpec(channels=16 * 2**i, stride=2 ** (i + 2)) for i in (1, 2, 3)
        }
        model.neck.in_features = ["p1", "p2", "p3"]
    return model


def build_tiny_model(name: str, seed: int = 0) -> nn.Module:
    """The tiny ``name`` model in eval mode, its last box and class layers random."""
    torch.manual_seed(seed)
    model = instantiate(tiny_model_config(name)).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        head = model.query_head
        for layer in [box_head[-1] for box_head in head.box_heads] + list(head.class_heads):
            weight = torch.randn(layer.weight.shape, generator=generator) * 0.05
            layer.weight.copy_(weight)
        # a few frequent classes: candidates of one class overlap, and the soft-NMS decays them
        for layer in head.class_heads:
            layer.bias[:3] += 3.0
    return model


def parity_images() -> List[torch.Tensor]:
    """The two parity images, (3, H, W) uint8 RGB of different sizes (243 x 192, 183 x 215)."""
    return [x["image"].to(torch.uint8) for x in reference_inputs(load_reference_outputs())]


def pytorch_detections(model: nn.Module, images: Sequence[torch.Tensor]) -> List[Instances]:
    """``model.inference`` of the batch of ``images`` without the final rescaling."""
    with torch.no_grad():
        return model.inference([{"image": image.float()} for image in images], do_postprocess=False)


def assert_same_detections(
    outputs: Sequence, expected: Sequence[Instances], *, rtol: float = 1e-4
) -> Dict[str, float]:
    """
    Asserts that the padded outputs (boxes, scores, classes, num_detections) of an exported
    model hold per image the same detections as ``expected``: the same number, the same
    classes in the same order, boxes and scores equal to ``rtol`` relative (boxes: relative to
    the image size). Returns the largest differences found (boxes in pixels, scores relative).
    """
    boxes, scores, classes, counts = (torch.as_tensor(np.asarray(o)) for o in outputs)
    assert boxes.shape[0] == len(expected)
    box_error = score_error = 0.0
    for index, instances in enumerate(expected):
        count = int(counts[index])
        assert count == len(instances), f"image {index}: {count} vs {len(instances)} detections"
        assert torch.equal(classes[index, :count], instances.pred_classes)
        image_size = max(instances.image_size)
        torch.testing.assert_close(
            boxes[index, :count], instances.pred_boxes.tensor, rtol=0, atol=rtol * image_size
        )
        torch.testing.assert_close(scores[index, :count], instances.scores, rtol=rtol, atol=0)
        # the padding is zeros
        assert not boxes[index, count:].any() and not scores[index, count:].any()
        if count:
            box_error = max(
                box_error, float((boxes[index, :count] - instances.pred_boxes.tensor).abs().max())
            )
            relative = (scores[index, :count] - instances.scores).abs() / instances.scores
            score_error = max(score_error, float(relative.max()))
    return {"boxes_px": box_error, "scores_rel": score_error}


def decayed_by_soft_nms(
    model: nn.Module, images: Sequence[torch.Tensor], detections: Sequence[Instances]
) -> int:
    """How many of the model's ``detections`` of ``images`` have a score that the soft-NMS
    decayed (one that no candidate of the top-k has)."""
    head = model.query_head
    settings = head.soft_nms_iou_threshold, head.max_detections
    head.soft_nms_iou_threshold, head.max_detections = None, head.num_candidates
    try:
        candidates = pytorch_detections(model, images)
    finally:
        head.soft_nms_iou_threshold, head.max_detections = settings
    return sum(
        sum(score not in set(c.scores.tolist()) for score in d.scores.tolist())
        for c, d in zip(candidates, detections)
    )
