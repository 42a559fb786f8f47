import math

import pytest
import torch

from codetr.layers import MultiScaleDeformableAttention, multi_scale_deformable_attention
from codetr.layers import ms_deform_attn, ms_deform_attn_fast
from codetr.layers.ms_deform_attn_fast import multi_scale_deformable_attention_fast

# levels with one row, one column and a single pixel exercise the borders of the maps
LEVEL_SHAPES = {
    "two_levels": [(3, 4), (2, 2)],
    "thin_levels": [(1, 5), (4, 1), (1, 1)],
    "one_level": [(6, 7)],
}


@pytest.fixture(params=["padded", "clamped"])
def gather_scheme(request, monkeypatch):
    """Runs a test with the forward pass gathering from padded maps, then from clamped corners."""
    threshold = 0.0 if request.param == "padded" else math.inf
    monkeypatch.setattr(ms_deform_attn_fast, "_MIN_POINTS_PER_VALUE_FOR_PADDING", threshold)
    return request.param


def _random_inputs(
    level_shapes,
    *,
    batch_size=2,
    num_queries=5,
    num_heads=3,
    head_dim=4,
    num_points=3,
    dtype=torch.float64,
    seed=0,
):
    generator = torch.Generator().manual_seed(seed)
    num_values = sum(h * w for h, w in level_shapes)
    num_levels = len(level_shapes)
    value = torch.randn(batch_size, num_values, num_heads, head_dim, generator=generator)
    # from 0.4 before to 0.4 after the maps: points inside, across the borders and outside
    locations = torch.rand(
        batch_size, num_queries, num_heads, num_levels, num_points, 2, generator=generator
    )
    locations = locations * 1.8 - 0.4
    weights = torch.rand(
        batch_size, num_queries, num_heads, num_levels, num_points, generator=generator
    )
    shapes = torch.tensor(level_shapes)
    return value.to(dtype), shapes, locations.to(dtype), weights.to(dtype)


def _values_and_grads(function, value, shapes, locations, weights, grad_output, requires_grad):
    """Output and the gradients of the inputs flagged in ``requires_grad`` (others None)."""
    inputs = [
        t.detach().clone().requires_grad_(flag)
        for t, flag in zip((value, locations, weights), requires_grad)
    ]
    out = function(inputs[0], shapes, inputs[1], inputs[2])
    wanted = [t for t in inputs if t.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, grad_output))
    return out, [next(grads) if t.requires_grad else None for t in inputs]


@pytest.mark.parametrize("name", sorted(LEVEL_SHAPES))
def test_values_and_gradients_match_reference_float64(name, gather_scheme):
    value, shapes, locations, weights = _random_inputs(LEVEL_SHAPES[name])
    grad_output = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(1)).double()
    args = (value, shapes, locations, weights, grad_output, (True, True, True))
    out, grads = _values_and_grads(multi_scale_deformable_attention_fast, *args)
    expected, expected_grads = _values_and_grads(multi_scale_deformable_attention, *args)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for grad, expected_grad in zip(grads, expected_grads):
        assert expected_grad.abs().sum() > 0
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", sorted(LEVEL_SHAPES))
def test_values_and_gradients_match_reference_float32(name, gather_scheme):
    value, shapes, locations, weights = _random_inputs(
        LEVEL_SHAPES[name], num_queries=40, num_heads=2, head_dim=8, dtype=torch.float32, seed=2
    )
    grad_output = torch.randn(2, 40, 16, generator=torch.Generator().manual_seed(3))
    args = (value, shapes, locations, weights, grad_output, (True, True, True))
    out, grads = _values_and_grads(multi_scale_deformable_attention_fast, *args)
    expected, expected_grads = _values_and_grads(multi_scale_deformable_attention, *args)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "requires_grad", [(True, False, False), (False, True, False), (False, False, True)]
)
def test_gradient_of_each_input_alone(requires_grad):
    value, shapes, locations, weights = _random_inputs(LEVEL_SHAPES["two_levels"])
    grad_output = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(4)).double()
    args = (value, shapes, locations, weights, grad_output, requires_grad)
    _, grads = _values_and_grads(multi_scale_deformable_attention_fast, *args)
    _, expected_grads = _values_and_grads(multi_scale_deformable_attention, *args)
    for grad, expected_grad, flag in zip(grads, expected_grads, requires_grad):
        assert (grad is not None) == flag
        if flag:
            torch.testing.assert_close(grad, expected_grad)


