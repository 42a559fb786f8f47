"""
Fast multi-scale deformable attention in pure PyTorch, for CPU and CUDA.

Same contract and semantics as the reference
:func:`codetr.layers.ms_deform_attn.multi_scale_deformable_attention` (bilinear sampling with
``grid_sample(align_corners=False)`` conventions, zeros outside the maps, corners chosen with
grid_sample's own rounding), computed without per-level sampled tensors or concatenations:

* Forward: the four bilinear corners of every sampling point are found by index arithmetic, and
  bilinear weights times attention weights become the per-sample weights of one
  ``embedding_bag`` that gathers and sums all ``L * P * 4`` corners of every (image, query,
  head) in a fused kernel. With many sampling points (encoder), the value maps are first copied
  into zero-padded maps (one row / column before, two after every level) so that corners
  outside a map read zeros without any test; with few points (decoder), the corners index the
  values themselves, clamped into the maps, and corners outside get zero weight. Points are
  processed in chunks of ``_POINTS_PER_CHUNK`` so that intermediates stay small.
* Layout: the per-point arithmetic keeps coordinates and corners in planar tensors
  (R, H, 2 or 4, L * P) rather than the interleaved (R, H, L, P, 2) of the inputs, and the
  per-level tables are repeated over the points, so that every elementwise op runs over rows of
  L * P contiguous points. Broadcasting over trailing dimensions of 2 or 4 made PyTorch's CPU
  kernels iterate in runs of 2 and cost more than the gather itself.
* Backward (analytic, no autograd graph of the forward): the dot products of the output
  gradient with the values at every corner give the attention-weight and sampling-location
  gradients; the value gradient is the transposed gather: sampling points are sorted by their
  top-left corner and one ``embedding_bag`` per corner position sums the weighted output
  gradients that land on every pixel (deterministic: no atomic additions).

Every op used has CPU and CUDA kernels, so the same formulation serves both devices (on CUDA it
has not been timed here). Inputs in 16-bit floats, also inside autocast regions, are computed
in float32 and the result is cast back. Given the level shapes as Python ints, a call reads no
device data on the host: the per-level tables are built from them with an asynchronous copy and
the constants with fills, so on GPU no call waits for the device.
"""

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

__all__ = ["multi_scale_deformable_attention_fast", "as_level_shapes"]

LevelShapes = Tuple[Tuple[int, int], ...]

# corner order of the bilinear weights and indices: (row, column) offsets of the four corners
_CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))
# sampling points processed at once: intermediate tensors of a few MiB, few kernel launches
_POINTS_PER_CHUNK = 1 << 20
# The forward pass gathers from zero-padded copies of the value maps when there are at least
# this many sampling points per value element (encoder queries). With fewer points (decoder
# queries) it gathers from the values themselves, clamping the corners into the maps and
# zeroing the weights of the corners outside: more work per point, but no copy of the values.
_MIN_POINTS_PER_VALUE_FOR_PADDING = 1 / 32


