"""
Multi-scale deformable attention for exported graphs: the layer's projections with the
reference sampling (``grid_sample``, ONNX ``GridSample``, opset 16 and later), the level sizes
taken from the feature maps' shapes, so that they stay dynamic in a traced graph.

Used only by :class:`~codetr.export.DeployableDetector`: the PyTorch model keeps its own
sampling (``multi_scale_deformable_attention_fast``, equal to the reference
``codetr.layers.multi_scale_deformable_attention``), which reads the sizes as Python ints.
"""

from typing import Optional, Sequence, Tuple, Union

from torch import Tensor

from codetr.layers import MultiScaleDeformableAttention
from codetr.layers.ms_deform_attn import grid_sample_levels

__all__ = ["deformable_attention_graph"]

# a level size: a Python int, or under torch.jit.trace a 0-dim tensor recorded from a shape
Size = Union[int, Tensor]


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
    float32 with the sampling of :func:`~codetr.layers.ms_deform_attn.grid_sample_levels`: the same
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
    output = grid_sample_levels(value, level_shapes, sampling_locations, attention_weights)
    return attention.output_proj(output)
