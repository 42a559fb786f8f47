"""The inverse sigmoid used for iterative box refinement.

Box conversions come from ``torchvision.ops.box_convert`` and pairwise IoU / GIoU from
:mod:`torchvision.ops` (``box_iou``, ``generalized_box_iou``).
"""

import torch
from torch import Tensor

__all__ = ["inverse_sigmoid"]


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
