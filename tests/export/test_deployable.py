"""
The pieces of the exported graph, run in PyTorch: the deformable attention in grid_sample, the
level masks, the batching of the inputs, and the whole DeployableDetector against the model's
own inference.
"""

from unittest import mock

import pytest
import torch

from codetr.export import DeployableDetector, batch_images
from codetr.export.deployable import _level_mask
from codetr.layers import (
    MultiScaleDeformableAttention,
    multi_scale_deformable_attention,
    multi_scale_deformable_attention_fast,
)
from codetr.layers import ms_deform_attn
from codetr.layers.ms_deform_attn import grid_sample_levels
from codetr.modeling.transformer import level_masks

from .models import assert_same_detections, build_tiny_model, parity_images, pytorch_detections

_LEVEL_SHAPES = ((9, 13), (5, 7), (3, 4))


def _attention_inputs(seed: int, num_queries: int = 11, heads: int = 2, points: int = 3):
    generator = torch.Generator().manual_seed(seed)
    num_values = sum(h * w for h, w in _LEVEL_SHAPES)
    value = torch.randn(2, num_values, heads, 8, generator=generator)
    # some locations outside the maps
    locations = torch.rand(
        2, num_queries, heads, len(_LEVEL_SHAPES), points, 2, generator=generator
    )
    locations = locations * 1.4 - 0.2
    weights = torch.rand(2, num_queries, heads, len(_LEVEL_SHAPES), points, generator=generator)
    return value, locations, weights


def test_grid_sample_attention_equals_the_model_s():
    value, locations, weights = _attention_inputs(0)
    # the sizes as 0-dim tensors, as torch.jit.trace gives shapes: used as they are
    tensor_sizes = [(torch.tensor(h), torch.tensor(w)) for h, w in _LEVEL_SHAPES]
    output = grid_sample_levels(value, tensor_sizes, locations, weights)
    reference = multi_scale_deformable_attention(value, _LEVEL_SHAPES, locations, weights)
    fast = multi_scale_deformable_attention_fast(value, _LEVEL_SHAPES, locations, weights)
    torch.testing.assert_close(output, reference, rtol=0, atol=0)
    torch.testing.assert_close(output, fast, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reference_dim", [2, 4])
def test_deformable_attention_layer_with_traced_sizes_samples_with_grid_sample(reference_dim):
    """Level sizes as 0-dim tensors (as torch.jit.trace records shapes, as the exported model
    passes them): the layer samples with grid_sample, not its fast kernel, and gives the same
    output as with Python ints."""
    torch.manual_seed(0)
    layer = MultiScaleDeformableAttention(
        embed_dim=32, num_heads=4, num_levels=len(_LEVEL_SHAPES), num_points=2
    )
    for parameter in layer.parameters():  # beyond the initialisation: random offsets, weights
        parameter.data.normal_(0, 0.3)
    generator = torch.Generator().manual_seed(1)
    num_values = sum(h * w for h, w in _LEVEL_SHAPES)
    query = torch.randn(2, 10, 32, generator=generator)
    value = torch.randn(2, num_values, 32, generator=generator)
    reference = torch.rand(2, 10, len(_LEVEL_SHAPES), reference_dim, generator=generator)
    spatial_shapes = torch.tensor(_LEVEL_SHAPES)
    starts = torch.tensor([0, 9 * 13, 9 * 13 + 5 * 7])
    mask = torch.rand(2, num_values, generator=generator) > 0.8
    tensor_sizes = [(torch.tensor(h), torch.tensor(w)) for h, w in _LEVEL_SHAPES]
    with torch.no_grad():
        expected = layer(query, value, reference, spatial_shapes, starts, mask, _LEVEL_SHAPES)
        with mock.patch.object(ms_deform_attn, "multi_scale_deformable_attention_fast") as fast:
            output = layer(query, value, reference, spatial_shapes, starts, mask, tensor_sizes)
    fast.assert_not_called()
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "image_size, level_sizes",
    [((37, 53), [(19, 27), (10, 14), (5, 7)]), ((800, 1333), [(100, 167), (25, 42), (13, 21)])],
)
def test_level_masks_equal_nearest_interpolation(image_size, level_sizes):
    image_sizes = torch.tensor(
        [[image_size[0], image_size[1] - 5], [image_size[0] - 11, image_size[1]]]
    )
    rows = torch.arange(image_size[0])[None, :, None]
    columns = torch.arange(image_size[1])[None, None, :]
    padding_mask = (rows >= image_sizes[:, 0, None, None]) | (
        columns >= image_sizes[:, 1, None, None]
    )
    levels = [torch.zeros(2, 1, h, w) for h, w in level_sizes]
    expected = level_masks(padding_mask, levels)
    for level, mask in zip(levels, expected):
        assert torch.equal(_level_mask(padding_mask, image_sizes, level), mask)


def test_batch_images_pads_at_the_bottom_right():
    images = [
        torch.full((3, 4, 6), 7, dtype=torch.uint8),
        torch.full((3, 5, 3), 9, dtype=torch.uint8),
    ]
    batch, sizes = batch_images(images)
    assert batch.shape == (2, 3, 5, 6) and batch.dtype == torch.uint8
    assert sizes.tolist() == [[4, 6], [5, 3]]
    assert (batch[0, :, :4] == 7).all() and not batch[0, :, 4:].any()
    assert (batch[1, :, :, :3] == 9).all() and not batch[1, :, :, 3:].any()
    batch, _ = batch_images(images, size_divisibility=4)
    assert batch.shape == (2, 3, 8, 8)


def test_size_divisibility_pads_in_the_graph():
    # (without it: the exported models' tests, tests/export/test_export.py)
    model = build_tiny_model("co_deformable_detr")
    model.size_divisibility = 32
    images = parity_images()
    batch, sizes = batch_images(images)
    outputs = DeployableDetector(model)(batch, sizes)
    assert_same_detections(outputs, pytorch_detections(model, images))


def test_rejects_other_test_outputs():
    model = build_tiny_model("co_dino")
    model.eval_module = "one-stage"
    with pytest.raises(ValueError, match="eval_module"):
        DeployableDetector(model)
    with pytest.raises(TypeError, match="CoDETR"):
        DeployableDetector(torch.nn.Linear(2, 2))
