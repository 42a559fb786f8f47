"""Class-aware linear soft-NMS, reproducing mmcv 1.5.0's ``batched_nms`` with ``soft_nms``."""

from typing import Tuple

import torch
from torch import Tensor

__all__ = ["batched_soft_nms"]


def _pairwise_iou(boxes: Tensor) -> Tensor:
    """
    (N, 4) xyxy -> (N, N) IoU with the arithmetic of mmcv's CPU soft-NMS kernel (no +1 pixel
    offset): ``inter / (area_i + area_j - inter)``; 0/0 gives NaN, which never decays.
    """
    x1, y1, x2, y2 = boxes.unbind(-1)
    areas = (x2 - x1) * (y2 - y1)
    left = torch.max(x1[:, None], x1[None, :])
    top = torch.max(y1[:, None], y1[None, :])
    right = torch.min(x2[:, None], x2[None, :])
    bottom = torch.min(y2[:, None], y2[None, :])
    inter_w = (right - left).clamp(min=0)
    inter_h = (bottom - top).clamp(min=0)
    inter = inter_w * inter_h
    return inter / (areas[:, None] + areas[None, :] - inter)


@torch.no_grad()
def batched_soft_nms(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    *,
    iou_threshold: float,
    min_score: float = 1e-3,
    max_keep: int,
) -> Tuple[Tensor, Tensor]:
    """
    Linear soft-NMS within each class. Repeatedly selects the box with the highest current
    score; every remaining box whose IoU with it is ``>= iou_threshold`` has its score
    multiplied by ``1 - IoU``, and remaining boxes whose score falls below ``min_score`` are
    discarded (the first selected box is never discarded, as in mmcv).

    Reproduces ``mmcv.ops.batched_nms(boxes, scores, labels, dict(type="soft_nms",
    iou_threshold=..., min_score=...))[1][:max_keep]`` of mmcv 1.5.0 for fewer than 10000
    boxes (mmcv's default ``split_thr``): classes are separated by shifting the boxes of class
    c by ``c * (boxes.max() + 1)``, IoUs are computed on the shifted boxes, and equal scores
    are resolved by the kernel's in-place swapping order. The result is bitwise identical for
    float32 input; other floating dtypes are computed in their own precision.

    Args:
        boxes: (N, 4) xyxy boxes.
        scores: (N,) scores.
        labels: (N,) integer class labels.
        iou_threshold: IoU from which a box's score decays.
        min_score: boxes whose decayed score falls below this are discarded.
        max_keep: maximum number of boxes returned.

    Returns:
        keep: (K,) long indices into the inputs, in selection order (non-increasing decayed
            score), K <= max_keep.
        kept_scores: (K,) decayed scores of the kept boxes, in the dtype of ``boxes``.
        Neither is differentiable.
    """
    num_boxes = boxes.shape[0]
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {tuple(boxes.shape)}")
    if scores.shape != (num_boxes,) or labels.shape != (num_boxes,):
        raise ValueError(
            f"scores and labels must have shape ({num_boxes},), "
            f"got {tuple(scores.shape)} and {tuple(labels.shape)}"
        )
    if max_keep < 0:
        raise ValueError(f"max_keep must be non-negative, got {max_keep}")
    device = boxes.device
    if num_boxes == 0:
        return torch.zeros(0, dtype=torch.long, device=device), boxes.new_zeros(0)

    dtype = boxes.dtype
    offsets = labels.to(boxes) * (boxes.max() + torch.tensor(1, dtype=dtype, device=device))
    iou = _pairwise_iou(boxes + offsets[:, None])
    # thresholds in the working precision, as the kernel compares in float32
    iou_threshold_t = torch.tensor(iou_threshold, dtype=dtype, device=device)
    min_score_t = torch.tensor(min_score, dtype=dtype, device=device)

    # `order[p]` is the input index at array position p and `current[p]` its current score;
    # positions [0, step) hold the selected boxes, [step, num_alive) the remaining ones.
    order = torch.arange(num_boxes, device=device)
    current = scores.to(dtype).clone()
    num_alive = num_boxes
    step = 0
    while step < min(num_alive, max_keep):
        # the first position holding the maximum, swapped into position `step`
        best = step + int(current[step:num_alive].argmax())
        swap = torch.tensor([best, step], device=device)
        order[[step, best]] = order[swap]
        current[[step, best]] = current[swap]

        rest = slice(step + 1, num_alive)
        overlap = iou[order[step], order[rest]]
        decay = torch.where(overlap >= iou_threshold_t, 1 - overlap, torch.ones_like(overlap))
        current[rest] *= decay

        # Discarding, as the kernel does it: scanning forward, each discarded box is replaced
        # by the last remaining box (itself re-examined), so the j-th discarded position among
        # the first `num_kept` is filled by the j-th kept box counted from the end.
        kept = ~(current[rest] < min_score_t)
        num_kept = int(kept.sum())
        holes = (~kept[:num_kept]).nonzero().flatten()
        fillers = kept[num_kept:].nonzero().flatten().flip(0) + num_kept
        new_positions = torch.arange(num_kept, device=device)
        new_positions[holes] = fillers
        new_positions += step + 1
        order[step + 1 : step + 1 + num_kept] = order[new_positions]
        current[step + 1 : step + 1 + num_kept] = current[new_positions]
        num_alive = step + 1 + num_kept
        step += 1
    return order[:step], current[:step]
