"""
Customized positive queries (Co-DETR): the one-to-many positives of an auxiliary head become
an extra group of decoder queries, supervised with the head's own assignment.

:class:`PositiveQueryBuilder` picks, for auxiliary head k and a batch:

* as many queries per image as the batch maximum of positives, clamped to
  [min_queries, max_queries];
* all positives of an image, or a random subset when it has more; a shortfall is filled with
  random negatives of the same head, supervised as background;
* boxes normalised by each image's box normaliser, in cxcywh.

Its subclasses form the queries the way each query head expects them.
"""

from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from torchvision.ops import box_convert

from codetr.layers import box_sine_embedding, inverse_sigmoid

from .aux_heads.base import AssignedCoords
from .query_group import QueryGroup
from .random_draws import random_draws

__all__ = ["PositiveQueryBuilder", "DINOPositiveQueryBuilder", "DeformablePositiveQueryBuilder"]


class PositiveQueryBuilder(nn.Module):
    """
    Args:
        num_heads: number of auxiliary heads (one set of projections each).
        embed_dim: decoder width C.
        num_classes: K; label K is background.
        min_queries, max_queries: bounds of the per-image query count (9 and 300 in the
            reference).

    The meta-architecture gives ``num_heads``, ``embed_dim`` and ``num_classes`` (from its
    auxiliary heads, neck and query head) and weighs the losses (lambda_1).
    """

    # whether the queries use a feature per box (AssignedCoords.features, or the auxiliary
    # heads' input at each anchor's location)
    uses_features = False

    def __init__(
        self,
        *,
        num_heads: int,
        embed_dim: int,
        num_classes: int,
        min_queries: int = 9,
        max_queries: int = 300,
    ):
        super().__init__()
        if not 0 < min_queries <= max_queries:
            raise ValueError(
                f"need 0 < min_queries <= max_queries, got {min_queries} and {max_queries}"
            )
        self.num_heads = num_heads
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.min_queries = min_queries
        self.max_queries = max_queries

    def query_count(self, assignments: List[AssignedCoords]) -> int:
        """Queries per image for this batch."""
        most = max(int((a.labels < self.num_classes).sum()) for a in assignments)
        return min(max(most, self.min_queries), self.max_queries)

    def _select(self, labels: Tensor, count: int) -> Tensor:
        """Indices of ``count`` entries: positives first (a random subset if too many), then
        random negatives (drawn with replacement only when there are too few)."""
        positive = torch.nonzero(labels < self.num_classes).squeeze(1)
        negative = torch.nonzero(labels >= self.num_classes).squeeze(1)
        draws, device = random_draws(), labels.device
        if len(positive) > count:
            return positive[
                draws.permutation("positive_queries.positive", len(positive), device)[:count]
            ]
        shortfall = count - len(positive)
        if shortfall == 0:
            return positive
        if len(negative) >= shortfall:
            order = draws.permutation("positive_queries.negative", len(negative), device)
            fill = negative[order[:shortfall]]
        elif len(negative) > 0:
            fill = negative[
                draws.integers("positive_queries.negative", len(negative), (shortfall,), device)
            ]
        else:
            raise ValueError(
                "An auxiliary head assigned no background entry to an image, so its positive "
                "queries cannot be padded: the head must return negatives as well."
            )
        return torch.cat([positive, fill])

    @staticmethod
    def _features(
        assignment: AssignedCoords, index: Tensor, image: int, aux_features: Dict[str, Tensor]
    ) -> Tensor:
        """(N, C) feature of the selected boxes: the head's own (RoI features), else the
        auxiliary input at the box's location (dense heads list their anchors location by
        location, level after level)."""
        if assignment.features is not None:
            return assignment.features[index]
        locations = torch.cat([x[image].flatten(1) for x in aux_features.values()], 1).t()
        anchors_per_location = len(assignment.boxes) // len(locations)
        return locations[torch.div(index, anchors_per_location, rounding_mode="floor")]

    def forward(
        self,
        head_index: int,
        assignments: List[AssignedCoords],
        box_normalizers: Tensor,
        aux_features: Dict[str, Tensor],
    ) -> QueryGroup:
        """
        Args:
            head_index: which auxiliary head (selects the projections).
            assignments: that head's per-image assignment.
            box_normalizers: (B, 4) per image (w, h, w, h) that boxes are normalised by.
            aux_features: the auxiliary heads' input maps (B, C, H_l, W_l) by level name.
        Returns:
            the positive queries of the batch: B x N queries with their targets.
        """
        count = self.query_count(assignments)
        boxes, target_labels, target_boxes, features = [], [], [], []
        for image, (assignment, normalizer) in enumerate(zip(assignments, box_normalizers)):
            index = self._select(assignment.labels, count)
            boxes.append(box_convert(assignment.boxes[index] / normalizer, "xyxy", "cxcywh"))
            target_boxes.append(
                box_convert(assignment.target_boxes[index] / normalizer, "xyxy", "cxcywh")
            )
            target_labels.append(assignment.labels[index])
            if self.uses_features:
                features.append(self._features(assignment, index, image, aux_features))
        boxes = torch.stack(boxes).detach()
        content, query_pos = self.queries(
            head_index, boxes, torch.stack(features) if features else None
        )
        return QueryGroup(
            content=content,
            reference_boxes=boxes,
            query_pos=query_pos,
            target_labels=torch.stack(target_labels),
            target_boxes=torch.stack(target_boxes),
            box_normalizers=box_normalizers,
        )

    def box_embedding(self, boxes: Tensor) -> Tensor:
        """(B, N, 4) -> (B, N, 2C) sine embedding in (x, y, w, h) order; the reference clamps
        the box through an inverse sigmoid first."""
        return box_sine_embedding(
            inverse_sigmoid(boxes).sigmoid(), num_pos_feats=self.embed_dim // 2, yx_first=False
        )

    def queries(self, head_index: int, boxes: Tensor, features: Optional[Tensor]):
        """Returns (content (B, N, C), query_pos (B, N, C) or None)."""
        raise NotImplementedError