def test_gradcheck():
    value, shapes, locations, weights = _random_inputs(
        LEVEL_SHAPES["thin_levels"],
        batch_size=1,
        num_queries=2,
        num_heads=2,
        head_dim=2,
        num_points=2,
    )
    inputs = tuple(t.requires_grad_() for t in (value, locations, weights))
    assert torch.autograd.gradcheck(
        lambda v, loc, w: multi_scale_deformable_attention_fast(v, shapes, loc, w), inputs
    )


def test_hand_case_pixel_centre_and_outside(gather_scheme):
    # one level 2x2, one head, one channel; point at the centre of pixel (row 1, col 0)
    value = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
    shapes = torch.tensor([[2, 2]])
    locations = torch.tensor([[0.25, 0.75], [0.5, 0.5], [1.5, 0.5]]).view(1, 1, 1, 1, 3, 2)
    weights = torch.tensor([1.0, 10.0, 100.0]).view(1, 1, 1, 1, 3)
    out = multi_scale_deformable_attention_fast(value, shapes, locations, weights)
    # 3 (exact pixel) + 10 * mean of all four (2.5) + 100 * 0 (outside)
    torch.testing.assert_close(out, torch.tensor([[[28.0]]]))


def test_points_on_borders_and_far_outside_match_reference(gather_scheme):
    # x pixel coordinates (x = loc * w - 0.5 with w = 4): -1 (last one with a corner inside),
    # -0.5 (map edge), 0 and 3 (first / last pixel centres), 3.5, 4 (no corner inside any
    # more), far outside on both sides, and the same for y (h = 3)
    pixel_x = torch.tensor([-1.0, -0.5, 0.0, 3.0, 3.5, 4.0, -7.0, 9.0, 1.25])
    pixel_y = torch.tensor([0.5, -1.0, 2.0, -0.5, 2.5, 3.0, 1.0, -20.0, 12.0])
    locations = torch.stack([(pixel_x + 0.5) / 4, (pixel_y + 0.5) / 3], -1).double()
    locations = locations.view(1, 1, 1, 1, 9, 2)
    generator = torch.Generator().manual_seed(5)
    value = torch.randn(1, 12, 1, 3, generator=generator).double()
    weights = torch.rand(1, 1, 1, 1, 9, generator=generator).double()
    shapes = torch.tensor([[3, 4]])
    grad_output = torch.randn(1, 1, 3, generator=generator).double()
    args = (value, shapes, locations, weights, grad_output, (True, True, True))
    out, grads = _values_and_grads(multi_scale_deformable_attention_fast, *args)
    expected, expected_grads = _values_and_grads(multi_scale_deformable_attention, *args)
    torch.testing.assert_close(out, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)
    # points without any corner inside have zero location and weight gradients
    for index in (5, 6, 7, 8):
        assert torch.count_nonzero(grads[1][..., index, :]) == 0
        assert grads[2][..., index] == 0


@pytest.mark.parametrize("location, width", [(0.7694610357284546, 167), (0.16499999165534973, 100)])
def test_corner_choice_matches_grid_sample_rounding(location, width, gather_scheme):
    # float32 pixel coordinates just below an integer when (2 * location - 1 + 1) * width / 2
    # - 0.5 is rounded once (grid_sample's fused multiply-add), exactly the integer when rounded
    # twice: the location gradient jumps there, so it tells which corners were taken
    generator = torch.Generator().manual_seed(11)
    value = torch.randn(1, width, 1, 1, generator=generator)
    locations = torch.tensor([location, 0.5]).view(1, 1, 1, 1, 1, 2)
    weights = torch.ones(1, 1, 1, 1, 1)
    shapes = torch.tensor([[1, width]])
    grad_output = torch.ones(1, 1, 1)
    args = (value, shapes, locations, weights, grad_output, (False, True, False))
    _, (_, grad, _) = _values_and_grads(multi_scale_deformable_attention_fast, *args)
    _, (_, expected_grad, _) = _values_and_grads(multi_scale_deformable_attention, *args)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("points_per_chunk", [36, 5])
