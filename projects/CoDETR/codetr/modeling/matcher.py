"""
One-to-one (Hungarian) matching between the queries of one image and its ground-truth boxes.

The matching cost is the one of Co-DETR's DETR-style heads: a focal-loss-shaped
classification cost, an L1 cost on normalised (cx, cy, w, h) boxes and a negative
generalized-IoU cost, each multiplied by its weight and summed.
"""

from typing import Dict, List, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou

__all__ = ["HungarianMatcher", "hungarian_targets"]


class HungarianMatcher(nn.Module):
    """
    Finds the assignment of ground-truth boxes to queries with the lowest total cost.

    For query q and ground truth g of class c, with p = sigmoid(logits[q, c]):

    * class cost: ``alpha * (1 - p)^gamma * -log(p + 1e-12)
      - (1 - alpha) * p^gamma * -log(1 - p + 1e-12)``,
    * L1 cost: L1 distance between the normalised (cx, cy, w, h) boxes,
    * GIoU cost: ``-GIoU`` of the two boxes in (x1, y1, x2, y2).

    Each image is matched on its own; callers loop over the images of a batch.
    """

    def __init__(
        self,
        *,
        class_weight: float = 2.0,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        """
        Args:
            class_weight: weight of the focal classification cost.
            l1_weight: weight of the L1 cost on normalised (cx, cy, w, h) boxes.
            giou_weight: weight of the negative generalized-IoU cost.
            focal_alpha: alpha of the focal classification cost.
            focal_gamma: gamma of the focal classification cost.
        """
        super().__init__()
        self.class_weight = class_weight
        self.l1_weight = l1_weight
        self.giou_weight = giou_weight
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def cost_matrix(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        gt_labels: torch.Tensor,
        gt_boxes: torch.Tensor,
    ) -> torch.Tensor:
        """
        Args:
            logits, boxes, gt_labels, gt_boxes: as in :meth:`forward`.

        Returns:
            (Q, G) float32 matching cost of every (query, ground truth) pair.
        """
        logits, boxes, gt_boxes = logits.float(), boxes.float(), gt_boxes.float()
        eps = 1e-12
        prob = logits.sigmoid()[:, gt_labels]
        positive_cost = -(prob + eps).log() * self.focal_alpha * (1 - prob).pow(self.focal_gamma)
        negative_cost = (
            -(1 - prob + eps).log() * (1 - self.focal_alpha) * prob.pow(self.focal_gamma)
        )
        l1_cost = torch.cdist(boxes, gt_boxes, p=1)
        # GIoU is invariant to scaling each axis (all areas scale by the same factor), so the
        # cost on normalised boxes equals the cost the authors compute on pixel boxes.
        giou_cost = -generalized_box_iou(
            box_convert(boxes, "cxcywh", "xyxy"), box_convert(gt_boxes, "cxcywh", "xyxy")
        )
        return (
            self.class_weight * (positive_cost - negative_cost)
            + self.l1_weight * l1_cost
            + self.giou_weight * giou_cost
        )

    @torch.no_grad()
    def forward(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        gt_labels: torch.Tensor,
        gt_boxes: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            logits: (Q, K) classification logits of the queries of one image.
            boxes: (Q, 4) predicted boxes, normalised (cx, cy, w, h).
            gt_labels: (G,) int64 class indices in [0, K).
            gt_boxes: (G, 4) ground-truth boxes, normalised (cx, cy, w, h).

        Returns:
            query_indices, gt_indices: int64 tensors of length min(Q, G) on the device of
            ``logits``; query ``query_indices[i]`` is matched to ground truth ``gt_indices[i]``.
            ``query_indices`` is sorted in increasing order.
        """
        if logits.dim() != 2:
            raise ValueError(f"logits must have shape (Q, K), got {tuple(logits.shape)}")
        num_queries = logits.shape[0]
        if boxes.shape != (num_queries, 4):
            raise ValueError(f"boxes must have shape ({num_queries}, 4), got {tuple(boxes.shape)}")
        if gt_labels.dim() != 1 or gt_boxes.shape != (gt_labels.shape[0], 4):
            raise ValueError(
                "gt_labels must have shape (G,) and gt_boxes (G, 4), got "
                f"{tuple(gt_labels.shape)} and {tuple(gt_boxes.shape)}"
            )
        if gt_labels.shape[0] == 0 or num_queries == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=logits.device)
            return empty, empty.clone()

        cost = self.cost_matrix(logits, boxes, gt_labels, gt_boxes)
        query_indices, gt_indices = linear_sum_assignment(cost.cpu().numpy())
        return (
            torch.as_tensor(query_indices, dtype=torch.int64, device=logits.device),
            torch.as_tensor(gt_indices, dtype=torch.int64, device=logits.device),
        )


def hungarian_targets(
    matcher: HungarianMatcher,
    logits: torch.Tensor,
    boxes: torch.Tensor,
    targets: List[Dict[str, torch.Tensor]],
    num_classes: int,
) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """
    Matches every image's queries to its ground truth and writes dense per-query targets.

    Args:
        matcher: the one-to-one matcher.
        logits: (B, Q, K) classification logits.
        boxes: (B, Q, 4) predicted boxes, normalised (cx, cy, w, h).
        targets: B dicts with "labels" (G,) int64 and "boxes" (G, 4) normalised (cx, cy, w, h).
        num_classes: K; the label of unmatched queries.

    Returns:
        target_labels: (B, Q) int64, the matched ground-truth label or K.
        target_boxes: (B, Q, 4), the matched ground-truth box or zeros.
        num_matched: number of matched queries in the batch (before averaging across workers).
    """
    if logits.dim() != 3 or len(targets) != logits.shape[0]:
        raise ValueError(
            f"expected logits (B, Q, K) and B targets, got {tuple(logits.shape)} and "
            f"{len(targets)} targets"
        )
    batch_size, num_queries = logits.shape[:2]
    target_labels = torch.full(
        (batch_size, num_queries), num_classes, dtype=torch.int64, device=logits.device
    )
    target_boxes = boxes.new_zeros(batch_size, num_queries, 4)
    num_matched = 0
    for image_index, target in enumerate(targets):
        gt_labels, gt_boxes = target["labels"], target["boxes"]
        query_indices, gt_indices = matcher(
            logits[image_index], boxes[image_index], gt_labels, gt_boxes
        )
        target_labels[image_index, query_indices] = gt_labels[gt_indices]
        target_boxes[image_index, query_indices] = gt_boxes[gt_indices].to(target_boxes.dtype)
        num_matched += len(query_indices)
    return target_labels, target_boxes, num_matched
