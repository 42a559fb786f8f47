"""Box format conversions and the inverse sigmoid used for iterative box refinement.

Pairwise IoU / GIoU come from :mod:`torchvision.ops` (``box_iou``, ``generalized_box_iou``).
"""

import torch
from torch import Tensor

__all__ = ["box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh", "inverse_sigmoid"]


def _check_box_dim(boxes: Tensor) -> None:
    if boxes.shape[-1:] != (4,):
        raise ValueError(
            f"boxes must have a last dimension of size 4, got shape {tuple(boxes.shape)}"
        )


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """
    Args:
        boxes: (..., 4) boxes as (center x, center y, width, height).

    Returns:
        (..., 4) boxes as (x1, y1, x2, y2).
    """
    _check_box_dim(boxes)
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """
    Args:
        boxes: (..., 4) boxes as (x1, y1, x2, y2).

    Returns:
        (..., 4) boxes as (center x, center y, width, height).
    """
    _check_box_dim(boxes)
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """
    Numerically safe logit: ``x`` is clamped to [0, 1], then the numerator ``x`` and the
    denominator ``1 - x`` are each clamped from below by ``eps`` before taking the log ratio.

    Args:
        x: tensor of any shape, nominally in [0, 1].
        eps: lower bound of numerator and denominator; the output lies in
            [log(eps), -log(eps)].

    Returns:
        Tensor of the same shape as ``x``.
    """
    x = x.clamp(min=0, max=1)
    numerator = x.clamp(min=eps)
    denominator = (1 - x).clamp(min=eps)
    return torch.log(numerator / denominator)
