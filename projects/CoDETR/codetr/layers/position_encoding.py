"""Sine / cosine position embeddings of feature-map pixels and of (normalised) boxes."""

import math

import torch
from torch import Tensor, nn

__all__ = ["SinePositionEmbedding", "box_sine_embedding"]


def _check_num_pos_feats(num_pos_feats: int) -> None:
    if num_pos_feats <= 0 or num_pos_feats % 2 != 0:
        raise ValueError(f"num_pos_feats must be a positive even number, got {num_pos_feats}")


def _frequencies(num_pos_feats: int, temperature: float, device: torch.device) -> Tensor:
    """
    Divisors of the ``num_pos_feats`` channels of one coordinate: channels 2k and 2k + 1
    share ``temperature ** (2k / num_pos_feats)``. Computed in float32 like the reference.
    """
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * (dim_t // 2) / num_pos_feats)


def _interleave_sin_cos(pos: Tensor) -> Tensor:
    """(..., F) angles -> (..., F) as sin(a_0), cos(a_1), sin(a_2), cos(a_3), ..."""
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


class SinePositionEmbedding(nn.Module):
    """
    The DETR sine position embedding of every pixel of a (padded) feature map. The position of
    a pixel along an axis is the number of valid (non-padding) pixels up to and including it;
    with ``normalize`` it becomes ``(position + offset) / (valid length + eps) * scale``.
    """

    def __init__(
        self,
        *,
        num_pos_feats: int,
        temperature: float = 10000.0,
        normalize: bool = False,
        scale: float = 2 * math.pi,
        eps: float = 1e-6,
        offset: float = 0.0,
    ):
        """
        Args:
            num_pos_feats: channels per axis; the output has ``2 * num_pos_feats`` channels.
            temperature: base of the geometric progression of wavelengths.
            normalize: whether to normalise the positions by the valid length of each row /
                column (then ``scale``, ``eps`` and ``offset`` apply).
            scale: range of normalised positions.
            eps: added to the valid length when normalising.
            offset: added to the positions when normalising (Deformable DETR uses -0.5).
        """
        super().__init__()
        _check_num_pos_feats(num_pos_feats)
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.eps = eps
        self.offset = offset

    def forward(self, mask: Tensor) -> Tensor:
        """
        Args:
            mask: (B, H, W) bool, True at padding pixels.

        Returns:
            (B, 2 * num_pos_feats, H, W) float32 embedding: the first ``num_pos_feats``
            channels encode y, the last ``num_pos_feats`` encode x.
        """
        if mask.dim() != 3:
            raise ValueError(f"mask must have shape (B, H, W), got {tuple(mask.shape)}")
        not_mask = (~mask.bool()).to(torch.int32)
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale
        dim_t = _frequencies(self.num_pos_feats, self.temperature, mask.device)
        pos_y = _interleave_sin_cos(y_embed[..., None] / dim_t)
        pos_x = _interleave_sin_cos(x_embed[..., None] / dim_t)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
            f"normalize={self.normalize}, scale={self.scale}, eps={self.eps}, "
            f"offset={self.offset}"
        )


def box_sine_embedding(
    coords: Tensor, *, num_pos_feats: int, temperature: float = 10000.0, yx_first: bool
) -> Tensor:
    """
    Sine embedding of normalised points or boxes: each coordinate ``c`` is scaled to
    ``2 * pi * c`` and encoded by ``num_pos_feats`` interleaved sin / cos values (the same
    per-coordinate encoding as :class:`SinePositionEmbedding`).

    Args:
        coords: (..., D) with D = 2 (x, y) or D = 4 (x, y, w, h), already in [0, 1]
            (callers holding unactivated coordinates pass ``coords.sigmoid()``).
        num_pos_feats: channels per coordinate.
        temperature: base of the geometric progression of wavelengths.
        yx_first: True orders the output (y, x[, w, h]) as DINO's decoder does for its query
            position; False keeps (x, y[, w, h]) as Deformable DETR's two-stage proposal
            embedding does.

    Returns:
        (..., D * num_pos_feats) embedding, of dtype float32 or that of ``coords`` if wider.
    """
    _check_num_pos_feats(num_pos_feats)
    num_coords = coords.shape[-1]
    if num_coords not in (2, 4):
        raise ValueError(f"coords must have a last dimension of 2 or 4, got {num_coords}")
    dim_t = _frequencies(num_pos_feats, temperature, coords.device)
    # (..., D, num_pos_feats)
    pos = _interleave_sin_cos((coords * (2 * math.pi))[..., None] / dim_t)
    if yx_first:
        pos = torch.cat((pos[..., 1:2, :], pos[..., 0:1, :], pos[..., 2:, :]), dim=-2)
    return pos.flatten(-2)