def test_several_chunks(monkeypatch, points_per_chunk, gather_scheme):
    # 2 heads * 2 levels * 3 points per (image, query): 10 pairs in chunks of 3, the last one
    # partial, or one pair per chunk when a pair has more points than a chunk
    monkeypatch.setattr(ms_deform_attn_fast, "_POINTS_PER_CHUNK", points_per_chunk)
    value, shapes, locations, weights = _random_inputs(
        LEVEL_SHAPES["two_levels"], num_queries=5, num_heads=2
    )
    grad_output = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(6)).double()
    args = (value, shapes, locations, weights, grad_output, (True, True, True))
    out, grads = _values_and_grads(multi_scale_deformable_attention_fast, *args)
    expected, expected_grads = _values_and_grads(multi_scale_deformable_attention, *args)
    torch.testing.assert_close(out, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


def test_non_contiguous_inputs(gather_scheme):
    value, shapes, locations, weights = _random_inputs(LEVEL_SHAPES["two_levels"])
    expected = multi_scale_deformable_attention(value, shapes, locations, weights)
    # same numbers, other memory layouts
    value_t = value.transpose(0, 1).contiguous().transpose(0, 1)
    locations_t = locations.permute(5, 0, 1, 2, 3, 4).contiguous().permute(1, 2, 3, 4, 5, 0)
    weights_t = torch.stack([weights, weights], -1)[..., 0]
    assert not (value_t.is_contiguous() or locations_t.is_contiguous() or weights_t.is_contiguous())
    out = multi_scale_deformable_attention_fast(value_t, shapes, locations_t, weights_t)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_computed_in_float32(dtype, gather_scheme):
    value, shapes, locations, weights = _random_inputs(
        LEVEL_SHAPES["two_levels"], num_queries=20, dtype=dtype, seed=7
    )
    grad_output = torch.randn(2, 20, 12, generator=torch.Generator().manual_seed(8)).to(dtype)
    out, grads = _values_and_grads(
        multi_scale_deformable_attention_fast,
        value,
        shapes,
        locations,
        weights,
        grad_output,
        (True, True, True),
    )
    # the reference on the same numbers in float32, rounded once at the end
    expected, expected_grads = _values_and_grads(
        multi_scale_deformable_attention,
        value.float(),
        shapes,
        locations.float(),
        weights.float(),
        grad_output.float(),
        (True, True, True),
    )
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected.to(dtype))
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.dtype == dtype
        torch.testing.assert_close(grad, expected_grad.to(dtype))


def test_bfloat16_autocast_samples_in_float32():
    value, shapes, locations, weights = _random_inputs(
        LEVEL_SHAPES["two_levels"], num_queries=20, dtype=torch.float32, seed=9
    )
    value = value.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = multi_scale_deformable_attention_fast(value, shapes, locations, weights)
        out_float32 = multi_scale_deformable_attention_fast(
            value.float(), shapes, locations, weights
        )
    expected = multi_scale_deformable_attention(value.float(), shapes, locations, weights)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected.bfloat16())
    # float32 inputs stay float32 under autocast
    assert out_float32.dtype == torch.float32
    torch.testing.assert_close(out_float32, expected, rtol=1e-5, atol=1e-5)


def test_module_under_bfloat16_autocast(monkeypatch):
    seen_dtypes = []

    def recording_attention(value, spatial_shapes, sampling_locations, attention_weights):
        seen_dtypes.append((value.dtype, sampling_locations.dtype, attention_weights.dtype))
        return multi_scale_deformable_attention_fast(
            value, spatial_shapes, sampling_locations, attention_weights
        )

    monkeypatch.setattr(
        ms_deform_attn, "multi_scale_deformable_attention_fast", recording_attention
    )
    torch.manual_seed(0)
    module = MultiScaleDeformableAttention(embed_dim=16, num_heads=2, num_levels=2, num_points=2)
    generator = torch.Generator().manual_seed(10)
    query = torch.randn(2, 6, 16, generator=generator)
    value = torch.randn(2, 16, 16, generator=generator)
    reference_points = torch.rand(2, 6, 2, 2, generator=generator)
    args = (
        query,
        value,
        reference_points,
        torch.tensor(LEVEL_SHAPES["two_levels"]),
        torch.tensor([0, 12]),
    )
    with torch.no_grad():
        expected = module(*args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(*args)
    # projections in bfloat16, the softmax, the locations and the sampling in float32
    assert seen_dtypes == [
        (torch.float32, torch.float32, torch.float32),
        (torch.bfloat16, torch.float32, torch.float32),
    ]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)


