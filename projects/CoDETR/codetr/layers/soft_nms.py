"""Class-aware linear soft-NMS, reproducing mmcv 1.5.0's ``batched_nms`` with ``soft_nms``."""

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["batched_soft_nms", "SPLIT_THRESHOLD"]

# mmcv's batched_nms runs one NMS per class from this many boxes on (its split_thr)
SPLIT_THRESHOLD = 10000
# the largest IoU table computed ahead (float32: 400 MB, mmcv's largest single pass)
_IOU_TABLE_SIZE = SPLIT_THRESHOLD**2


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
    iou_threshold=..., min_score=...))[1][:max_keep]`` of mmcv 1.5.0: classes are separated by
    shifting the boxes of class c by ``c * (boxes.max() + 1)``, IoUs are computed on the
    shifted boxes, and equal scores are resolved by the kernel's in-place swapping order. From
    :data:`SPLIT_THRESHOLD` boxes on, as mmcv, each class is processed on its own (the same
    shifted boxes) and the kept boxes are ordered by decayed score (ties in input order; mmcv's
    sort leaves their order unspecified). The result is bitwise identical for float32 input;
    other floating dtypes are computed in their own precision.

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
    shifted = boxes + offsets[:, None]
    scores = scores.to(dtype)
    if num_boxes < SPLIT_THRESHOLD:
        order, decayed, num_selected = _soft_nms_rows(
            shifted[None], scores[None], iou_threshold, min_score, max_keep
        )
        return order[0, : num_selected[0]], decayed[0, : num_selected[0]]
    # one problem per class, solved side by side: row c holds class c's boxes, padded
    classes, class_of_box, class_sizes = labels.unique(return_inverse=True, return_counts=True)
    by_class = class_of_box.sort(stable=True).indices  # input indices, class-major
    rank = (
        torch.arange(num_boxes, device=device)
        - (class_sizes.cumsum(0) - class_sizes)[class_of_box[by_class]]
    )
    width = int(class_sizes.max())
    members = torch.full((len(classes), width), -1, dtype=torch.long, device=device)
    members[class_of_box[by_class], rank] = by_class
    padded = members.clamp(min=0)
    order, decayed, num_selected = _soft_nms_rows(
        shifted[padded], scores[padded], iou_threshold, min_score, width, class_sizes
    )
    selected = torch.arange(width, device=device) < num_selected[:, None]
    keep = members.gather(1, order)[selected]
    kept_scores = decayed[selected]
    # best first; ties in input order (mmcv's sort leaves their order unspecified)
    keep, input_order = keep.sort()
    kept_scores = kept_scores[input_order]
    best_first = kept_scores.sort(descending=True, stable=True).indices[:max_keep]
    return keep[best_first], kept_scores[best_first]


