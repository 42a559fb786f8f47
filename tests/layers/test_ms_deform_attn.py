import math
from unittest import mock

import pytest
import torch

from codetr.layers import (
    MultiScaleDeformableAttention,
    as_level_shapes,
    check_level_shapes,
    multi_scale_deformable_attention,
)
from codetr.layers import ms_deform_attn

from ..host_reads import record_host_reads

SPATIAL_SHAPES = torch.tensor([[3, 4], [2, 2]])
LEVEL_START_INDEX = torch.tensor([0, 12])
NUM_VALUES = 16


def _bilinear(feature, x, y):
    """
    feature (h, w, C); (x, y) pixel coordinates with pixel centres at integers. Explicit
    bilinear interpolation of the four neighbours, zero outside the map.
    """
    height, width, channels = feature.shape
    x0, y0 = math.floor(float(x.detach())), math.floor(float(y.detach()))
    fx, fy = x - x0, y - y0
    result = feature.new_zeros(channels)
    for yi, wy in ((y0, 1 - fy), (y0 + 1, fy)):
        for xi, wx in ((x0, 1 - fx), (x0 + 1, fx)):
            if 0 <= yi < height and 0 <= xi < width:
                result = result + wy * wx * feature[yi, xi]
    return result


def _dense_deformable_attention(value, spatial_shapes, sampling_locations, attention_weights):
    """Direct computation: loops over every sampling point (align_corners=False convention)."""
    batch_size, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    starts = [0]
    for h, w in spatial_shapes.tolist():
        starts.append(starts[-1] + h * w)
    outputs = []
    for b in range(batch_size):
        per_query = []
        for q in range(num_queries):
            per_head = []
            for head in range(num_heads):
                acc = value.new_zeros(head_dim)
                for level, (h, w) in enumerate(spatial_shapes.tolist()):
                    feature = value[b, starts[level] : starts[level + 1], head].reshape(h, w, -1)
                    for p in range(num_points):
                        loc_x, loc_y = sampling_locations[b, q, head, level, p]
                        # normalised [0, 1] -> pixel coordinates, centres at integers
                        sample = _bilinear(feature, loc_x * w - 0.5, loc_y * h - 0.5)
                        acc = acc + attention_weights[b, q, head, level, p] * sample
                per_head.append(acc)
            per_query.append(torch.cat(per_head))
        outputs.append(torch.stack(per_query))
    return torch.stack(outputs)


def _random_inputs(dtype=torch.float32, batch_size=2, num_queries=3, num_heads=2, head_dim=3):
    generator = torch.Generator().manual_seed(0)
    value = torch.randn(batch_size, NUM_VALUES, num_heads, head_dim, generator=generator)
    # some points partly or entirely outside the maps
    locations = torch.rand(batch_size, num_queries, num_heads, 2, 2, 2, generator=generator)
    locations = locations * 1.6 - 0.3
    locations[0, 0, 0, 0, 0] = torch.tensor([1.4, 0.5])
    weights = torch.rand(batch_size, num_queries, num_heads, 2, 2, generator=generator)
    return value.to(dtype), locations.to(dtype), weights.to(dtype)


def test_function_matches_dense_computation():
    value, locations, weights = _random_inputs()
    out = multi_scale_deformable_attention(value, SPATIAL_SHAPES, locations, weights)
    assert out.shape == (2, 3, 6)
    expected = _dense_deformable_attention(value, SPATIAL_SHAPES, locations, weights)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_function_hand_case_pixel_centre_and_outside():
    # one level 2x2, one head, one channel; point at the centre of pixel (row 1, col 0)
    value = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
    shapes = torch.tensor([[2, 2]])
    locations = torch.tensor([[0.25, 0.75], [0.5, 0.5], [1.5, 0.5]]).view(1, 1, 1, 1, 3, 2)
    weights = torch.tensor([1.0, 10.0, 100.0]).view(1, 1, 1, 1, 3)
    out = multi_scale_deformable_attention(value, shapes, locations, weights)
    # 3 (exact pixel) + 10 * mean of all four (2.5) + 100 * 0 (outside)
    torch.testing.assert_close(out, torch.tensor([[[28.0]]]))


