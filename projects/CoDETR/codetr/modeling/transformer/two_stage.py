"""
Two-stage proposals: every encoder token becomes a proposal box centred on its cell, which
the encoder-side prediction heads score and refine; the best ones seed the decoder queries.
"""

from typing import Tuple

import torch
from torch import Tensor

from .multi_level import MultiLevelSequence

__all__ = ["encoder_proposals"]


def encoder_proposals(memory: MultiLevelSequence) -> Tuple[Tensor, Tensor]:
    """
    Args:
        memory: the encoder memory with its layout (``tokens``, ``padding_mask`` and
            ``level_shapes``: Python ints, or the 0-dim tensors of ``torch.jit.trace``).
    Returns:
        tokens: (B, S, C) memory with padding and invalid positions zeroed.
        proposals: (B, S, 4) proposal boxes in logit space (inverse sigmoid of normalised
            cxcywh): centre of each cell, side 0.05 * 2^level; ``inf`` at padding and where
            the box is not strictly inside (0.01, 0.99).
    """
    tokens, padding_mask = memory.tokens, memory.padding_mask
    batch_size = tokens.shape[0]
    proposals = []
    start = 0
    for level, (height, width) in enumerate(memory.level_shapes):
        level_mask = padding_mask[:, start : start + height * width].view(batch_size, height, width)
        valid_h = (~level_mask[:, :, 0]).sum(1)
        valid_w = (~level_mask[:, 0, :]).sum(1)
        # arange, not linspace: it also takes the 0-dim tensor sizes of a traced export
        grid_y, grid_x = torch.meshgrid(
            torch.arange(height, device=tokens.device).to(torch.float32),
            torch.arange(width, device=tokens.device).to(torch.float32),
            indexing="ij",
        )
        grid = torch.stack([grid_x, grid_y], -1)
        scale = torch.stack([valid_w, valid_h], -1).view(batch_size, 1, 1, 2)
        grid = (grid[None].expand(batch_size, -1, -1, -1) + 0.5) / scale
        wh = torch.full_like(grid, 0.05 * (2.0**level))
        proposals.append(torch.cat([grid, wh], -1).view(batch_size, -1, 4))
        start += height * width
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals))
    invalid = padding_mask.unsqueeze(-1) | ~valid
    proposals = proposals.masked_fill(invalid, float("inf"))
    tokens = tokens.masked_fill(invalid, 0.0)
    return tokens, proposals