def multi_scale_deformable_attention_fast(
    value: Tensor,
    spatial_shapes: Union[Tensor, Sequence[Tuple[int, int]]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """
    Multi-scale deformable attention, numerically equal to the reference function and
    differentiable with respect to ``value``, ``sampling_locations`` and ``attention_weights``.

    Args:
        value: (B, S, H, Dh) values of H heads, S = sum over levels of h * w, levels
            flattened row-major one after the other.
        spatial_shapes: (h, w) of each level: L pairs of Python ints, or an (L, 2) integer
            tensor, read with ``.tolist()`` (on GPU a device-to-host sync on every call).
        sampling_locations: (B, Q, H, L, P, 2) normalised (x, y), (0, 0) the top-left corner
            and (1, 1) the bottom-right corner of each level.
        attention_weights: (B, Q, H, L, P).

    Returns:
        (B, Q, H * Dh) in the dtype of ``value``; float16 / bfloat16 inputs are computed in
        float32 (also inside autocast regions).
    """
    level_shapes = _check_inputs(value, spatial_shapes, sampling_locations, attention_weights)
    compute_dtype = torch.promote_types(value.dtype, torch.float32)
    with torch.autocast(device_type=value.device.type, enabled=False):
        output = _GatherDeformableAttention.apply(
            value.to(compute_dtype),
            level_shapes,
            sampling_locations.to(compute_dtype),
            attention_weights.to(compute_dtype),
        )
    return output.to(value.dtype)


def as_level_shapes(spatial_shapes: Union[Tensor, Sequence[Tuple[int, int]]]) -> LevelShapes:
    """
    The (h, w) of every level as a tuple of pairs, from pairs of Python ints (kept as they are:
    sizes taken from ``tensor.shape`` stay symbolic under ``torch.export``) or from an (L, 2)
    tensor, read with ``.tolist()``: a device-to-host sync on GPU and, under tracing, constants
    fixed to the traced sizes. ``torch.jit.trace`` gives ``tensor.shape`` as 0-dim tensors:
    those are read as ints (constants of the trace, as ``.tolist()`` would give). Raises
    ValueError unless it gets (h, w) pairs.
    """
    if isinstance(spatial_shapes, Tensor):
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
            raise ValueError(
                f"spatial_shapes must have shape (L, 2), got {tuple(spatial_shapes.shape)}"
            )
        return tuple((int(h), int(w)) for h, w in spatial_shapes.tolist())
    level_shapes = tuple(
        tuple(int(size) if isinstance(size, Tensor) else size for size in shape)
        for shape in spatial_shapes
    )
    if any(len(shape) != 2 for shape in level_shapes):
        raise ValueError(f"spatial_shapes must be (h, w) pairs, got {list(level_shapes)}")
    return level_shapes


def _check_inputs(
    value: Tensor,
    spatial_shapes: Union[Tensor, Sequence[Tuple[int, int]]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> LevelShapes:
    """Raises ValueError on inconsistent shapes; returns the (h, w) of every level."""
    if value.dim() != 4:
        raise ValueError(f"value must have shape (B, S, H, Dh), got {tuple(value.shape)}")
    batch_size, num_values, num_heads, _ = value.shape
    level_shapes = as_level_shapes(spatial_shapes)
    if sum(h * w for h, w in level_shapes) != num_values:
        raise ValueError(
            f"value has S={num_values} positions but spatial_shapes {list(level_shapes)} "
            f"sum to {sum(h * w for h, w in level_shapes)}"
        )
    if (
        sampling_locations.dim() != 6
        or sampling_locations.shape[0] != batch_size
        or sampling_locations.shape[2:4] != (num_heads, len(level_shapes))
        or sampling_locations.shape[5] != 2
    ):
        raise ValueError(
            f"sampling_locations must have shape (B, Q, H, L, P, 2) = "
            f"({batch_size}, Q, {num_heads}, {len(level_shapes)}, P, 2), "
            f"got {tuple(sampling_locations.shape)}"
        )
    if attention_weights.shape != sampling_locations.shape[:5]:
        raise ValueError(
            f"attention_weights must have shape {tuple(sampling_locations.shape[:5])}, "
            f"got {tuple(attention_weights.shape)}"
        )
    return level_shapes


class _LevelTables:
    """
    Where the level maps lie in the value table (B * S * H, Dh) of rows (image, pixel, head)
    and in the zero-padded table of :func:`_pad_value_maps`, as small tensors indexed by the
    L * P sampling points of a head (level-major), shared by all chunks of sampling points.
    """

    def __init__(
        self,
        level_shapes: Sequence[Tuple[int, int]],
        num_points: int,
        batch_size: int,
        num_heads: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        # an asynchronous copy: from the Python ints, without waiting for the device
        sizes = torch.tensor(level_shapes).to(device, non_blocking=True)
        heights, widths = sizes[:, 0], sizes[:, 1]
        self.padded_size = _padded_size(level_shapes)
        num_values = sum(h * w for h, w in level_shapes)
        num_rows = batch_size * max(self.padded_size, num_values) * num_heads
        self.index_dtype = torch.int32 if num_rows < 2**31 else torch.int64
        heads = torch.arange(num_heads, device=device).view(num_heads, 1)
        self.num_heads = num_heads

        def per_point(level_values: Tensor) -> Tensor:
            """(L,) or (K, L) -> (L * P,) or (K, L * P): the value of each point's level."""
            return level_values.repeat_interleave(num_points, dim=-1)

        # (2, L * P) map sizes (w; h), the same as floats, and the last column; row
        self.extents = per_point(torch.stack([widths, heights])).to(dtype)
        self.half_extents = self.extents / 2
        self.lowest_pixels = torch.full_like(self.extents, -1.0)
        # constants of the pixel arithmetic, filled on the device (a tensor made from a Python
        # number would be copied from the host, and the copy waits for the device)
        self.minus_one = torch.full((), -1.0, dtype=dtype, device=device)
        self.minus_half = torch.full((), -0.5, dtype=dtype, device=device)
        self.last_pixels = per_point(torch.stack([widths, heights]) - 1).to(self.index_dtype)

        # value table: (H, L * P) row of pixel (0, 0) of every head and point of image 0
        level_sizes = heights * widths
        starts = per_point(level_sizes.cumsum(0) - level_sizes)
        self.value_origins = (starts * num_heads + heads).to(self.index_dtype)
        self.value_image_rows = num_values * num_heads
        # (L * P,) rows between vertically adjacent pixels
        self.value_row_steps = per_point(widths * num_heads).to(self.index_dtype)

        # padded table: (H, L * P) row of padded pixel (1, 1), i.e. map pixel (0, 0)
        padded_widths = widths + 3
        padded_level_sizes = (heights + 3) * padded_widths
        origins = padded_level_sizes.cumsum(0) - padded_level_sizes + padded_widths + 1
        self.padded_origins = (per_point(origins) * num_heads + heads).to(self.index_dtype)
        self.padded_image_rows = self.padded_size * num_heads
        self.padded_widths = per_point(padded_widths).to(self.index_dtype)
        # (4, L * P) row offsets of the four corners from the top-left one
        self.corner_offsets = torch.stack(
            [(self.padded_widths * row + column) * num_heads for row, column in _CORNERS]
        ).to(self.index_dtype)


def _padded_size(level_shapes: Sequence[Tuple[int, int]]) -> int:
    """Pixels of the padded maps of one image."""
    return sum((h + 3) * (w + 3) for h, w in level_shapes)


def _pad_value_maps(value: Tensor, level_shapes: Sequence[Tuple[int, int]]) -> Tensor:
    """
    (B, S, H, Dh) -> (B * Sp * H, Dh) table of rows (image, padded pixel, head): every level
    map zero-padded by one row / column before and two after, Sp = sum of (h + 3) * (w + 3).
    """
    batch_size, _, num_heads, head_dim = value.shape
    channels = num_heads * head_dim
    padded = value.new_zeros(batch_size, _padded_size(level_shapes), channels)
    start = padded_start = 0
    for height, width in level_shapes:
        level = padded[:, padded_start : padded_start + (height + 3) * (width + 3)]
        level.view(batch_size, height + 3, width + 3, channels)[
            :, 1 : height + 1, 1 : width + 1
        ] = value[:, start : start + height * width].reshape(batch_size, height, width, channels)
        start += height * width
        padded_start += (height + 3) * (width + 3)
    return padded.view(-1, head_dim)


def _pixel_coordinates(
    sampling_locations: Tensor, tables: _LevelTables, with_outside_mask: bool
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """
    Args:
        sampling_locations: (R, H, L * P, 2) normalised locations (x, y).

    Returns:
        integer_parts: (R, H, 2, L * P) pixel (x; y) of the top-left corner (float), in
            [-1, size].
        frac: (R, H, 2, L * P) position between the left / top and the right / bottom
            corners, in [0, 1).
        outside: (R, H, 2, L * P) bool, True where the coordinate is so far outside the map
            that no corner is inside (it was clamped: no location gradient); None unless
            ``with_outside_mask``.
    """
    # grid_sample's arithmetic (align_corners=False): grid = 2 * location - 1, then
    # pixel = (grid + 1) * size / 2 - 0.5 with one rounding (a fused multiply-add), so that
    # corners are chosen exactly as in the reference; pixel centres are at integers
    locations = sampling_locations.transpose(-1, -2)
    pixels = locations.new_empty(locations.shape)
    torch.add(tables.minus_one, locations, alpha=2, out=pixels).add_(1)
    torch.addcmul(tables.minus_half, pixels, tables.half_extents, out=pixels)
    outside = ((pixels < -1) | (pixels > tables.extents)) if with_outside_mask else None
    pixels = torch.clamp_(pixels, min=tables.lowest_pixels, max=tables.extents)
    # NaN locations keep a NaN fraction (so NaN outputs) but get a valid corner
    integer_parts = pixels.nan_to_num(0.0).floor_()
    return integer_parts, pixels.sub_(integer_parts), outside


def _corner_weights(
    frac: Tensor, attention_weights: Tensor, inside: Optional[Tensor] = None
) -> Tensor:
    """
    (R, H, 4, L * P) weights of the four corners: bilinear weights from ``frac``
    (R, H, 2, L * P) times ``attention_weights`` (R, H, L * P), and zero for the corners
    outside the maps if ``inside`` (R, H, 2, 2, L * P) (axis, first / second corner) is given.
    """
    frac_x, frac_y = frac[:, :, 0], frac[:, :, 1]
    column_weights = [1 - frac_x, frac_x]
    row_weights = [1 - frac_y, frac_y]
    if inside is not None:
        column_weights = [w * inside[:, :, 0, i] for i, w in enumerate(column_weights)]
        row_weights = [w * inside[:, :, 1, i] for i, w in enumerate(row_weights)]
    weights = frac.new_empty(frac.shape[0], frac.shape[1], 4, frac.shape[3])
    for row, row_weight in enumerate(row_weights):
        row_weight = row_weight * attention_weights
        for column, column_weight in enumerate(column_weights):
            torch.mul(row_weight, column_weight, out=weights[:, :, 2 * row + column])
    return weights


def _padded_top_left(integer_parts: Tensor, tables: _LevelTables, images: Tensor) -> Tensor:
    """
    (R, H, L * P) padded-table row of the top-left corners, from the corner pixels
    ``integer_parts`` (R, H, 2, L * P) of R (image, query) pairs of ``images`` (R,).
    """
    integer_parts = integer_parts.to(tables.index_dtype)
    top_left = integer_parts[:, :, 1] * tables.padded_widths
    top_left = top_left.add_(integer_parts[:, :, 0]).mul_(tables.num_heads)
    origins = images.to(tables.index_dtype).mul_(tables.padded_image_rows).view(-1, 1, 1)
    return top_left.add_(tables.padded_origins).add_(origins)


def _clamped_corners(
    integer_parts: Tensor, tables: _LevelTables, images: Tensor
) -> Tuple[Tensor, Tensor]:
    """
    Value-table rows (R, H, 4, L * P) of the four corners, clamped into the maps, from the
    corner pixels ``integer_parts`` (R, H, 2, L * P) of R (image, query) pairs of ``images``
    (R,), and (R, H, 2, 2, L * P) bool: whether the first / second corner along x / y lies in
    the map.
    """
    first = integer_parts.to(tables.index_dtype)
    # (R, H, 2, 2, L * P): first and second corner along x and along y
    corners = torch.stack([first, first + 1], dim=3)
    last_pixels = tables.last_pixels[:, None]
    clamped = torch.clamp(corners, min=torch.zeros_like(last_pixels), max=last_pixels)
    origins = images.to(tables.index_dtype).mul_(tables.value_image_rows).view(-1, 1, 1)
    origins = origins + tables.value_origins
    indices = integer_parts.new_empty(
        (first.shape[0], first.shape[1], 4, first.shape[3]), dtype=tables.index_dtype
    )
    for row in range(2):
        row_starts = torch.addcmul(origins, clamped[:, :, 1, row], tables.value_row_steps)
        for column in range(2):
            torch.add(
                row_starts,
                clamped[:, :, 0, column],
                alpha=tables.num_heads,
                out=indices[:, :, 2 * row + column],
            )
    return indices, clamped == corners


def _corner_validity(inside: Tensor) -> Tensor:
    """(R, H, 4, L * P) whether each corner is in the map, from ``inside`` (R, H, 2, 2, L * P)."""
    return (inside[:, :, 1, :, None] & inside[:, :, 0, None, :]).flatten(2, 3)


def _gathers_from_padded_maps(value: Tensor, attention_weights: Tensor) -> bool:
    """See ``_MIN_POINTS_PER_VALUE_FOR_PADDING``."""
    return attention_weights.numel() >= value.numel() * _MIN_POINTS_PER_VALUE_FOR_PADDING


def _chunks(num_pairs: int, points_per_pair: int) -> Sequence[Tuple[int, int]]:
    """[start, end) ranges of (image, query) pairs with about ``_POINTS_PER_CHUNK`` points."""
    pairs_per_chunk = max(1, _POINTS_PER_CHUNK // max(points_per_pair, 1))
    return [
        (start, min(start + pairs_per_chunk, num_pairs))
        for start in range(0, num_pairs, pairs_per_chunk)
    ]


class _GatherDeformableAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        value: Tensor,
        level_shapes: LevelShapes,
        sampling_locations: Tensor,
        attention_weights: Tensor,
    ) -> Tensor:
        batch_size, _, num_heads, head_dim = value.shape
        _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
        tables = _LevelTables(
            level_shapes, num_points, batch_size, num_heads, value.device, value.dtype
        )
        use_padding = _gathers_from_padded_maps(value, attention_weights)
        if use_padding:
            table = _pad_value_maps(value, level_shapes)
        else:
            table = value.reshape(-1, head_dim)
        # (R, H, L * P, ...) with R = B * Q (image, query) pairs
        locations = sampling_locations.reshape(-1, num_heads, num_levels * num_points, 2)
        weights = attention_weights.reshape(-1, num_heads, num_levels * num_points)
        images = torch.arange(locations.shape[0], device=value.device) // max(num_queries, 1)
        output = value.new_empty(locations.shape[0], num_heads, head_dim)
        for start, end in _chunks(locations.shape[0], num_heads * num_levels * num_points):
            integer_parts, frac, _ = _pixel_coordinates(
                locations[start:end], tables, with_outside_mask=False
            )
            if use_padding:
                top_left = _padded_top_left(integer_parts, tables, images[start:end])
                indices = top_left[:, :, None] + tables.corner_offsets
                corner_weights = _corner_weights(frac, weights[start:end])
            else:
                indices, inside = _clamped_corners(integer_parts, tables, images[start:end])
                corner_weights = _corner_weights(frac, weights[start:end], inside)
            bags = (end - start) * num_heads
            output[start:end] = F.embedding_bag(
                indices.view(bags, -1),
                table,
                per_sample_weights=corner_weights.view(bags, -1),
                mode="sum",
            ).view(end - start, num_heads, head_dim)
        ctx.level_shapes = level_shapes
        ctx.save_for_backward(value, sampling_locations, attention_weights)
        return output.view(batch_size, num_queries, num_heads * head_dim)

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, grad_output: Tensor
    ) -> Tuple[Optional[Tensor], None, Optional[Tensor], Optional[Tensor]]:
        value, sampling_locations, attention_weights = ctx.saved_tensors
        needs_value, _, needs_locations, needs_weights = ctx.needs_input_grad
        batch_size, num_queries, num_heads, num_levels, num_points, _ = sampling_locations.shape
        tables = _LevelTables(
            ctx.level_shapes, num_points, batch_size, num_heads, value.device, value.dtype
        )
        use_padding = _gathers_from_padded_maps(value, attention_weights)
        if use_padding:
            table = _pad_value_maps(value, ctx.level_shapes)
        else:
            table = value.reshape(-1, value.shape[-1])
        locations = sampling_locations.reshape(-1, num_heads, num_levels * num_points, 2)
        weights = attention_weights.reshape(-1, num_heads, num_levels * num_points)
        num_pairs, _, points_per_head = weights.shape
        images = torch.arange(num_pairs, device=locations.device) // max(num_queries, 1)
        # (R * H, Dh)
        grad_output = grad_output.reshape(-1, value.shape[-1]).contiguous()
        grad_locations = torch.empty_like(locations) if needs_locations else None
        grad_weights = torch.empty_like(weights) if needs_locations or needs_weights else None
        # what the value gradient needs of all points: with padded maps the top-left corners and
        # fractions, with clamped corners the corners and their weights
        if needs_value and use_padding:
            top_lefts = locations.new_empty(weights.shape, dtype=tables.index_dtype)
            fracs = locations.new_empty(num_pairs, num_heads, 2, points_per_head)
        elif needs_value:
            corners_shape = (num_pairs, num_heads, 4, points_per_head)
            all_corners = locations.new_empty(corners_shape, dtype=tables.index_dtype)
            all_corner_weights = locations.new_empty(corners_shape)
        chunks = _chunks(num_pairs, num_heads * num_levels * num_points)
        dots = _CornerDots(
            table,
            corners_per_bag=4 * points_per_head,
            max_bags=max(((end - start) * num_heads for start, end in chunks), default=0),
            index_dtype=tables.index_dtype,
        )
        for start, end in chunks:
            integer_parts, frac, outside = _pixel_coordinates(
                locations[start:end], tables, needs_locations
            )
            if use_padding:
                top_left = _padded_top_left(integer_parts, tables, images[start:end])
                indices = top_left[:, :, None] + tables.corner_offsets
                if needs_value:
                    top_lefts[start:end] = top_left
                    fracs[start:end] = frac
            else:
                indices, inside = _clamped_corners(integer_parts, tables, images[start:end])
                if needs_value:
                    all_corners[start:end] = indices
                    all_corner_weights[start:end] = _corner_weights(
                        frac, weights[start:end], inside
                    )
            if grad_weights is None:
                continue
            corner_dots = dots(indices, grad_output[start * num_heads : end * num_heads])
            if not use_padding:
                # as if the corners outside the maps read zeros
                corner_dots = corner_dots.mul_(_corner_validity(inside))
            _location_and_weight_grads(
                corner_dots,
                frac,
                outside,
                weights[start:end],
                tables.extents,
                grad_weights[start:end],
                grad_locations[start:end] if needs_locations else None,
            )
        grad_value = None
        if needs_value and use_padding:
            grad_value = _value_grad_from_top_left(
                top_lefts, fracs, weights, grad_output, value.shape, ctx.level_shapes
            )
        elif needs_value:
            grad_value = _value_grad_from_corners(
                all_corners, all_corner_weights, grad_output, value.shape
            )
        if grad_weights is not None:
            grad_weights = grad_weights.view_as(attention_weights) if needs_weights else None
        if grad_locations is not None:
            grad_locations = grad_locations.view_as(sampling_locations)
        return grad_value, None, grad_locations, grad_weights


class _CornerDots:
    """
    Dot products of output gradients with the values at the corners of the sampling points:
    the per-sample-weight gradient of ``embedding_bag``, here with fixed-size bags.
    """

    def __init__(
        self,
        table: Tensor,
        *,
        corners_per_bag: int,
        max_bags: int,
        index_dtype: torch.dtype,
    ):
        self.table = table
        self.corners_per_bag = corners_per_bag
        device = table.device
        # embedding_bag's bookkeeping, in the dtype of the indices: first corner of every bag
        # and bag of every corner
        self.bag_starts = torch.arange(
            0, max_bags * corners_per_bag, corners_per_bag, device=device, dtype=index_dtype
        )
        self.corner_bags = torch.arange(max_bags, device=device, dtype=index_dtype)
        self.corner_bags = self.corner_bags.repeat_interleave(corners_per_bag)

    def __call__(self, corner_indices: Tensor, grad_output: Tensor) -> Tensor:
        """
        Args:
            corner_indices: (R, H, 4, L * P) table rows of the corners of R * H bags.
            grad_output: (R * H, Dh) output gradient of every bag.

        Returns:
            (R, H, 4, L * P) dot products.
        """
        num_bags = grad_output.shape[0]
        dots = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            grad_output,
            self.table,
            corner_indices.reshape(-1),
            self.bag_starts[:num_bags],
            self.corner_bags[: num_bags * self.corners_per_bag],
            0,  # mode "sum"
            -1,  # no padding index
        )
        return dots.view(corner_indices.shape)


def _location_and_weight_grads(
    dots: Tensor,
    frac: Tensor,
    outside: Optional[Tensor],
    attention_weights: Tensor,
    extents: Tensor,
    grad_weights: Tensor,
    grad_locations: Optional[Tensor],
) -> None:
    """
    Writes the gradients of the attention weights (R, H, L * P) and, unless None, of the
    sampling locations (R, H, L * P, 2) of a chunk, given its corner dot products
    (R, H, 4, L * P), fractions and ``outside`` mask (R, H, 2, L * P) and map sizes
    ``extents`` (2, L * P).
    """
    frac_x, frac_y = frac[:, :, 0], frac[:, :, 1]
    top = torch.lerp(dots[:, :, 0], dots[:, :, 1], frac_x)
    bottom = torch.lerp(dots[:, :, 2], dots[:, :, 3], frac_x)
    torch.lerp(top, bottom, frac_y, out=grad_weights)
    if grad_locations is None:
        return
    # derivatives of the sample with respect to the pixel coordinates, times the attention
    # weight and d(pixel) / d(location) = map size; zero where the coordinate was clamped
    d_dx = torch.lerp(dots[:, :, 1] - dots[:, :, 0], dots[:, :, 3] - dots[:, :, 2], frac_y)
    planar = torch.stack([d_dx, bottom.sub_(top)], dim=2).mul_(extents)
    planar.mul_(attention_weights[:, :, None]).masked_fill_(outside, 0.0)
    grad_locations.copy_(planar.transpose(-1, -2))


def _value_grad_from_top_left(
    top_left: Tensor,
    frac: Tensor,
    attention_weights: Tensor,
    grad_output: Tensor,
    value_shape: torch.Size,
    level_shapes: Sequence[Tuple[int, int]],
) -> Tensor:
    """
    (B, S, H, Dh) value gradient, from the top-left corner rows (R, H, L * P), fractions
    (R, H, 2, L * P) and attention weights (R, H, L * P) of all sampling points and the output
    gradient (R * H, Dh). Points are sorted by their top-left corner; for each corner position
    one ``embedding_bag`` sums the weighted output gradients of the points of every padded
    pixel, and the four sums are added with the corner's offset.
    """
    batch_size, _, num_heads, head_dim = value_shape
    padded_size = _padded_size(level_shapes)
    top_left = top_left.reshape(-1)
    points_per_bag = attention_weights.shape[2]
    order = torch.argsort(top_left, stable=True)
    counts = torch.bincount(top_left, minlength=batch_size * padded_size * num_heads)
    pixel_offsets = counts.cumsum(0).sub_(counts)
    point_bags = torch.div(order, points_per_bag, rounding_mode="floor")
    frac_x = frac[:, :, 0].reshape(-1).index_select(0, order)
    frac_y = frac[:, :, 1].reshape(-1).index_select(0, order)
    weights = attention_weights.reshape(-1).index_select(0, order)
    bottom = weights * frac_y
    top = weights.sub_(bottom)
    top_right, bottom_right = top * frac_x, bottom * frac_x
    corner_weights = (top - top_right, top_right, bottom - bottom_right, bottom_right)
    # (B, Sp, H * Dh): gradient of the padded value maps
    grad_padded = None
    for (row_offset, column_offset), weights in zip(_CORNERS, corner_weights):
        from_corner = F.embedding_bag(
            point_bags, grad_output, pixel_offsets, per_sample_weights=weights, mode="sum"
        ).view(batch_size, padded_size, num_heads * head_dim)
        if grad_padded is None:
            grad_padded = from_corner
            continue
        padded_start = 0
        for height, width in level_shapes:
            # the corner of top-left pixel p is pixel p + shift, within the same padded level
            shift = row_offset * (width + 3) + column_offset
            padded_end = padded_start + (height + 3) * (width + 3)
            grad_padded[:, padded_start + shift : padded_end] += from_corner[
                :, padded_start : padded_end - shift
            ]
            padded_start = padded_end
    grad_value = grad_output.new_empty(value_shape)
    start = padded_start = 0
    for height, width in level_shapes:
        padded_level = grad_padded[:, padded_start : padded_start + (height + 3) * (width + 3)]
        padded_level = padded_level.view(batch_size, height + 3, width + 3, num_heads * head_dim)
        grad_value[:, start : start + height * width].view(
            batch_size, height, width, num_heads * head_dim
        ).copy_(padded_level[:, 1 : height + 1, 1 : width + 1])
        start += height * width
        padded_start += (height + 3) * (width + 3)
    return grad_value


def _value_grad_from_corners(
    corners: Tensor, corner_weights: Tensor, grad_output: Tensor, value_shape: torch.Size
) -> Tensor:
    """
    (B, S, H, Dh) value gradient from the value-table rows (R, H, 4, L * P) of all corners,
    their weights (R, H, 4, L * P) and the output gradient (R * H, Dh): corners sorted by row,
    one ``embedding_bag`` sums the weighted output gradients reaching every row.
    """
    corners_per_bag = corners.shape[2] * corners.shape[3]
    rows = corners.reshape(-1)
    order = torch.argsort(rows, stable=True)
    touched_rows, counts = torch.unique_consecutive(rows[order], return_counts=True)
    sums = F.embedding_bag(
        torch.div(order, corners_per_bag, rounding_mode="floor"),
        grad_output,
        counts.cumsum(0).sub_(counts),
        per_sample_weights=corner_weights.reshape(-1)[order],
        mode="sum",
    )
    grad_value = grad_output.new_zeros(value_shape)
    grad_value.view(-1, value_shape[-1]).index_copy_(0, touched_rows.long(), sums)
    return grad_value
