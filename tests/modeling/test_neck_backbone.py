from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import LazyConfig, instantiate
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import Backbone
from torch import nn

from codetr.modeling import ChannelMapper
from codetr.modeling.backbone import build_resnet, resnet_output_shape

DINO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "models" / "dino_r50.py"

# backbone levels of a ResNet-18 at width 16
INPUT_SHAPE = {
    "res2": ShapeSpec(channels=16, stride=4),
    "res3": ShapeSpec(channels=32, stride=8),
    "res4": ShapeSpec(channels=64, stride=16),
    "res5": ShapeSpec(channels=128, stride=32),
}


def _features(batch_size=2, size=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(
            batch_size,
            shape.channels,
            size // shape.stride,
            size // shape.stride,
            generator=generator,
        )
        for name, shape in INPUT_SHAPE.items()
    }


# ------------------------------------------------------------------------------ neck
def test_channel_mapper_output_names_strides_and_shapes():
    torch.manual_seed(0)
    neck = ChannelMapper(
        input_shape=INPUT_SHAPE,
        in_features=["res3", "res4", "res5"],
        out_channels=32,
        num_extra_levels=2,
    )
    shapes = neck.output_shape()
    assert list(shapes) == ["p3", "p4", "p5", "p6", "p7"]
    assert [s.stride for s in shapes.values()] == [8, 16, 32, 64, 128]
    assert all(s.channels == 32 for s in shapes.values())
    assert isinstance(neck, Backbone)
    outputs = neck(_features())
    assert list(outputs) == ["p3", "p4", "p5", "p6", "p7"]
    assert [tuple(o.shape) for o in outputs.values()] == [
        (2, 32, 8, 8),
        (2, 32, 4, 4),
        (2, 32, 2, 2),
        (2, 32, 1, 1),
        (2, 32, 1, 1),
    ]
    # the returned shapes are a copy
    shapes.clear()
    assert len(neck.output_shape()) == 5


def test_channel_mapper_layers():
    torch.manual_seed(0)
    neck = ChannelMapper(
        input_shape=INPUT_SHAPE,
        in_features=["res2", "res3", "res4", "res5"],
        out_channels=32,
        num_extra_levels=2,
    )
    assert list(neck.output_shape()) == ["p2", "p3", "p4", "p5", "p6", "p7"]
    for conv, name in zip(neck.convs, ["res2", "res3", "res4", "res5"]):
        assert conv.kernel_size == (1, 1) and conv.stride == (1, 1)
        assert conv.in_channels == INPUT_SHAPE[name].channels and conv.out_channels == 32
        assert conv.bias is None
        assert isinstance(conv.norm, nn.GroupNorm) and conv.norm.num_groups == 32
        assert conv.activation is None
    # the first extra level reads the raw last backbone level, the next one the first
    first, second = neck.extra_convs
    assert first.in_channels == 128 and second.in_channels == 32
    for conv in neck.extra_convs:
        assert conv.kernel_size == (3, 3) and conv.stride == (2, 2) and conv.padding == (1, 1)
        assert conv.bias is None and isinstance(conv.norm, nn.GroupNorm)


def test_channel_mapper_computation():
    torch.manual_seed(0)
    neck = ChannelMapper(
        input_shape=INPUT_SHAPE, in_features=["res4", "res5"], out_channels=32, num_extra_levels=2
    )
    features = _features()
    outputs = list(neck(features).values())
    # 1x1 conv without bias, GroupNorm, no activation
    for output, conv, name in zip(outputs, neck.convs, ["res4", "res5"]):
        torch.testing.assert_close(output, conv.norm(F.conv2d(features[name], conv.weight)))
    extra0 = neck.extra_convs[0]
    expected = extra0.norm(F.conv2d(features["res5"], extra0.weight, stride=2, padding=1))
    torch.testing.assert_close(outputs[2], expected)
    extra1 = neck.extra_convs[1]
    expected = extra1.norm(F.conv2d(outputs[2], extra1.weight, stride=2, padding=1))
    torch.testing.assert_close(outputs[3], expected)


def test_channel_mapper_without_extra_levels():
    neck = ChannelMapper(
        input_shape=INPUT_SHAPE, in_features=["res5"], out_channels=32, num_extra_levels=0
    )
    assert list(neck.output_shape()) == ["p5"]
    assert len(neck.extra_convs) == 0
    assert [(k, tuple(o.shape)) for k, o in neck(_features()).items()] == [("p5", (2, 32, 2, 2))]


