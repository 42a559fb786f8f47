"""
A group of decoder queries with fixed targets: DINO's denoising queries and Co-DETR's
customized positive queries. The query head decodes such a group through its shared decoder and
prediction heads and supervises every decoder layer with the group's own targets (no matching).
"""

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

__all__ = ["QueryGroup"]


@dataclass(eq=False)
class QueryGroup:
    """
    N queries per image with their per-query targets.

    Attributes:
        content: (B, N, C) query content.
        reference_boxes: (B, N, 4) normalised cxcywh initial reference boxes.
        target_labels: (B, N) int64, num_classes for background.
        target_boxes: (B, N, 4) normalised cxcywh (ignored for background).
        box_normalizers: (B, 4) per image (w, h, w, h) the boxes are normalised by.
        query_pos: (B, N, C) position embedding, or None where the decoder derives it from the
            reference boxes (DINO).
        self_attn_mask: (N + Q, N + Q) bool, True where attention is NOT allowed, for a group
            decoded ahead of the Q matching queries (denoising); None for a group decoded on
            its own.
    """

    content: Tensor
    reference_boxes: Tensor
    target_labels: Tensor
    target_boxes: Tensor
    box_normalizers: Tensor
    query_pos: Optional[Tensor]
    self_attn_mask: Optional[Tensor]

    # keyword-only (dataclass(kw_only=True) needs Python 3.10)
    def __init__(
        self,
        *,
        content: Tensor,
        reference_boxes: Tensor,
        target_labels: Tensor,
        target_boxes: Tensor,
        box_normalizers: Tensor,
        query_pos: Optional[Tensor] = None,
        self_attn_mask: Optional[Tensor] = None,
    ):
        self.content = content
        self.reference_boxes = reference_boxes
        self.target_labels = target_labels
        self.target_boxes = target_boxes
        self.box_normalizers = box_normalizers
        self.query_pos = query_pos
        self.self_attn_mask = self_attn_mask

    @property
    def num_queries(self) -> int:
        """N."""
        return self.content.shape[1]
