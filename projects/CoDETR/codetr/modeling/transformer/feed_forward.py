from torch import Tensor, nn

__all__ = ["FeedForward"]


def dropout_or_identity(p: float) -> nn.Module:
    """nn.Dropout(p), or no module at all for p == 0 (the Co-DETR configs)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class FeedForward(nn.Module):
    """
    The transformer feed-forward block: Linear -> ReLU -> Dropout -> Linear -> Dropout.
    The residual connection and the normalisation belong to the layer that uses it.
    """

    def __init__(self, *, embed_dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.linear1 = nn.Linear(embed_dim, hidden_dim)
        self.linear2 = nn.Linear(hidden_dim, embed_dim)
        self.dropout1 = dropout_or_identity(dropout)
        self.dropout2 = dropout_or_identity(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(..., C) -> (..., C)"""
        # in place: the hidden activation is the largest tensor of the encoder (tokens x 2048)
        return self.dropout2(self.linear2(self.dropout1(self.linear1(x).relu_())))