def test_function_gradients_match_dense_computation():
    value, locations, weights = _random_inputs(dtype=torch.float64)
    inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
    dense_inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
    grad_output = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(1)).double()
    out = multi_scale_deformable_attention(inputs[0], SPATIAL_SHAPES, inputs[1], inputs[2])
    expected = _dense_deformable_attention(
        dense_inputs[0], SPATIAL_SHAPES, dense_inputs[1], dense_inputs[2]
    )
    grads = torch.autograd.grad(out, inputs, grad_output)
    expected_grads = torch.autograd.grad(expected, dense_inputs, grad_output)
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grad, expected_grad)


def test_function_gradcheck():
    value, locations, weights = _random_inputs(
        dtype=torch.float64, batch_size=1, num_queries=2, head_dim=2
    )
    inputs = tuple(t.requires_grad_() for t in (value, locations, weights))
    assert torch.autograd.gradcheck(
        lambda v, loc, w: multi_scale_deformable_attention(v, SPATIAL_SHAPES, loc, w), inputs
    )


def _module_with_random_weights(**kwargs):
    torch.manual_seed(0)
    module = MultiScaleDeformableAttention(**kwargs)
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(std=0.5)
    return module


def _expected_module_output(module, query, value, reference_points, padding_mask):
    """Recomputes the module's output step by step, with the location formula per level."""
    batch_size, num_queries, _ = query.shape
    heads, levels, points = module.num_heads, module.num_levels, module.num_points
    projected = module.value_proj(value)
    if padding_mask is not None:
        projected = projected * (~padding_mask)[..., None]
    projected = projected.view(batch_size, value.shape[1], heads, -1)
    offsets = module.sampling_offsets(query).view(batch_size, num_queries, heads, levels, points, 2)
    logits = module.attention_weights(query).view(batch_size, num_queries, heads, levels * points)
    weights = torch.softmax(logits, -1).view(batch_size, num_queries, heads, levels, points)
    locations = torch.empty_like(offsets)
    for level, (h, w) in enumerate(SPATIAL_SHAPES.tolist()):
        ref = reference_points[:, :, None, level, None, :]
        off = offsets[:, :, :, level]
        if reference_points.shape[-1] == 2:
            locations[:, :, :, level, :, 0] = ref[..., 0] + off[..., 0] / w
            locations[:, :, :, level, :, 1] = ref[..., 1] + off[..., 1] / h
        else:
            locations[:, :, :, level] = ref[..., :2] + off / points * ref[..., 2:] / 2
    attended = _dense_deformable_attention(projected, SPATIAL_SHAPES, locations, weights)
    return module.output_proj(attended)


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_matches_step_by_step_computation(ref_dim):
    module = _module_with_random_weights(embed_dim=8, num_heads=2, num_levels=2, num_points=3)
    generator = torch.Generator().manual_seed(2)
    query = torch.randn(2, 3, 8, generator=generator)
    value = torch.randn(2, NUM_VALUES, 8, generator=generator)
    reference_points = torch.rand(2, 3, 2, ref_dim, generator=generator)
    if ref_dim == 4:
        reference_points[..., 2:] = reference_points[..., 2:] * 0.5 + 0.1
    padding_mask = torch.zeros(2, NUM_VALUES, dtype=torch.bool)
    padding_mask[1, [2, 3, 6, 7, 10, 11, 13, 15]] = True  # right halves of both levels
    with torch.no_grad():
        out = module(
            query, value, reference_points, SPATIAL_SHAPES, LEVEL_START_INDEX, padding_mask
        )
        expected = _expected_module_output(module, query, value, reference_points, padding_mask)
        out_no_mask = module(query, value, reference_points, SPATIAL_SHAPES, LEVEL_START_INDEX)
        expected_no_mask = _expected_module_output(module, query, value, reference_points, None)
    assert out.shape == (2, 3, 8)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_no_mask, expected_no_mask, rtol=1e-5, atol=1e-5)
    # the mask only affects image 1
    torch.testing.assert_close(out[0], out_no_mask[0])
    assert not torch.allclose(out[1], out_no_mask[1])


def test_module_ignores_values_at_padding():
    module = _module_with_random_weights(embed_dim=8, num_heads=2, num_levels=2, num_points=2)
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(1, 4, 8, generator=generator)
    value = torch.randn(1, NUM_VALUES, 8, generator=generator)
    reference_points = torch.rand(1, 4, 2, 2, generator=generator)
    padding_mask = torch.zeros(1, NUM_VALUES, dtype=torch.bool)
    padding_mask[0, 12:] = True
    changed = value.clone()
    changed[0, 12:] += 100.0
    args = (reference_points, SPATIAL_SHAPES, LEVEL_START_INDEX, padding_mask)
    with torch.no_grad():
        torch.testing.assert_close(module(query, value, *args), module(query, changed, *args))