@pytest.mark.parametrize("in_features", [["res3", "res6"], ["p3"]])
def test_channel_mapper_unknown_in_features(in_features):
    with pytest.raises(ValueError, match="not backbone outputs"):
        ChannelMapper(input_shape=INPUT_SHAPE, in_features=in_features, out_channels=32)


# ------------------------------------------------------------------------------ backbone
def test_resnet18_at_width_16():
    torch.manual_seed(0)
    backbone = build_resnet(depth=18, stem_channels=16, base_channels=16)
    shapes = backbone.output_shape()
    assert list(shapes) == ["res2", "res3", "res4", "res5"]
    assert [(s.channels, s.stride) for s in shapes.values()] == [
        (16, 4),
        (32, 8),
        (64, 16),
        (128, 32),
    ]
    outputs = backbone(torch.randn(2, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in outputs.items()} == {
        "res2": (2, 16, 16, 24),
        "res3": (2, 32, 8, 12),
        "res4": (2, 64, 4, 6),
        "res5": (2, 128, 2, 3),
    }
    assert [len(stage) for stage in backbone.stages] == [2, 2, 2, 2]


def test_resnet50_layout_is_torchvision_style():
    backbone = build_resnet(depth=50, stem_channels=16, base_channels=8, out_features=["res3"])
    assert list(backbone.output_shape()) == ["res3"]
    # stages after the last requested one are not built
    assert len(backbone.stages) == 2
    assert backbone.output_shape()["res3"].channels == 8 * 2 * 4
    first_block = backbone.stages[1][0]
    # the stride sits in the 3x3 conv (torchvision / mmdet "pytorch" style)
    assert first_block.conv1.stride == (1, 1) and first_block.conv2.stride == (2, 2)
    assert first_block.conv2.kernel_size == (3, 3)
    assert [len(stage) for stage in build_resnet(depth=50, base_channels=8).stages] == [3, 4, 6, 3]
    assert [len(stage) for stage in build_resnet(depth=101, base_channels=8).stages] == [
        3,
        4,
        23,
        3,
    ]


def test_resnet_freezing_and_norm():
    backbone = build_resnet(depth=18, stem_channels=16, base_channels=16, freeze_at=2)
    assert not any(p.requires_grad for p in backbone.stem.parameters())
    assert not any(p.requires_grad for p in backbone.stages[0].parameters())
    assert all(p.requires_grad for p in backbone.stages[1].parameters())
    assert isinstance(backbone.stages[2][0].conv1.norm, FrozenBatchNorm2d)
    unfrozen = build_resnet(depth=18, stem_channels=16, base_channels=16, freeze_at=0, norm="BN")
    assert all(p.requires_grad for p in unfrozen.parameters())
    assert isinstance(unfrozen.stem.conv1.norm, nn.BatchNorm2d)


def test_resnet_unknown_depth():
    with pytest.raises(ValueError, match="depth"):
        build_resnet(depth=42)


@pytest.mark.parametrize(
    "depth, base_channels, out_features",
    [
        (18, 16, ["res2", "res3", "res4", "res5"]),
        (50, 64, ["res3", "res4", "res5"]),
        (34, 8, ["res5"]),
    ],
)
def test_resnet_output_shape_without_building(depth, base_channels, out_features):
    built = build_resnet(depth=depth, base_channels=base_channels, out_features=out_features)
    shapes = resnet_output_shape(
        depth=depth, base_channels=base_channels, out_features=out_features
    )
    assert shapes == built.output_shape()


def test_resnet_output_shape_rejects_unknown_stages():
    with pytest.raises(ValueError, match="res6"):
        resnet_output_shape(out_features=["res5", "res6"])


def test_config_neck_follows_backbone_overrides():
    # the neck's input is read from the backbone's keys: one override changes both
    cfg = LazyConfig.load(str(DINO_CONFIG))
    cfg.model.backbone.update(depth=18, base_channels=8, out_features=["res4", "res5"])
    neck = instantiate(cfg.model.neck)
    assert neck.in_features == ["res4", "res5"]
    assert [conv.weight.shape[1] for conv in neck.convs] == [32, 64]
    assert list(neck.output_shape()) == ["p4", "p5", "p6"]
