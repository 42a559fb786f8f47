"""
Class-aware linear soft-NMS as a bounded, vectorised loop for exported graphs.

:func:`soft_nms_padded` computes what :func:`codetr.layers.batched_soft_nms` computes (mmcv
1.5.0's ``batched_nms`` with ``soft_nms``, below its split threshold) on a batch of
independent problems of N candidates each, and returns padded tensors instead of per-problem
lists. Under ``torch.jit.trace`` (and so in the TorchScript-based ``torch.onnx.export``) it
runs as a TorchScript function, compiled on first use, so that its loop stays a loop
(``prim::Loop``, an ONNX ``Loop``) of at most ``min(max_keep, N)`` iterations, one selected box
each, that stops as soon as no problem has a box left to select; otherwise the same code runs in
Python. The IoUs of all pairs are computed once, (R, N, N) values (N = 900: 3 MB per problem).

The arithmetic and the order of the boxes are those of ``_soft_nms_rows`` (the kernel's array:
swap of the first maximum into place, decay by ``1 - IoU`` from the threshold, discarded boxes
replaced by the last remaining ones), written without in-place indexing so that every step is
a handful of ``Where`` / ``GatherElements`` / ``TopK`` / ``CumSum`` nodes: the kept boxes, their
order and their decayed scores are bitwise those of ``batched_soft_nms`` for float32 input.
"""

import warnings
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["soft_nms_padded"]


def _iou_table(boxes: Tensor) -> Tensor:
    """(R, N, N) IoU of every pair of (R, N, 4) xyxy boxes, in mmcv's CPU arithmetic (no +1
    offset, ``inter / (area_i + area_j - inter)``; 0/0 is NaN and never decays)."""
    x1, y1, x2, y2 = boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]
    areas = (x2 - x1) * (y2 - y1)
    inter_w = (
        torch.min(x2[:, :, None], x2[:, None, :]) - torch.max(x1[:, :, None], x1[:, None, :])
    ).clamp(min=0)
    inter_h = (
        torch.min(y2[:, :, None], y2[:, None, :]) - torch.max(y1[:, :, None], y1[:, None, :])
    ).clamp(min=0)
    inter = inter_w * inter_h
    return inter / (areas[:, :, None] + areas[:, None, :] - inter)


def soft_nms_padded(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    *,
    iou_threshold: float,
    min_score: float = 1e-3,
    max_keep: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """
    Linear soft-NMS within each class on R independent problems side by side.

    Args:
        boxes: (R, N, 4) xyxy boxes of every problem (float32 for results bitwise equal to
            :func:`~codetr.layers.batched_soft_nms`).
        scores: (R, N) scores.
        labels: (R, N) integer class labels; classes are separated as in mmcv, by shifting the
            boxes of class c by ``c * (max of the problem's boxes + 1)``.
        iou_threshold: IoU from which a box's score decays.
        min_score: boxes whose decayed score falls below this are discarded.
        max_keep: boxes selected per problem at most.

    Returns:
        keep: (R, K) long, K = min(max_keep, N): per problem the indices of the selected boxes
            in selection order (non-increasing decayed score), then padding (0).
        kept_scores: (R, K) their decayed scores, then padding (0).
        num_kept: (R,) long, how many of the K are selected boxes.
        Row r equals ``batched_soft_nms(boxes[r], scores[r], labels[r], ...)`` padded to K.
    """
    if boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape (R, N, 4), got {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:2] or labels.shape != boxes.shape[:2]:
        raise ValueError(
            f"scores and labels must have shape {tuple(boxes.shape[:2])}, "
            f"got {tuple(scores.shape)} and {tuple(labels.shape)}"
        )
    if max_keep < 1:
        raise ValueError(f"max_keep must be positive, got {max_keep}")
    function = _scripted() if torch.jit.is_tracing() else _soft_nms_padded
    return function(boxes, scores, labels, float(iou_threshold), float(min_score), int(max_keep))


_SCRIPTED: Optional[Callable] = None


def _scripted() -> Callable:
    """:func:`_soft_nms_padded` compiled by ``torch.jit.script`` (once)."""
    global _SCRIPTED
    if _SCRIPTED is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation
            _SCRIPTED = torch.jit.script(_soft_nms_padded)
    return _SCRIPTED


def _soft_nms_padded(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    iou_threshold: float,
    min_score: float,
    max_keep: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`soft_nms_padded` without checks; TorchScript-compatible."""
    num_rows = scores.shape[0]
    num_boxes = scores.shape[1]
    dtype = boxes.dtype
    device = boxes.device
    max_steps = min(max_keep, num_boxes)
    offsets = labels.to(dtype) * (boxes.flatten(1).max(dim=1)[0] + 1.0)[:, None]
    table = _iou_table(boxes + offsets[:, :, None])
    positions = torch.arange(num_boxes, device=device)
    lowest = torch.full((1, 1), float("-inf"), dtype=dtype, device=device)
    # thresholds in the working precision, as the kernel compares in float32
    threshold = torch.full((1, 1), iou_threshold, dtype=dtype, device=device)
    floor = torch.full((1, 1), min_score, dtype=dtype, device=device)
    order = positions[None, :].expand(num_rows, num_boxes)
    current = scores.to(dtype)
    alive = torch.full((num_rows,), num_boxes, dtype=torch.long, device=device)
    step = 0
    # inside the loop step < max_keep: a problem is active while it has boxes left
    active = alive > step
    while step < max_steps and bool(active.any()):
        # the first position holding the maximum, swapped into position `step`
        window = (positions[None, :] < alive[:, None]) & (positions[None, :] >= step)
        best = torch.where(window, current, lowest).argmax(dim=1)
        best = torch.where(active, best, torch.full_like(best, step))
        at_step = positions[None, :] == step
        at_best = positions[None, :] == best[:, None]
        best_order = order.gather(1, best[:, None])
        best_score = current.gather(1, best[:, None])
        order = torch.where(
            at_step, best_order, torch.where(at_best, order[:, step : step + 1], order)
        )
        current = torch.where(
            at_step, best_score, torch.where(at_best, current[:, step : step + 1], current)
        )

        # IoU of the selected box with the box at every position
        chosen = order[:, step : step + 1]
        iou = table.gather(1, chosen[:, :, None].expand(num_rows, 1, num_boxes))[:, 0]
        iou = iou.gather(1, order)
        rest = window & (positions[None, :] > step) & active[:, None]
        current = torch.where(rest & (iou >= threshold), current * (1 - iou), current)

        # discard below min_score: the j-th hole among the first num_kept positions takes the
        # j-th kept box counted from the end
        dropped = rest & (current < floor)
        kept = rest & ~dropped
        num_kept = kept.long().sum(dim=1)
        first_block = positions[None, :] < (step + 1 + num_kept)[:, None]
        holes = dropped & first_block
        fillers = kept & ~first_block
        fillers_last_first = torch.where(fillers, positions[None, :], -1).sort(
            dim=1, descending=True
        )[0]
        hole_rank = (holes.long().cumsum(dim=1) - 1).clamp(min=0)
        source = torch.where(holes, fillers_last_first.gather(1, hole_rank), positions[None, :])
        order = order.gather(1, source)
        current = current.gather(1, source)
        alive = torch.where(active, step + 1 + num_kept, alive)
        step += 1
        active = alive > step
    num_kept = alive.clamp(max=max_keep)
    selected = positions[None, :max_steps] < num_kept[:, None]
    keep = torch.where(selected, order[:, :max_steps], 0)
    kept_scores = torch.where(selected, current[:, :max_steps], 0.0)
    return keep, kept_scores, num_kept
