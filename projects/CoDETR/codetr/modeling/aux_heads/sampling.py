"""
Matching and sampling of the R-CNN auxiliary head as the authors' mmdet code does them
(``MaxIoUAssigner`` and ``RandomSampler``), on detectron2's :class:`Matcher` and its label
conventions. :func:`build_rcnn_aux_head` uses them unless told to keep detectron2's.
"""

from typing import List, Tuple

import torch
from detectron2.modeling.matcher import Matcher
from torch import Tensor

from codetr.modeling.random_draws import random_draws

__all__ = ["LowQualityMatcher", "sample_in_order"]


class LowQualityMatcher(Matcher):
    """
    A :class:`Matcher` whose low-quality matches follow mmdet's ``MaxIoUAssigner``: for every
    ground truth whose highest IoU reaches ``min_low_quality_iou``, the predictions at that IoU
    become positive *and matched to that ground truth*, the later ground truth winning when a
    prediction is the best of several. detectron2's own rule accepts any IoU and keeps each
    prediction matched to its highest-IoU ground truth.
    """

    def __init__(self, thresholds: List[float], labels: List[int], *, min_low_quality_iou: float):
        """
        Args:
            thresholds, labels: as :class:`Matcher`.
            min_low_quality_iou: the IoU a ground truth's best predictions need to be matched to
                it by the low-quality rule (mmdet's ``min_pos_iou``).
        """
        super().__init__(thresholds, labels, allow_low_quality_matches=False)
        self.min_low_quality_iou = min_low_quality_iou

    def __call__(self, match_quality_matrix: Tensor) -> Tuple[Tensor, Tensor]:
        """
        Args:
            match_quality_matrix: (G, N) IoU of G ground-truth boxes and N predictions.

        Returns:
            matches (N,) int64 and match_labels (N,) int8, as :class:`Matcher`.
        """
        matches, match_labels = super().__call__(match_quality_matrix)
        if match_quality_matrix.numel() == 0:
            return matches, match_labels
        highest = match_quality_matrix.max(dim=1, keepdim=True).values  # (G, 1)
        best = (match_quality_matrix == highest) & (highest >= self.min_low_quality_iou)
        # the last ground truth for which the prediction is among the best (1-based, 0: none)
        numbers = torch.arange(1, best.shape[0] + 1, dtype=torch.int32, device=best.device)
        last = (best.int() * numbers[:, None]).max(dim=0).values.long() - 1
        low_quality = last >= 0
        matches = torch.where(low_quality, last, matches)
        match_labels[low_quality] = 1
        return matches, match_labels


def sample_in_order(
    labels: Tensor, num_samples: int, positive_fraction: float, bg_label: int, purpose: str
) -> Tuple[Tensor, Tensor]:
    """
    Positive and negative indices as mmdet's ``RandomSampler``: up to
    ``int(num_samples * positive_fraction)`` positives, negatives to fill ``num_samples``; a
    random subset is drawn (a permutation from :func:`random_draws`, purposes
    ``"{purpose}.positive"`` / ``"{purpose}.negative"``) only where there are more candidates
    than wanted, and the indices are returned in increasing order. detectron2's
    ``subsample_labels`` permutes every time and keeps the drawn order.

    Args:
        labels: (N,) -1 ignored, ``bg_label`` negative, anything else positive.

    Returns:
        positive and negative indices, each (n,) int64, increasing.
    """
    positive = torch.nonzero((labels != -1) & (labels != bg_label)).squeeze(1)
    negative = torch.nonzero(labels == bg_label).squeeze(1)
    positive = _subset(positive, int(num_samples * positive_fraction), f"{purpose}.positive")
    negative = _subset(negative, num_samples - positive.numel(), f"{purpose}.negative")
    return positive, negative


def _subset(indices: Tensor, wanted: int, purpose: str) -> Tensor:
    if indices.numel() <= wanted:
        return indices
    chosen = random_draws().permutation(purpose, indices.numel(), indices.device)[:wanted]
    return indices[chosen].sort().values
