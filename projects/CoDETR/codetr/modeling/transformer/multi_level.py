"""
Flattening of multi-level feature maps into the token sequence the deformable transformer
works on, and the inverse.

Conventions used by the whole transformer:

- ``spatial_shapes``: (L, 2) int64, ``(H_l, W_l)`` of each level.
- ``level_start_index``: (L,) int64, offset of each level in the flattened sequence.
- ``padding_mask``: True where a position lies in the padding of the batched image.
- ``valid_ratios``: (B, L, 2), the fraction ``(w, h)`` of each level that is not padding.
"""

from dataclasses import dataclass
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MultiLevelSequence", "flatten_levels", "level_masks", "encoder_reference_points"]


@dataclass
class MultiLevelSequence:
    """
    Multi-level maps flattened into one sequence of S = sum(H_l * W_l) tokens.

    Attributes:
        tokens: (B, S, C) features (the encoder input, or the encoder memory).
        padding_mask: (B, S) bool, True at padding.
        spatial_shapes: (L, 2) int64.
        level_start_index: (L,) int64.
        valid_ratios: (B, L, 2) float, (w, h) order.
    """

    tokens: Tensor
    padding_mask: Tensor
    spatial_shapes: Tensor
    level_start_index: Tensor
    valid_ratios: Tensor

    def with_tokens(self, tokens: Tensor) -> "MultiLevelSequence":
        """The same layout holding other (B, S, C') tokens."""
        return MultiLevelSequence(
            tokens,
            self.padding_mask,
            self.spatial_shapes,
            self.level_start_index,
            self.valid_ratios,
        )

    def to_maps(self) -> List[Tensor]:
        """The tokens reshaped back to per-level maps, each (B, C, H_l, W_l)."""
        batch_size, _, channels = self.tokens.shape
        sizes = [int(h) * int(w) for h, w in self.spatial_shapes.tolist()]
        maps = []
        for level_tokens, (h, w) in zip(
            self.tokens.split(sizes, dim=1), self.spatial_shapes.tolist()
        ):
            maps.append(level_tokens.transpose(1, 2).reshape(batch_size, channels, h, w))
        return maps


def level_masks(padding_mask: Tensor, feature_maps: List[Tensor]) -> List[Tensor]:
    """
    Padding masks of each level, by nearest-neighbour resizing of the image padding mask
    (as the reference implementation does).

    Args:
        padding_mask: (B, H, W) bool, True at padding of the batched input image.
        feature_maps: per level (B, C, H_l, W_l).
    Returns:
        per level (B, H_l, W_l) bool.
    """
    image_mask = padding_mask[None].float()
    return [F.interpolate(image_mask, size=x.shape[-2:]).to(torch.bool)[0] for x in feature_maps]


def _valid_ratio(mask: Tensor) -> Tensor:
    """(B, H, W) bool padding mask -> (B, 2) valid (w, h) fraction."""
    _, height, width = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float() / height
    valid_w = (~mask[:, 0, :]).sum(1).float() / width
    return torch.stack([valid_w, valid_h], -1)


def flatten_levels(feature_maps: List[Tensor], masks: List[Tensor]) -> MultiLevelSequence:
    """
    Args:
        feature_maps: per level (B, C, H_l, W_l).
        masks: per level (B, H_l, W_l) bool, True at padding.
    Returns:
        the flattened sequence with its layout.
    """
    if len(feature_maps) != len(masks):
        raise ValueError(
            f"flatten_levels got {len(feature_maps)} feature maps but {len(masks)} masks"
        )
    device = feature_maps[0].device
    tokens = torch.cat([x.flatten(2).transpose(1, 2) for x in feature_maps], 1)
    padding_mask = torch.cat([m.flatten(1) for m in masks], 1)
    spatial_shapes = torch.as_tensor(
        [x.shape[-2:] for x in feature_maps], dtype=torch.long, device=device
    )
    level_start_index = torch.cat(
        [spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]]
    )
    valid_ratios = torch.stack([_valid_ratio(m) for m in masks], 1)
    return MultiLevelSequence(tokens, padding_mask, spatial_shapes, level_start_index, valid_ratios)


def encoder_reference_points(spatial_shapes: Tensor, valid_ratios: Tensor) -> Tensor:
    """
    Reference point of every encoder token: the centre of its cell, normalised by the valid
    extent of its own level, then expressed in every level's valid extent.

    Args:
        spatial_shapes: (L, 2) int64.
        valid_ratios: (B, L, 2).
    Returns:
        (B, S, L, 2) normalised (x, y).
    """
    device = valid_ratios.device
    points = []
    for level, (height, width) in enumerate(spatial_shapes.tolist()):
        ref_y, ref_x = torch.meshgrid(
            torch.linspace(0.5, height - 0.5, height, dtype=torch.float32, device=device),
            torch.linspace(0.5, width - 0.5, width, dtype=torch.float32, device=device),
            indexing="ij",
        )
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
        points.append(torch.stack((ref_x, ref_y), -1))
    reference_points = torch.cat(points, 1)
    return reference_points[:, :, None] * valid_ratios[:, None]