class DINOPositiveQueryBuilder(PositiveQueryBuilder):
    """Co-DINO: content = LayerNorm_k(Linear_k(sine embedding of the box)), 2C -> C; the
    decoder derives the position embedding from the reference box."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        dim = self.embed_dim
        self.projections = nn.ModuleList(nn.Linear(2 * dim, dim) for _ in range(self.num_heads))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(self.num_heads))
        for projection in self.projections:
            nn.init.xavier_uniform_(projection.weight)

    def queries(self, head_index, boxes, features):
        return self.norms[head_index](self.projections[head_index](self.box_embedding(boxes))), None


class DeformablePositiveQueryBuilder(PositiveQueryBuilder):
    """
    Co-Deformable-DETR: LayerNorm_k(Linear_k(sine embedding)), 2C -> 2C, split into position
    embedding and content; the content adds LayerNorm_k(Linear_k(feature of the box)); the
    position adds a learned per-head embedding.

    Args:
        head_embed_dim: width of the per-head position embedding, broadcast over C. The
            reference R50 model has 1 (a scalar per head, kept "for reproducing" its results);
            use C for a per-channel embedding.
    """

    uses_features = True

    def __init__(self, *, head_embed_dim: int = 1, **kwargs):
        super().__init__(**kwargs)
        dim, heads = self.embed_dim, self.num_heads
        if head_embed_dim not in (1, dim):
            raise ValueError(f"head_embed_dim must be 1 or embed_dim={dim}, got {head_embed_dim}")
        self.projections = nn.ModuleList(nn.Linear(2 * dim, 2 * dim) for _ in range(heads))
        self.norms = nn.ModuleList(nn.LayerNorm(2 * dim) for _ in range(heads))
        self.feature_projections = nn.ModuleList(nn.Linear(dim, dim) for _ in range(heads))
        self.feature_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(heads))
        self.head_pos_embed = nn.Parameter(torch.empty(heads, head_embed_dim))
        # the reference initialises every matrix of its transformer, these included, uniformly
        for weight in [
            *(p.weight for p in self.projections),
            *(p.weight for p in self.feature_projections),
            self.head_pos_embed,
        ]:
            nn.init.xavier_uniform_(weight)

    def queries(self, head_index, boxes, features):
        embedding = self.norms[head_index](self.projections[head_index](self.box_embedding(boxes)))
        query_pos, content = embedding.split(self.embed_dim, dim=-1)
        content = content + self.feature_norms[head_index](
            self.feature_projections[head_index](features)
        )
        return content, query_pos + self.head_pos_embed[head_index]
