"""
The deformable transformer decoder with iterative box refinement.

Each layer: self-attention among the queries -> norm -> deformable cross-attention into the
encoder memory -> norm -> feed-forward -> norm. After each layer the layer's box head refines
the reference boxes; the refined boxes (detached) are the next layer's references.

Any group of queries can be decoded: the matching queries (with denoising queries in front,
separated by a self-attention mask) or extra groups such as Co-DETR's customized positive
queries. The decoder owns no query content; callers give content, reference boxes and,
optionally, position embeddings.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from codetr.layers import MLP, MultiScaleDeformableAttention, box_sine_embedding, inverse_sigmoid

from .feed_forward import FeedForward, dropout_or_identity
from .multi_level import MultiLevelSequence

__all__ = ["DeformableDecoderLayer", "DeformableDecoder"]


class DeformableDecoderLayer(nn.Module):
    def __init__(
        self,
        *,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(
            embed_dim, num_heads, dropout=dropout, batch_first=True
        )
        self.dropout1 = dropout_or_identity(dropout)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.cross_attn = MultiScaleDeformableAttention(
            embed_dim=embed_dim, num_heads=num_heads, num_levels=num_levels, num_points=num_points
        )
        self.dropout2 = dropout_or_identity(dropout)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.ffn = FeedForward(embed_dim=embed_dim, hidden_dim=ffn_dim, dropout=dropout)
        self.norm3 = nn.LayerNorm(embed_dim)

    def forward(
        self,
        query: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: MultiLevelSequence,
        self_attn_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Args:
            query, query_pos: (B, Q, C) content and position embedding.
            reference_points: (B, Q, L, 4) reference boxes scaled to each level's valid area.
            memory: the encoder memory; its ``level_shapes`` are taken as checked (the decoder
                checks them once per forward).
            self_attn_mask: (Q, Q) bool, True where attention is NOT allowed.
        Returns:
            (B, Q, C)
        """
        q = query + query_pos
        attended = self.self_attn(q, q, query, attn_mask=self_attn_mask, need_weights=False)[0]
        query = self.norm1(query + self.dropout1(attended))
        attended = self.cross_attn(
            query + query_pos,
            memory.tokens,
            reference_points,
            memory.spatial_shapes,
            memory.level_start_index,
            memory.padding_mask,
            level_shapes=memory.level_shapes,
        )
        query = self.norm2(query + self.dropout2(attended))
        return self.norm3(query + self.ffn(query))


class DeformableDecoder(nn.Module):
    """
    Args:
        num_layers, embed_dim, num_heads, num_levels, num_points, ffn_dim, dropout: layer sizes.
        query_pos_from_boxes: DINO: every layer's query position embedding is an MLP
            (``ref_point_head``) of the sine embedding of its reference box. Otherwise the
            caller gives the position embedding.
        output_norm: DINO: a LayerNorm on every layer's output before the prediction heads.
        look_forward_twice: a layer's box prediction refines the previous layer's refined box
            with its gradient kept (the box itself still enters the next layer detached).
        inverse_sigmoid_eps: clamp of the inverse sigmoid of reference boxes (1e-3 in DINO,
            1e-5 in Deformable-DETR).
    """

    def __init__(
        self,
        *,
        num_layers: int = 6,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        query_pos_from_boxes: bool = True,
        output_norm: bool = True,
        look_forward_twice: bool = True,
        inverse_sigmoid_eps: float = 1e-3,
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            DeformableDecoderLayer(
                embed_dim=embed_dim,
                num_heads=num_heads,
                num_levels=num_levels,
                num_points=num_points,
                ffn_dim=ffn_dim,
                dropout=dropout,
            )
            for _ in range(num_layers)
        )
        self.embed_dim = embed_dim
        self.ref_point_head = (
            MLP(input_dim=2 * embed_dim, hidden_dim=embed_dim, output_dim=embed_dim, num_layers=2)
            if query_pos_from_boxes
            else None
        )
        self.norm = nn.LayerNorm(embed_dim) if output_norm else nn.Identity()
        self.look_forward_twice = look_forward_twice
        self.inverse_sigmoid_eps = inverse_sigmoid_eps

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def forward(
        self,
        query: Tensor,
        reference_boxes: Tensor,
        memory: MultiLevelSequence,
        box_heads: nn.ModuleList,
        query_pos: Optional[Tensor] = None,
        self_attn_mask: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        """
        Args:
            query: (B, Q, C) query content.
            reference_boxes: (B, Q, 4) initial reference boxes, normalised cxcywh in [0, 1].
            memory: the encoder memory with its layout, checked here once (``check_layout``)
                for all layers.
            box_heads: per layer a module (B, Q, C) -> (B, Q, 4) box delta in logit space.
            query_pos: (B, Q, C); required unless ``query_pos_from_boxes``.
            self_attn_mask: (Q, Q) bool, True where attention is NOT allowed.
        Returns:
            hidden: (num_layers, B, Q, C) every layer's (normalised) output.
            boxes: (num_layers, B, Q, 4) every layer's predicted boxes, normalised cxcywh.
        """
        if self.ref_point_head is None and query_pos is None:
            raise ValueError("DeformableDecoder needs query_pos when query_pos_from_boxes=False")
        memory.check_layout()
        valid_ratios = torch.cat([memory.valid_ratios, memory.valid_ratios], -1)[:, None]
        reference = reference_boxes
        # the box a layer's prediction refines; differs from `reference` in keeping the
        # gradient of the previous layer's refinement under look-forward-twice
        prediction_reference = reference_boxes
        hidden, boxes = [], []
        for layer, box_head in zip(self.layers, box_heads):
            reference_points = reference[:, :, None] * valid_ratios
            if self.ref_point_head is not None:
                query_pos = self.ref_point_head(
                    box_sine_embedding(
                        reference_points[:, :, 0],
                        num_pos_feats=self.embed_dim // 2,
                        yx_first=True,
                    )
                )
            query = layer(query, query_pos, reference_points, memory, self_attn_mask)

            delta = box_head(query)
            refined = (delta + inverse_sigmoid(reference, eps=self.inverse_sigmoid_eps)).sigmoid()
            output = self.norm(query)
            # without an output norm the prediction uses the same delta
            output_delta = delta if output is query else box_head(output)
            hidden.append(output)
            boxes.append(
                (
                    output_delta
                    + inverse_sigmoid(prediction_reference, eps=self.inverse_sigmoid_eps)
                ).sigmoid()
            )
            reference = refined.detach()
            prediction_reference = refined if self.look_forward_twice else reference
        return torch.stack(hidden), torch.stack(boxes)
