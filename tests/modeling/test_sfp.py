"""The authors' simple feature pyramid: levels, branch layout against a direct computation."""

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone
from torch import nn

from codetr.modeling import EVA02ViT, SimpleFeaturePyramid

IN_CHANNELS, OUT_CHANNELS = 32, 16
INPUT_SHAPE = {"last_feat": ShapeSpec(channels=IN_CHANNELS, stride=16)}


def _sfp(**kwargs):
    torch.manual_seed(0)
    neck = SimpleFeaturePyramid(
        input_shape=INPUT_SHAPE, in_feature="last_feat", out_channels=OUT_CHANNELS, **kwargs
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LayerNorm affine too, so that every parameter matters
        for parameter in neck.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return neck


def _feature(height=5, width=7, seed=2):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, IN_CHANNELS, height, width, generator=generator)


def _conv_ln(conv, x, *, stride=1, gelu=True):
    """A bias-free conv, then LayerNorm over channels written out, then GELU."""
    x = F.conv2d(x, conv.weight, stride=stride, padding=conv.weight.shape[-1] // 2)
    mean = x.mean(dim=1, keepdim=True)
    variance = (x - mean).square().mean(dim=1, keepdim=True)
    x = (x - mean) / torch.sqrt(variance + 1e-6)
    x = conv.norm.weight[:, None, None] * x + conv.norm.bias[:, None, None]
    return F.gelu(x) if gelu else x


def _upsample(x):
    return F.interpolate(x, scale_factor=2, mode="nearest")


def _max_pool(x):
    return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


def test_output_names_strides_and_shapes():
    neck = _sfp()
    assert isinstance(neck, Backbone)
    shapes = neck.output_shape()
    assert list(shapes) == ["p2", "p3", "p4", "p5", "p6"]
    assert [s.stride for s in shapes.values()] == [4, 8, 16, 32, 64]
    assert all(s.channels == OUT_CHANNELS for s in shapes.values())
    with torch.no_grad():
        outputs = neck({"last_feat": _feature(5, 7)})
    assert {k: tuple(v.shape) for k, v in outputs.items()} == {
        "p2": (2, OUT_CHANNELS, 20, 28),
        "p3": (2, OUT_CHANNELS, 10, 14),
        "p4": (2, OUT_CHANNELS, 5, 7),
        "p5": (2, OUT_CHANNELS, 3, 4),  # 3x3 stride-2 pool, padding 1: ceil(n / 2)
        "p6": (2, OUT_CHANNELS, 2, 2),
    }


def test_branches_match_direct_computation():
    neck = _sfp()
    x = _feature()
    p2, p3, p4, p5, p6 = (list(neck.branches[f"p{i}"]) for i in range(2, 7))
    expected = {
        # 4x: upsample, 3x3 C -> C/2, upsample, 3x3 C/2 -> C/4, then 1x1 and 3x3
        "p2": _conv_ln(p2[3], _upsample(_conv_ln(p2[1], _upsample(x)))),
        "p3": _conv_ln(p3[1], _upsample(x)),
        "p4": x,
        "p5": _max_pool(x),
        # 0.25x: pool, then a 3x3 stride-2 conv at the input width
        "p6": _conv_ln(p6[1], _max_pool(x), stride=2),
    }
    tails = {"p2": p2[4:], "p3": p3[2:], "p4": p4, "p5": p5[1:], "p6": p6[2:]}
    for name, (lateral, output) in tails.items():
        expected[name] = _conv_ln(output, _conv_ln(lateral, expected[name]), gelu=False)
    assert [p2[1].weight.shape[0], p2[3].weight.shape[0], p3[1].weight.shape[0]] == [16, 8, 16]
    assert p6[1].weight.shape[:2] == (IN_CHANNELS, IN_CHANNELS)
    assert all(conv.bias is None for conv in neck.modules() if isinstance(conv, nn.Conv2d))
    with torch.no_grad():
        outputs = neck({"last_feat": x})
        for name, value in expected.items():
            torch.testing.assert_close(outputs[name], value, rtol=1e-5, atol=1e-5)


def test_without_the_stride_4_level():
    # the authors' use_p2=False
    neck = _sfp(scale_factors=(2, 1, 0.5, 0.25))
    assert list(neck.output_shape()) == ["p3", "p4", "p5", "p6"]
    assert list(neck.branches) == ["p3", "p4", "p5", "p6"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(scale_factors=(4, 3)), "must be among"),
        (dict(scale_factors=(1, 2)), "decreasing"),
        (dict(in_feature="res5"), "not a backbone output"),
    ],
)
def test_rejects_bad_arguments(kwargs, message):
    args = dict(input_shape=INPUT_SHAPE, in_feature="last_feat")
    with pytest.raises(ValueError, match=message):
        SimpleFeaturePyramid(**{**args, **kwargs})


def test_on_the_vit_as_codetr_calls_it():
    torch.manual_seed(0)
    backbone = EVA02ViT(
        embed_dim=IN_CHANNELS,
        depth=2,
        num_heads=2,
        window_size=2,
        global_block_indexes=[1],
        pretrain_img_size=64,
    )
    neck = SimpleFeaturePyramid(
        input_shape=backbone.output_shape(), in_feature="last_feat", out_channels=OUT_CHANNELS
    )
    images = torch.randn(1, 3, 128, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        levels = neck(backbone(images))
    assert {k: tuple(v.shape[1:]) for k, v in levels.items()} == {
        name: (OUT_CHANNELS, 128 // shape.stride, 64 // shape.stride)
        for name, shape in neck.output_shape().items()
    }
