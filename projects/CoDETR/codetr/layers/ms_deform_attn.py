"""Multi-scale deformable attention (Deformable DETR), pure PyTorch."""

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ms_deform_attn_fast import LevelShapes, as_level_shapes, multi_scale_deformable_attention_fast

__all__ = [
    "multi_scale_deformable_attention",
    "grid_sample_levels",
    "MultiScaleDeformableAttention",
    "check_level_shapes",
]


def check_level_shapes(
    level_shapes: Sequence[Tuple[int, int]],
    num_values: int,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
) -> LevelShapes:
    """
    Checks the layout of a flattened multi-level sequence once, before any computation, so that
    the attention layers can take its level shapes as they are: raises ValueError naming the
    shapes unless ``level_shapes`` are L (h, w) pairs whose h * w sum to ``num_values`` (the S
    of the values), ``spatial_shapes`` has shape (L, 2) and ``level_start_index`` shape (L,).
    Reads Python ints and tensor shapes only, never tensor data: no device-to-host sync (that
    ``spatial_shapes`` holds the same sizes is the caller's, as the transformer's
    ``flatten_levels`` makes both from the feature maps).

    Returns:
        the level shapes as a tuple of (h, w) pairs.
    """
    level_shapes = as_level_shapes(level_shapes)
    num_levels = len(level_shapes)
    if spatial_shapes.shape != (num_levels, 2):
        raise ValueError(
            f"spatial_shapes must have shape ({num_levels}, 2) like the level shapes "
            f"{list(level_shapes)}, got {tuple(spatial_shapes.shape)}"
        )
    if level_start_index.shape != (num_levels,):
        raise ValueError(
            f"level_start_index must have shape ({num_levels},) like the level shapes "
            f"{list(level_shapes)}, got {tuple(level_start_index.shape)}"
        )
    total_pixels = sum(h * w for h, w in level_shapes)
    if total_pixels != num_values:
        raise ValueError(
            f"value has S={num_values} positions but the level shapes {list(level_shapes)} "
            f"sum to {total_pixels}"
        )
    return level_shapes