def _overlap_function(boxes: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """
    ``overlaps(chosen, columns)``: the IoU (R, K) of box ``chosen[r]`` (R,) of each row with
    boxes ``columns[r]`` (R, K) of that row, in the arithmetic of mmcv's CPU kernel (no +1 pixel
    offset): ``inter / (area_i + area_j - inter)``; 0/0 gives NaN, which never decays. Read from
    an (R, N, N) table where that is at most :data:`_IOU_TABLE_SIZE` values (fewer operations
    per step), else computed.
    """
    num_rows, num_boxes = boxes.shape[:2]
    rows = torch.arange(num_rows, device=boxes.device)
    x1, y1, x2, y2 = boxes.unbind(-1)  # (R, N)
    areas = (x2 - x1) * (y2 - y1)

    def iou(box_i: Callable[[Tensor], Tensor], box_j: Callable[[Tensor], Tensor]) -> Tensor:
        inter_w = (torch.min(box_i(x2), box_j(x2)) - torch.max(box_i(x1), box_j(x1))).clamp(min=0)
        inter_h = (torch.min(box_i(y2), box_j(y2)) - torch.max(box_i(y1), box_j(y1))).clamp(min=0)
        inter = inter_w * inter_h
        return inter / (box_i(areas) + box_j(areas) - inter)

    if num_rows * num_boxes * num_boxes <= _IOU_TABLE_SIZE:
        table = iou(lambda t: t[:, :, None], lambda t: t[:, None, :])  # (R, N, N)
        return lambda chosen, columns: table[rows, chosen].gather(1, columns)
    return lambda chosen, columns: iou(
        lambda t: t[rows, chosen][:, None], lambda t: t.gather(1, columns)
    )


def _soft_nms_rows(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float,
    min_score: float,
    max_keep: int,
    sizes: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """
    Linear soft-NMS as mmcv's CPU kernel, on R independent problems side by side.

    The kernel keeps the boxes in an array: at step ``s`` it swaps the first position holding
    the highest current score into position ``s``, decays the boxes after it by ``1 - IoU``
    where ``IoU >= iou_threshold`` (IoU ``inter / (area_i + area_j - inter)``; 0/0 is NaN and
    never decays), then discards those below ``min_score`` scanning forward, each discarded box
    replaced by the last remaining one (itself re-examined): so the j-th discarded position
    among the first ``num_kept`` is filled by the j-th kept box counted from the end.

    Args:
        boxes: (R, N, 4) xyxy.
        scores: (R, N).
        max_keep: boxes selected per problem at most.
        sizes: (R,) number of valid boxes of each row (the first ones); default: all N.
    Returns:
        order: (R, N) column indices of the boxes, in array order; the first ``num_selected``
            are the selected ones, in selection order.
        decayed: (R, N) their scores in that order.
        num_selected: (R,).
    """
    num_rows, num_boxes = scores.shape
    device, dtype = boxes.device, boxes.dtype
    rows = torch.arange(num_rows, device=device)
    positions = torch.arange(num_boxes, device=device)
    alive = torch.full((num_rows,), num_boxes, device=device) if sizes is None else sizes.clone()
    order = positions.repeat(num_rows, 1)
    current = scores.clone()
    overlaps = _overlap_function(boxes)
    # thresholds in the working precision, as the kernel compares in float32
    iou_threshold_t = torch.tensor(iou_threshold, dtype=dtype, device=device)
    min_score_t = torch.tensor(min_score, dtype=dtype, device=device)
    lowest = torch.tensor(float("-inf"), dtype=dtype, device=device)
    step = 0
    while step < max_keep:
        active = alive > step  # (R,)
        if not bool(active.any()):
            break
        # the first position holding the maximum, swapped into position `step`
        before_end = positions < alive[:, None]
        window = before_end & (positions >= step)
        best = torch.where(active, torch.where(window, current, lowest).argmax(dim=1), step)
        for state in (order, current):
            at_step, at_best = state[:, step].clone(), state[rows, best]
            state[:, step] = at_best
            state[rows, best] = at_step

        iou = overlaps(order[:, step], order)
        rest = window & (positions > step) & active[:, None]
        current = torch.where(rest & (iou >= iou_threshold_t), current * (1 - iou), current)

        dropped = rest & (current < min_score_t)
        if not bool(dropped.any()):  # nothing to discard: the array stays as it is
            step += 1
            continue
        kept = rest & ~dropped
        num_kept = kept.sum(dim=1)
        first_block = positions < (step + 1 + num_kept)[:, None]
        holes = dropped & first_block
        fillers = kept & ~first_block
        # the fillers' positions, last first, then -1s; the j-th hole takes the j-th of them
        fillers_last_first = torch.where(fillers, positions, -1).sort(dim=1, descending=True)[0]
        hole_rank = (holes.cumsum(1) - 1).clamp(min=0)
        source = torch.where(holes, fillers_last_first.gather(1, hole_rank), positions)
        order = order.gather(1, source)
        current = current.gather(1, source)
        alive = torch.where(active, step + 1 + num_kept, alive)
        step += 1
    return order, current, torch.clamp(alive, max=max_keep)
