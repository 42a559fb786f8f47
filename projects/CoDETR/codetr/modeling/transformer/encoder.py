"""
The deformable transformer encoder: multi-scale deformable self-attention over the flattened
multi-level tokens, post-norm.
"""

from typing import Optional, Sequence, Tuple

from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from codetr.layers import MultiScaleDeformableAttention

from .feed_forward import FeedForward, dropout_or_identity
from .multi_level import MultiLevelSequence, encoder_reference_points

__all__ = ["DeformableEncoderLayer", "DeformableEncoder"]


class DeformableEncoderLayer(nn.Module):
    """self-attention (deformable) -> norm -> feed-forward -> norm."""

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
        self.self_attn = MultiScaleDeformableAttention(
            embed_dim=embed_dim, num_heads=num_heads, num_levels=num_levels, num_points=num_points
        )
        self.dropout = dropout_or_identity(dropout)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.ffn = FeedForward(embed_dim=embed_dim, hidden_dim=ffn_dim, dropout=dropout)
        self.norm2 = nn.LayerNorm(embed_dim)

    def forward(
        self,
        tokens: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        padding_mask: Optional[Tensor],
        level_shapes: Sequence[Tuple[int, int]],
    ) -> Tensor:
        """
        Args:
            tokens, pos: (B, S, C) features and their position embedding.
            reference_points: (B, S, L, 2).
            spatial_shapes, level_start_index, padding_mask, level_shapes: see ``multi_level``;
                checked by the caller (the encoder, once per forward).
        Returns:
            (B, S, C)
        """
        attended = self.self_attn(
            tokens + pos,
            tokens,
            reference_points,
            spatial_shapes,
            level_start_index,
            padding_mask,
            level_shapes=level_shapes,
        )
        tokens = self.norm1(tokens + self.dropout(attended))
        return self.norm2(tokens + self.ffn(tokens))


class DeformableEncoder(nn.Module):
    """
    A stack of :class:`DeformableEncoderLayer`. The first ``num_checkpointed_layers`` layers
    run under activation checkpointing in training (the reference ``with_cp``): their
    activations are recomputed in the backward pass instead of being stored.
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
        num_checkpointed_layers: int = 0,
    ):
        super().__init__()
        if not 0 <= num_checkpointed_layers <= num_layers:
            raise ValueError(
                f"num_checkpointed_layers={num_checkpointed_layers} must be in "
                f"[0, num_layers={num_layers}]"
            )
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(
                embed_dim=embed_dim,
                num_heads=num_heads,
                num_levels=num_levels,
                num_points=num_points,
                ffn_dim=ffn_dim,
                dropout=dropout,
            )
            for _ in range(num_layers)
        )
        self.num_checkpointed_layers = num_checkpointed_layers

    def forward(self, sequence: MultiLevelSequence, pos: Tensor) -> Tensor:
        """
        Args:
            sequence: the flattened neck features with their layout, checked here once
                (``check_layout``); its Python ``level_shapes`` go to every layer.
            pos: (B, S, C) position + level embedding of every token.
        Returns:
            memory: (B, S, C)
        """
        sequence.check_layout()
        reference_points = encoder_reference_points(sequence.level_shapes, sequence.valid_ratios)
        tokens = sequence.tokens
        args = (
            reference_points,
            sequence.spatial_shapes,
            sequence.level_start_index,
            sequence.padding_mask,
            sequence.level_shapes,
        )
        for index, layer in enumerate(self.layers):
            if self.training and index < self.num_checkpointed_layers:
                tokens = checkpoint(layer, tokens, pos, *args, use_reentrant=False)
            else:
                tokens = layer(tokens, pos, *args)
        return tokens
