"""Test-time output of the DETR query heads: top-k over (query x class) scores, then
optional class-aware soft-NMS."""

from typing import List, Optional, Tuple

import torch
from detectron2.structures import Boxes, Instances
from torch import Tensor

from torchvision.ops import box_convert

from codetr.layers import batched_soft_nms

__all__ = ["detr_detections"]


def detr_detections(
    logits: Tensor,
    boxes: Tensor,
    box_normalizers: Tensor,
    image_sizes: List[Tuple[int, int]],
    *,
    num_candidates: int,
    max_detections: int,
    soft_nms_iou_threshold: Optional[float] = None,
) -> List[Instances]:
    """
    Args:
        logits: (B, Q, K) class logits of the last decoder layer.
        boxes: (B, Q, 4) normalised cxcywh boxes of the last decoder layer.
        box_normalizers: (B, 4) the (w, h, w, h) in input pixels that boxes are relative to.
        image_sizes: per image (h, w) of the valid input area; the output Instances size.
        num_candidates: top-k over all Q x K sigmoid scores.
        max_detections: detections kept per image after the optional soft-NMS.
        soft_nms_iou_threshold: class-aware linear soft-NMS at this IoU; None for no NMS.
    Returns:
        per image Instances with pred_boxes (XYXY input pixels, clamped to the normaliser
        extent), scores and pred_classes, sorted by decreasing score. Boxes and scores are
        float32 also when the head ran under autocast.
    """
    logits, boxes = logits.float(), boxes.float()
    num_classes = logits.shape[-1]
    scores = logits.sigmoid().flatten(1)
    k = min(num_candidates, scores.shape[1])
    top_scores, top_index = scores.topk(k, dim=1)
    query_index = torch.div(top_index, num_classes, rounding_mode="floor")
    top_labels = top_index % num_classes
    top_boxes = box_convert(
        boxes.gather(1, query_index[..., None].expand(-1, -1, 4)), "cxcywh", "xyxy"
    )
    top_boxes = top_boxes * box_normalizers[:, None, :]
    limits = box_normalizers[:, None, :]
    top_boxes = torch.minimum(top_boxes.clamp(min=0), limits)

    results = []
    for image_index, image_size in enumerate(image_sizes):
        image_boxes = top_boxes[image_index]
        image_scores = top_scores[image_index]
        image_labels = top_labels[image_index]
        if soft_nms_iou_threshold is not None:
            keep, image_scores = batched_soft_nms(
                image_boxes,
                image_scores,
                image_labels,
                iou_threshold=soft_nms_iou_threshold,
                max_keep=max_detections,
            )
            image_boxes, image_labels = image_boxes[keep], image_labels[keep]
        else:
            image_boxes = image_boxes[:max_detections]
            image_scores = image_scores[:max_detections]
            image_labels = image_labels[:max_detections]
        result = Instances(image_size)
        result.pred_boxes = Boxes(image_boxes)
        result.scores = image_scores
        result.pred_classes = image_labels
        results.append(result)
    return results
