"""
Flattening of multi-level feature maps into the token sequence the deformable transformer
works on, and the inverse.

Conventions used by the whole transformer:

- ``level_shapes``: ``((H_l, W_l), ...)`` of each level as Python ints, taken from the feature
  maps' ``.shape``: what the layers use to split, reshape and index the sequence.
- ``spatial_shapes``: (L, 2) int64, the same sizes as a tensor on the features' device, for
  arithmetic on the device.
- ``level_start_index``: (L,) int64, offset of each level in the flattened sequence.
- ``padding_mask``: True where a position lies in the padding of the batched image.
- ``valid_ratios``: (B, L, 2), the fraction ``(w, h)`` of each level that is not padding.

The layers never read sizes back from ``spatial_shapes`` (``.tolist()`` would be a
device-to-host sync on GPU in every layer); the encoder and the decoder check the layout once
per forward (``MultiLevelSequence.check_layout``) and hand ``level_shapes`` to their layers.
Python ints taken from ``tensor.shape`` are traced symbolically by ``torch.export`` /
``torch.onnx.export(dynamo=True)``, so the level sizes stay dynamic in an exported graph,
whereas ``.tolist()`` of a tensor is a data-dependent read.
"""

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from codetr.layers import as_level_shapes, check_level_shapes

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
        level_shapes: ((H_l, W_l), ...) Python ints, the sizes of ``spatial_shapes``, as
            :func:`flatten_levels` takes them from the maps.
    """

    tokens: Tensor
    padding_mask: Tensor
    spatial_shapes: Tensor
    level_start_index: Tensor
    valid_ratios: Tensor
    level_shapes: Tuple[Tuple[int, int], ...]

    def __post_init__(self):
        self.level_shapes = as_level_shapes(self.level_shapes)

    def check_layout(self) -> None:
        """
        Raises ValueError, naming the shapes, unless tokens (B, S, C), padding mask (B, S),
        valid ratios (B, L, 2), ``spatial_shapes`` (L, 2) and ``level_start_index`` (L,) agree
        with the L level shapes, whose h * w sum to S (:func:`check_level_shapes`). Reads shapes
        only, no tensor data. The encoder and the decoder call it once per forward, then hand
        ``level_shapes`` to all their attention layers, which do not check them again.
        """
        if self.tokens.dim() != 3:
            raise ValueError(f"tokens must have shape (B, S, C), got {tuple(self.tokens.shape)}")
        batch_size, num_tokens, _ = self.tokens.shape
        check_level_shapes(
            self.level_shapes, num_tokens, self.spatial_shapes, self.level_start_index
        )
        if self.padding_mask is not None and self.padding_mask.shape != (batch_size, num_tokens):
            raise ValueError(
                f"padding_mask must have shape ({batch_size}, {num_tokens}) like the tokens "
                f"{tuple(self.tokens.shape)}, got {tuple(self.padding_mask.shape)}"
            )
        if self.valid_ratios.shape != (batch_size, len(self.level_shapes), 2):
            raise ValueError(
                f"valid_ratios must have shape ({batch_size}, {len(self.level_shapes)}, 2), "
                f"got {tuple(self.valid_ratios.shape)}"
            )

    def with_tokens(self, tokens: Tensor) -> "MultiLevelSequence":
        """The same layout holding other (B, S, C') tokens."""
        return MultiLevelSequence(
            tokens,
            self.padding_mask,
            self.spatial_shapes,
            self.level_start_index,
            self.valid_ratios,
            self.level_shapes,
        )

    def to_maps(self) -> List[Tensor]:
        """The tokens reshaped back to per-level maps, each (B, C, H_l, W_l)."""
        batch_size, _, channels = self.tokens.shape
        sizes = [h * w for h, w in self.level_shapes]
        maps = []
        for level_tokens, (h, w) in zip(self.tokens.split(sizes, dim=1), self.level_shapes):
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
    # sizes from the maps' shapes (symbolic under torch.export), copied to the device without
    # waiting for it
    sizes = [x.shape[-2:] for x in feature_maps]
    spatial_shapes = torch.as_tensor(sizes, dtype=torch.long).to(device, non_blocking=True)
    level_start_index = torch.cat(
        [spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]]
    )
    valid_ratios = torch.stack([_valid_ratio(m) for m in masks], 1)
    return MultiLevelSequence(
        tokens, padding_mask, spatial_shapes, level_start_index, valid_ratios, sizes
    )


def encoder_reference_points(
    level_shapes: Sequence[Tuple[int, int]], valid_ratios: Tensor
) -> Tensor:
    """
    Reference point of every encoder token: the centre of its cell, normalised by the valid
    extent of its own level, then expressed in every level's valid extent.

    Args:
        level_shapes: the (h, w) of each level, Python ints (or the 0-dim tensors
            ``torch.jit.trace`` gives for shapes).
        valid_ratios: (B, L, 2).
    Returns:
        (B, S, L, 2) normalised (x, y).
    """
    device = valid_ratios.device
    points = []
    for level, (height, width) in enumerate(level_shapes):
        # the cell centres; arange, not linspace: it also takes 0-dim tensor sizes (a trace)
        ref_y, ref_x = torch.meshgrid(
            torch.arange(height, device=device).to(torch.float32) + 0.5,
            torch.arange(width, device=device).to(torch.float32) + 0.5,
            indexing="ij",
        )
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
        points.append(torch.stack((ref_x, ref_y), -1))
    reference_points = torch.cat(points, 1)
    return reference_points[:, :, None] * valid_ratios[:, None]