def test_module_init():
    module = MultiScaleDeformableAttention(embed_dim=16, num_heads=8, num_levels=2, num_points=3)
    assert module.sampling_offsets.weight.shape == (8 * 2 * 3 * 2, 16)
    assert module.attention_weights.weight.shape == (8 * 2 * 3, 16)
    assert module.value_proj.weight.shape == (16, 16)
    assert module.output_proj.weight.shape == (16, 16)
    assert torch.count_nonzero(module.sampling_offsets.weight) == 0
    assert torch.count_nonzero(module.attention_weights.weight) == 0
    assert torch.count_nonzero(module.attention_weights.bias) == 0
    # directions of the 8 heads, the larger component scaled to 1, then point p at p + 1 steps
    directions = torch.tensor(
        [[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]],
        dtype=torch.float32,
    )
    bias = module.sampling_offsets.bias.view(8, 2, 3, 2)
    for level in range(2):
        for point in range(3):
            torch.testing.assert_close(bias[:, level, point], directions * (point + 1))
    bound = math.sqrt(6 / (16 + 16))  # xavier uniform, gain 1
    for proj in (module.value_proj, module.output_proj):
        assert torch.count_nonzero(proj.bias) == 0
        assert proj.weight.abs().max() <= bound
        assert proj.weight.std() > bound / 4


def test_module_at_init_samples_the_bias_grid():
    # zero attention logits give uniform weights; zero offset weights give the bias grid
    module = MultiScaleDeformableAttention(embed_dim=4, num_heads=4, num_levels=1, num_points=1)
    with torch.no_grad():
        module.value_proj.weight.copy_(torch.eye(4))
        module.output_proj.weight.copy_(torch.eye(4))
    # 3x3 map, one channel per head; reference at the centre pixel
    value = torch.arange(9, dtype=torch.float32)[None, :, None].repeat(1, 1, 4)
    query = torch.randn(1, 1, 4)
    reference_points = torch.tensor([0.5, 0.5]).view(1, 1, 1, 2)
    with torch.no_grad():
        out = module(query, value, reference_points, torch.tensor([[3, 3]]), torch.tensor([0]))
    # the heads step one pixel along +x, +y (down the rows), -x and -y
    torch.testing.assert_close(out, torch.tensor([[[5.0, 7.0, 3.0, 1.0]]]))


def test_module_invalid_arguments():
    with pytest.raises(ValueError, match="divisible"):
        MultiScaleDeformableAttention(embed_dim=10, num_heads=4)
    module = MultiScaleDeformableAttention(embed_dim=8, num_heads=2, num_levels=2, num_points=1)
    query = torch.zeros(1, 3, 8)
    value = torch.zeros(1, NUM_VALUES, 8)
    refs = torch.zeros(1, 3, 2, 2)
    with pytest.raises(ValueError, match="sum to"):
        module(query, value[:, :-1], refs, SPATIAL_SHAPES, LEVEL_START_INDEX)
    with pytest.raises(ValueError, match="reference_points"):
        module(query, value, torch.zeros(1, 3, 2, 3), SPATIAL_SHAPES, LEVEL_START_INDEX)
    with pytest.raises(ValueError, match="reference_points"):
        module(query, value, torch.zeros(1, 3, 1, 2), SPATIAL_SHAPES, LEVEL_START_INDEX)
    with pytest.raises(ValueError, match="query"):
        module(torch.zeros(1, 3, 4), value, refs, SPATIAL_SHAPES, LEVEL_START_INDEX)
    with pytest.raises(ValueError, match="value must"):
        module(query, torch.zeros(2, NUM_VALUES, 8), refs, SPATIAL_SHAPES, LEVEL_START_INDEX)
    with pytest.raises(ValueError, match="spatial_shapes"):
        module(query, value, refs, SPATIAL_SHAPES[:1], LEVEL_START_INDEX)
    with pytest.raises(ValueError, match="level_start_index"):
        module(query, value, refs, SPATIAL_SHAPES, LEVEL_START_INDEX[:1])
    with pytest.raises(ValueError, match="value_padding_mask"):
        module(query, value, refs, SPATIAL_SHAPES, LEVEL_START_INDEX, torch.zeros(1, 15).bool())
    with pytest.raises(ValueError, match="value_padding_mask"):
        module(query, value, refs, SPATIAL_SHAPES, LEVEL_START_INDEX, torch.zeros(1, 16))