def test_nan_location_only_affects_its_query(gather_scheme):
    value, shapes, locations, weights = _random_inputs(LEVEL_SHAPES["two_levels"])
    locations[1, 2, 0, 1, 0, 0] = math.nan
    out = multi_scale_deformable_attention_fast(value, shapes, locations, weights)
    nan_entries = torch.zeros_like(out, dtype=torch.bool)
    nan_entries[1, 2, :4] = True  # head 0 of query 2 in image 1
    assert torch.equal(out.isnan(), nan_entries)


def test_no_queries(gather_scheme):
    value, shapes, locations, weights = _random_inputs(LEVEL_SHAPES["two_levels"], num_queries=0)
    inputs = [t.requires_grad_() for t in (value, locations, weights)]
    out = multi_scale_deformable_attention_fast(inputs[0], shapes, inputs[1], inputs[2])
    assert out.shape == (2, 0, 12)
    grads = torch.autograd.grad(out.sum(), inputs)
    assert torch.count_nonzero(grads[0]) == 0
    assert grads[1].shape == locations.shape and grads[2].shape == weights.shape


def test_invalid_arguments():
    value, shapes, locations, weights = _random_inputs(LEVEL_SHAPES["two_levels"])
    with pytest.raises(ValueError, match="value must"):
        multi_scale_deformable_attention_fast(value[0], shapes, locations, weights)
    with pytest.raises(ValueError, match="spatial_shapes must"):
        multi_scale_deformable_attention_fast(value, shapes.view(-1), locations, weights)
    with pytest.raises(ValueError, match="sum to"):
        multi_scale_deformable_attention_fast(value[:, :-1], shapes, locations, weights)
    with pytest.raises(ValueError, match="sampling_locations must"):
        multi_scale_deformable_attention_fast(value, shapes, locations[:, :, :2], weights)
    with pytest.raises(ValueError, match="sampling_locations must"):
        multi_scale_deformable_attention_fast(value, shapes, locations[..., :1], weights)
    with pytest.raises(ValueError, match="attention_weights must"):
        multi_scale_deformable_attention_fast(value, shapes, locations, weights[..., :1])
    # level shapes given as Python pairs
    with pytest.raises(ValueError, match=r"spatial_shapes \[\(3, 4\), \(2, 1\)\] sum to 14"):
        multi_scale_deformable_attention_fast(value, [(3, 4), (2, 1)], locations, weights)
    with pytest.raises(ValueError, match=r"spatial_shapes must be \(h, w\) pairs"):
        multi_scale_deformable_attention_fast(value, [(3, 4), (2, 2, 1)], locations, weights)


@pytest.mark.parametrize("name", sorted(LEVEL_SHAPES))
def test_python_level_shapes_equal_tensor_and_read_nothing(name, gather_scheme, monkeypatch):
    value, shapes, locations, weights = _random_inputs(LEVEL_SHAPES[name])
    grad_output = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(1)).double()
    args = (value, shapes, locations, weights, grad_output, (True, True, True))
    expected, expected_grads = _values_and_grads(multi_scale_deformable_attention_fast, *args)
    reads = []

    def recording_tolist(tensor):
        reads.append(tuple(tensor.shape))
        return tolist(tensor)

    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", recording_tolist)
    args = (value, tuple(LEVEL_SHAPES[name]), *args[2:])
    out, grads = _values_and_grads(multi_scale_deformable_attention_fast, *args)
    assert reads == []
    assert torch.equal(out, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        assert torch.equal(grad, expected_grad)


@pytest.mark.parametrize("num_queries, padded", [(200, True), (2, False)])
def test_padded_maps_only_for_many_sampling_points(monkeypatch, num_queries, padded):
    pad_calls = []

    def recording_pad(value, level_shapes):
        pad_calls.append(value.shape)
        return pad_value_maps(value, level_shapes)

    pad_value_maps = ms_deform_attn_fast._pad_value_maps
    monkeypatch.setattr(ms_deform_attn_fast, "_pad_value_maps", recording_pad)
    # 16 values * 2 heads * 32 channels = 1024 value elements; 4 points per query and head
    value, shapes, locations, weights = _random_inputs(
        LEVEL_SHAPES["two_levels"],
        batch_size=1,
        num_queries=num_queries,
        num_heads=2,
        head_dim=32,
        num_points=2,
    )
    expected = multi_scale_deformable_attention(value, shapes, locations, weights)
    out = multi_scale_deformable_attention_fast(value, shapes, locations, weights)
    torch.testing.assert_close(out, expected)
    assert len(pad_calls) == int(padded)