def multi_scale_deformable_attention(
    value: Tensor,
    spatial_shapes: Union[Tensor, Sequence[Tuple[int, int]]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """
    Reference computation of multi-scale deformable attention: every head of every query
    bilinearly samples its value maps at its sampling points (zero outside the maps, pixel
    centres at half-integers, i.e. ``grid_sample(align_corners=False)``) and sums the samples
    weighted by the attention weights.

    Args:
        value: (B, S, H, Dh) values of H heads, S = sum over levels of h * w, levels
            flattened row-major one after the other.
        spatial_shapes: (h, w) of each level: L pairs of Python ints, or an (L, 2) integer
            tensor, read with ``.tolist()`` (on GPU a device-to-host sync).
        sampling_locations: (B, Q, H, L, P, 2) normalised (x, y), (0, 0) the top-left corner
            and (1, 1) the bottom-right corner of each level.
        attention_weights: (B, Q, H, L, P).

    Returns:
        (B, Q, H * Dh), heads concatenated.
    """
    return grid_sample_levels(
        value, as_level_shapes(spatial_shapes), sampling_locations, attention_weights
    )


def grid_sample_levels(
    value: Tensor,
    level_shapes: Sequence[Tuple[Union[int, Tensor], Union[int, Tensor]]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """
    :func:`multi_scale_deformable_attention` with the level sizes used as they are given: one
    ``grid_sample`` per level. Under ``torch.jit.trace`` sizes taken from maps' shapes are
    0-dim tensors and stay dynamic in the graph (ONNX ``GridSample``, opset >= 16): the
    exported model's sampling.

    Args:
        value, sampling_locations, attention_weights: as :func:`multi_scale_deformable_attention`.
        level_shapes: the (h, w) of every level, Python ints or 0-dim tensors.

    Returns:
        (B, Q, H * Dh).
    """
    _, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
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
    return output.transpose(1, 2).contiguous()


class MultiScaleDeformableAttention(nn.Module):
    """
    Deformable attention over a multi-level feature pyramid: each query predicts, per head,
    ``num_points`` sampling offsets around its reference point on every level and softmax
    weights over all ``num_levels * num_points`` samples. Returns ``output_proj`` of the
    attended values only: position embedding, residual and dropout are the caller's.

    The sampling runs :func:`multi_scale_deformable_attention_fast` (equal to the reference
    :func:`multi_scale_deformable_attention`). Under autocast or with 16-bit inputs, the softmax,
    the sampling locations and the sampling are computed in float32.

    Given ``level_shapes`` (Python ints, checked once per forward of the encoder or decoder by
    :func:`check_level_shapes`), a call reads no tensor data on the host, so on GPU no layer
    waits for the device; without them every call derives and checks them from
    ``spatial_shapes`` with a device-to-host copy.
    """

    def __init__(
        self, *, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4
    ):
        """
        Args:
            embed_dim: channels of queries, values and output.
            num_heads: attention heads; must divide ``embed_dim``.
            num_levels: feature levels attended.
            num_points: sampling points per head and level.
        """
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})"
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        num_samples = num_heads * num_levels * num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_samples * 2)
        self.attention_weights = nn.Linear(embed_dim, num_samples)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """
        Deformable DETR's initialisation: zero offset weights with a bias placing the points of
        head k along direction 2*pi*k/num_heads (scaled so the larger of |x|, |y| is 1) at
        distances 1..num_points, zero attention-weight layer (uniform weights), and
        xavier-uniform value / output projections with zero bias.
        """
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (
            2.0 * math.pi / self.num_heads
        )
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        # (H, L, P, 2): point p of every level at distance p + 1 along the head's direction
        distances = torch.arange(1, self.num_points + 1, dtype=torch.float32)
        grid = directions[:, None, None, :] * distances[None, None, :, None]
        grid = grid.expand(self.num_heads, self.num_levels, self.num_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: Tensor,
        value: Tensor,
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        value_padding_mask: Optional[Tensor] = None,
        level_shapes: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> Tensor:
        """
        Args:
            query: (B, Q, C) queries, position embedding already added.
            value: (B, S, C) flattened multi-level features, S = sum of h * w.
            reference_points: (B, Q, L, 2) normalised (x, y) points, or (B, Q, L, 4)
                normalised (cx, cy, w, h) boxes, per level.
            spatial_shapes: (L, 2) long, (h, w) of each level.
            level_start_index: (L,) long, start of each level in S (for fused kernels).
            value_padding_mask: (B, S) bool, True at padding positions (their values are
                zeroed), or None.
            level_shapes: the (h, w) of every level as Python ints, the sizes in
                ``spatial_shapes``, already checked against ``value`` with
                :func:`check_level_shapes` (``MultiLevelSequence.level_shapes``: the encoder and
                decoder check them once per forward and hand them to all their layers). None:
                derived from ``spatial_shapes`` with ``.tolist()`` and checked on every call.
                0-dim tensors (the shapes ``torch.jit.trace`` records, as the exported model
                gives them): sampled with :func:`grid_sample_levels`, dynamic in the trace.

        Returns:
            (B, Q, C).
        """
        batch_size, num_queries, num_values, level_shapes = self._check_inputs(
            query,
            value,
            reference_points,
            spatial_shapes,
            level_start_index,
            value_padding_mask,
            level_shapes,
        )
        # sizes given as 0-dim tensors (the shapes torch.jit.trace records: an export) stay
        # dynamic in grid_sample and standard operators; the fast kernel reads Python ints
        traced_sizes = any(isinstance(size, Tensor) for shape in level_shapes for size in shape)
        value = self.value_proj(value)
        if value_padding_mask is not None:
            value = value.masked_fill(value_padding_mask[..., None], 0.0)
        value = value.view(batch_size, num_values, self.num_heads, -1)
        sampling_offsets = self.sampling_offsets(query).view(
            batch_size, num_queries, self.num_heads, self.num_levels, self.num_points, 2
        )
        attention_weights = _to_float32_if_half(self.attention_weights(query)).view(
            batch_size, num_queries, self.num_heads, self.num_levels * self.num_points
        )
        attention_weights = attention_weights.softmax(-1).view(
            batch_size, num_queries, self.num_heads, self.num_levels, self.num_points
        )
        sampling_offsets = _to_float32_if_half(sampling_offsets)
        # (B, Q, 1, L, 1, 2 or 4)
        references = _to_float32_if_half(reference_points)[:, :, None, :, None, :]
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: (w, h) -> normalised units. Both other
            # operands are first made contiguous over (L, P, 2): broadcasting them over the
            # trailing (P, 2) dimensions makes this sum about 10x slower on CPU.
            level_sizes = spatial_shapes.flip(-1).to(sampling_offsets.dtype)[None, :, None, :]
            level_sizes = level_sizes.expand(self.num_heads, -1, self.num_points, -1)
            references = references.expand(-1, -1, -1, -1, self.num_points, -1)
            if traced_sizes:  # the same arithmetic; ONNX has no addcdiv
                sampling_locations = references + sampling_offsets / level_sizes
            else:
                sampling_locations = torch.addcdiv(
                    references.contiguous(), sampling_offsets, level_sizes.contiguous()
                )
        else:
            # offsets are relative to the half box size, spread over num_points
            sampling_locations = (
                references[..., :2] + sampling_offsets / self.num_points * references[..., 2:] * 0.5
            )
        sample = grid_sample_levels if traced_sizes else multi_scale_deformable_attention_fast
        output = sample(value, level_shapes, sampling_locations, attention_weights)
        return self.output_proj(output)

    def _check_inputs(
        self,
        query: Tensor,
        value: Tensor,
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        value_padding_mask: Optional[Tensor],
        level_shapes: Optional[Sequence[Tuple[int, int]]],
    ) -> Tuple[int, int, int, LevelShapes]:
        """
        Raises ValueError on inconsistent shapes (tensor shapes only; the level shapes are
        derived from ``spatial_shapes`` and checked only when not given); returns (B, Q, S) and
        the level shapes.
        """
        if query.dim() != 3 or query.shape[-1] != self.embed_dim:
            raise ValueError(
                f"query must have shape (B, Q, {self.embed_dim}), got {tuple(query.shape)}"
            )
        batch_size, num_queries, _ = query.shape
        if value.dim() != 3 or value.shape[0] != batch_size or value.shape[2] != self.embed_dim:
            raise ValueError(
                f"value must have shape ({batch_size}, S, {self.embed_dim}), "
                f"got {tuple(value.shape)}"
            )
        num_values = value.shape[1]
        if spatial_shapes.shape != (self.num_levels, 2):
            raise ValueError(
                f"spatial_shapes must have shape ({self.num_levels}, 2), "
                f"got {tuple(spatial_shapes.shape)}"
            )
        if level_start_index.shape != (self.num_levels,):
            raise ValueError(
                f"level_start_index must have shape ({self.num_levels},), "
                f"got {tuple(level_start_index.shape)}"
            )
        if level_shapes is not None and len(level_shapes) != self.num_levels:
            raise ValueError(
                f"level_shapes must have {self.num_levels} (h, w) pairs, got {list(level_shapes)}"
            )
        expected_ref_shape = (batch_size, num_queries, self.num_levels)
        if (
            reference_points.dim() != 4
            or reference_points.shape[:3] != expected_ref_shape
            or reference_points.shape[3] not in (2, 4)
        ):
            raise ValueError(
                f"reference_points must have shape (B, Q, L, 2 or 4) = "
                f"({batch_size}, {num_queries}, {self.num_levels}, 2 or 4), "
                f"got {tuple(reference_points.shape)}"
            )
        if value_padding_mask is not None and (
            value_padding_mask.shape != (batch_size, num_values)
            or value_padding_mask.dtype != torch.bool
        ):
            raise ValueError(
                f"value_padding_mask must be a bool tensor of shape ({batch_size}, {num_values}), "
                f"got {value_padding_mask.dtype} of shape {tuple(value_padding_mask.shape)}"
            )
        if level_shapes is None:
            level_shapes = check_level_shapes(
                as_level_shapes(spatial_shapes), num_values, spatial_shapes, level_start_index
            )
        return batch_size, num_queries, num_values, tuple(level_shapes)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"num_levels={self.num_levels}, num_points={self.num_points}"
        )


def _to_float32_if_half(tensor: Tensor) -> Tensor:
    """float16 / bfloat16 tensors in float32, others unchanged."""
    if tensor.dtype in (torch.float16, torch.bfloat16):
        return tensor.float()
    return tensor