# ------------------------------------------------------------------ level shapes as Python ints
LEVEL_SHAPES = ((3, 4), (2, 2))


def _count_level_checks(monkeypatch):
    """Calls of check_level_shapes made from now on, by the attention module."""
    checks = mock.Mock(wraps=check_level_shapes)
    monkeypatch.setattr(ms_deform_attn, "check_level_shapes", checks)
    return checks


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_takes_python_level_shapes_without_checking_or_reading_them(monkeypatch, ref_dim):
    module = _module_with_random_weights(embed_dim=8, num_heads=2, num_levels=2, num_points=3)
    generator = torch.Generator().manual_seed(4)
    query = torch.randn(2, 3, 8, generator=generator)
    value = torch.randn(2, NUM_VALUES, 8, generator=generator)
    reference_points = torch.rand(2, 3, 2, ref_dim, generator=generator) * 0.5 + 0.2
    padding_mask = torch.zeros(2, NUM_VALUES, dtype=torch.bool)
    padding_mask[1, 12:] = True
    args = (query, value, reference_points, SPATIAL_SHAPES, LEVEL_START_INDEX, padding_mask)
    with torch.no_grad():
        expected = module(*args)
        checks, reads = _count_level_checks(monkeypatch), record_host_reads(monkeypatch)
        out = module(*args, level_shapes=LEVEL_SHAPES)
        assert checks.call_count == 0 and reads == []
        # without them, the module derives them from the tensor and checks them on every call
        module(*args)
        module(*args)
    assert torch.equal(out, expected)
    assert checks.call_count == 2 and reads == ["tolist", "tolist"]
    checks.assert_called_with(LEVEL_SHAPES, NUM_VALUES, SPATIAL_SHAPES, LEVEL_START_INDEX)


def test_reference_function_takes_python_level_shapes():
    value, locations, weights = _random_inputs()
    expected = multi_scale_deformable_attention(value, SPATIAL_SHAPES, locations, weights)
    out = multi_scale_deformable_attention(value, [[3, 4], [2, 2]], locations, weights)
    assert torch.equal(out, expected)


def test_check_level_shapes():
    checked = check_level_shapes(
        [[3, 4], torch.Size([2, 2])], 16, SPATIAL_SHAPES, LEVEL_START_INDEX
    )
    assert checked == LEVEL_SHAPES
    assert as_level_shapes(SPATIAL_SHAPES) == LEVEL_SHAPES
    with pytest.raises(
        ValueError, match=r"S=15 positions but the level shapes \[\(3, 4\), \(2, 2\)\] sum to 16"
    ):
        check_level_shapes(LEVEL_SHAPES, 15, SPATIAL_SHAPES, LEVEL_START_INDEX)
    with pytest.raises(
        ValueError, match=r"spatial_shapes must have shape \(1, 2\) .* got \(2, 2\)"
    ):
        check_level_shapes(LEVEL_SHAPES[:1], 12, SPATIAL_SHAPES, LEVEL_START_INDEX[:1])
    with pytest.raises(ValueError, match=r"level_start_index must have shape \(2,\) .* got \(1,\)"):
        check_level_shapes(LEVEL_SHAPES, 16, SPATIAL_SHAPES, LEVEL_START_INDEX[:1])
    with pytest.raises(ValueError, match=r"\(h, w\) pairs, got \[\(3, 4, 1\), \(2, 2\)\]"):
        check_level_shapes([(3, 4, 1), (2, 2)], 16, SPATIAL_SHAPES, LEVEL_START_INDEX)
    with pytest.raises(ValueError, match=r"spatial_shapes must have shape \(L, 2\), got \(4,\)"):
        as_level_shapes(SPATIAL_SHAPES.view(-1))


def test_module_rejects_level_shapes_of_another_level_count():
    module = MultiScaleDeformableAttention(embed_dim=8, num_heads=2, num_levels=2, num_points=1)
    args = (torch.zeros(1, 3, 8), torch.zeros(1, NUM_VALUES, 8), torch.zeros(1, 3, 2, 2))
    with pytest.raises(
        ValueError, match=r"level_shapes must have 2 \(h, w\) pairs, got \[\(3, 4\)\]"
    ):
        module(*args, SPATIAL_SHAPES, LEVEL_START_INDEX, level_shapes=LEVEL_SHAPES[:1])
