"""
Multi-scale deformable attention for exported graphs: the sampling in ``grid_sample`` (ONNX
``GridSample``, opset 16 and later), with the level sizes taken from the feature maps' shapes,
so that they stay dynamic in a traced graph.

Used only by :class:`~codetr.export.DeployableDetector`: the PyTorch model keeps its own
sampling (``multi_scale_deformable_attention_fast``, equal to the reference
``codetr.layers.multi_scale_deformable_attention``, which this is too).
"""

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from codetr.layers import MultiScaleDeformableAttention

__all__ = ["deformable_attention_graph", "multi_scale_deformable_attention_graph"]

# a level size: a Python int, or under torch.jit.trace a 0-dim tensor recorded from a shape
Size = Union[int, Tensor]


def multi_scale_deformable_attention_graph(
    value: Tensor,
    level_shapes: Sequence[Tuple[Size, Size]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """
    :func:`codetr.layers.multi_scale_deformable_attention` with the level sizes kept as they are
    given (not read with ``int``): one ``grid_sample`` per level (bilinear, zeros outside,
    ``align_corners=False``), the samples weighted by the attention weights and summed.

    Args:
        value: (B, S, H, Dh).
        level_shapes: the (h, w) of every level: Python ints, or 0-dim tensors recorded by
            ``torch.jit.trace`` from the maps' shapes (then dynamic in the traced graph).
        sampling_locations: (B, Q, H, L, P, 2) normalised (x, y).
        attention_weights: (B, Q, H, L, P).

    Returns:
        (B, Q, H * Dh).
    """
    _, _, num_heads, head_dim = value.shape
    num_queries, num_levels, num_points = (
        sampling_locations.shape[1],
        sampling_locations.shape[3],
        sampling_locations.shape[4],
    )
    # grid_sample expects coordinates in [-1, 1]
    sampling_grids = 2 * sampling_locations - 1
    sampled_per_level = []
    start = 0
    for level, (height, width) in enumerate(level_shapes):
        end = start + height * width
        # (B, h*w, H, Dh) -> (B*H, Dh, h, w)
        value_level = (
            value[:, start:end].flatten(2).transpose(1, 2).reshape(-1, head_dim, height, width)
        )
        # (B, Q, H, P, 2) -> (B*H, Q, P, 2)
        grid_level = sampling_grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # (B*H, Dh, Q, P)
        sampled_per_level.append(
            F.grid_sample(
                value_level, grid_level, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        )
        start = end
    # (B, Q, H, L, P) -> (B*H, 1, Q, L*P)
    weights = attention_weights.transpose(1, 2).reshape(-1, 1, num_queries, num_levels * num_points)
    # (B*H, Dh, Q, L*P) -> (B, H*Dh, Q)
    output = (torch.stack(sampled_per_level, dim=-2).flatten(-2) * weights).sum(-1)
    output = output.view(-1, num_heads * head_dim, num_queries)
    return output.transpose(1, 2)


def deformable_attention_graph(
    attention: MultiScaleDeformableAttention,
    query: Tensor,
    value: Tensor,
    reference_points: Tensor,
    spatial_shapes: Tensor,
    level_shapes: Sequence[Tuple[Size, Size]],
    value_padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """
    ``attention(query, value, reference_points, spatial_shapes, ..., value_padding_mask)`` in
    float32 with the sampling of :func:`multi_scale_deformable_attention_graph`: the same
    projections and arithmetic as :meth:`MultiScaleDeformableAttention.forward`, without its
    checks (shapes are those the model makes) and with ``level_shapes`` kept dynamic.

    Args:
        attention: the layer whose parameters are used.
        query: (B, Q, C); value: (B, S, C).
        reference_points: (B, Q, L, 2) points or (B, Q, L, 4) boxes, normalised.
        spatial_shapes: (L, 2) long, (h, w) of every level, computed in the graph.
        level_shapes: the same sizes as ints or 0-dim tensors (see above).
        value_padding_mask: (B, S) bool, True at padding, or None.

    Returns:
        (B, Q, C).
    """
    batch_size, num_queries = query.shape[0], query.shape[1]
    num_values = value.shape[1]
    heads, levels, points = attention.num_heads, attention.num_levels, attention.num_points
    value = attention.value_proj(value)
    if value_padding_mask is not None:
        value = value.masked_fill(value_padding_mask[..., None], 0.0)
    value = value.view(batch_size, num_values, heads, -1)
    sampling_offsets = attention.sampling_offsets(query).view(
        batch_size, num_queries, heads, levels, points, 2
    )
    attention_weights = attention.attention_weights(query).view(
        batch_size, num_queries, heads, levels * points
    )
    attention_weights = attention_weights.softmax(-1).view(
        batch_size, num_queries, heads, levels, points
    )
    references = reference_points[:, :, None, :, None, :]
    if reference_points.shape[-1] == 2:
        # offsets in pixels of each level: (w, h) -> normalised units (addcdiv's arithmetic)
        level_sizes = spatial_shapes.flip(-1).to(sampling_offsets.dtype)[None, :, None, :]
        sampling_locations = references + sampling_offsets / level_sizes
    else:
        sampling_locations = (
            references[..., :2] + sampling_offsets / points * references[..., 2:] * 0.5
        )
    output = multi_scale_deformable_attention_graph(
        value, level_shapes, sampling_locations, attention_weights
    )
    return attention.output_proj(output)
