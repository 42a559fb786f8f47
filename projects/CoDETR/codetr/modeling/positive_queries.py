"""
Customized positive queries (Co-DETR): the one-to-many positives of an auxiliary head become
an extra group of decoder queries, supervised with the head's own assignment.
"""
from typing import List

import torch
from torch import Tensor, nn

from codetr.layers import box_sine_embedding, box_xyxy_to_cxcywh, inverse_sigmoid

from .aux_heads.base import AssignedCoords
from .query_heads.base import ExtraQueries

__all__ = ["PositiveQueryBuilder"]


class PositiveQueryBuilder(nn.Module):
    """
    For auxiliary head k and a batch:

    * the number of queries per image is the batch maximum of positives, clamped to
      [min_queries, max_queries];
    * an image with more positives keeps a random subset; one with fewer is filled with random
      negatives of the same head, supervised as background;
    * boxes are normalised by each image's box normaliser and converted to cxcywh;
    * query content = LayerNorm_k(Linear_k(sine embedding of the box)) (one projection per
      head); the decoder derives the position embedding from the reference box.

    Args:
        num_heads: number of auxiliary heads (one projection each).
        embed_dim: decoder width C.
        num_classes: K; label K is background.
        min_queries, max_queries: bounds of the per-image query count (9 and 300 in the
            reference).
        loss_weight: lambda_1, the weight of the positive queries' losses.
    """

    def __init__(
        self,
        *,
        num_heads: int,
        embed_dim: int = 256,
        num_classes: int,
        min_queries: int = 9,
        max_queries: int = 300,
        loss_weight: float = 1.0,
    ):
        super().__init__()
        if not 0 < min_queries <= max_queries:
            raise ValueError(
                f"need 0 < min_queries <= max_queries, got {min_queries} and {max_queries}"
            )
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.min_queries = min_queries
        self.max_queries = max_queries
        self.loss_weight = loss_weight
        self.projections = nn.ModuleList(
            nn.Linear(2 * embed_dim, embed_dim) for _ in range(num_heads)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(embed_dim) for _ in range(num_heads))
        for projection in self.projections:
            nn.init.xavier_uniform_(projection.weight)

    def query_count(self, assignments: List[AssignedCoords]) -> int:
        """Queries per image for this batch."""
        most = max(int((a.labels < self.num_classes).sum()) for a in assignments)
        return min(max(most, self.min_queries), self.max_queries)

    def _select(self, labels: Tensor, count: int) -> Tensor:
        """Indices of ``count`` entries: positives first (a random subset if too many), then
        random negatives (drawn with replacement only when there are too few)."""
        positive = torch.nonzero(labels < self.num_classes).squeeze(1)
        negative = torch.nonzero(labels >= self.num_classes).squeeze(1)
        if len(positive) > count:
            return positive[torch.randperm(len(positive), device=labels.device)[:count]]
        shortfall = count - len(positive)
        if shortfall == 0:
            return positive
        if len(negative) >= shortfall:
            fill = negative[torch.randperm(len(negative), device=labels.device)[:shortfall]]
        elif len(negative) > 0:
            fill = negative[torch.randint(len(negative), (shortfall,), device=labels.device)]
        else:
            raise ValueError(
                "An auxiliary head assigned no background entry to an image, so its positive "
                "queries cannot be padded: the head must return negatives as well."
            )
        return torch.cat([positive, fill])

    def forward(
        self, head_index: int, assignments: List[AssignedCoords], box_normalizers: Tensor
    ) -> ExtraQueries:
        """
        Args:
            head_index: which auxiliary head (selects the projection).
            assignments: that head's per-image assignment.
            box_normalizers: (B, 4) per image (w, h, w, h) that boxes are normalised by.
        Returns:
            the positive queries of the batch: B x N queries with their targets.
        """
        count = self.query_count(assignments)
        boxes, target_labels, target_boxes = [], [], []
        for assignment, normalizer in zip(assignments, box_normalizers):
            index = self._select(assignment.labels, count)
            boxes.append(box_xyxy_to_cxcywh(assignment.boxes[index] / normalizer))
            target_boxes.append(box_xyxy_to_cxcywh(assignment.target_boxes[index] / normalizer))
            target_labels.append(assignment.labels[index])
        boxes = torch.stack(boxes).detach()
        # the reference clamps the box through an inverse sigmoid before embedding it
        embedding = box_sine_embedding(
            inverse_sigmoid(boxes).sigmoid(), num_pos_feats=self.embed_dim // 2, yx_first=False
        )
        content = self.norms[head_index](self.projections[head_index](embedding))
        return ExtraQueries(
            content=content,
            reference_boxes=boxes,
            target_labels=torch.stack(target_labels),
            target_boxes=torch.stack(target_boxes),
        )
