"""Backbone builders for LazyConfig: ResNets of any width on detectron2's own ResNet."""

from typing import Dict, List, Sequence

from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock, ResNet

__all__ = ["build_resnet", "resnet_output_shape"]

_BLOCKS_PER_STAGE = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}
_STAGE_NAMES = ("res2", "res3", "res4", "res5")


def _stage_out_channels(depth: int, base_channels: int) -> List[int]:
    """Output channels of res2 ... res5: ``base_channels * 2**i``, x4 for bottleneck blocks."""
    if depth not in _BLOCKS_PER_STAGE:
        raise ValueError(f"ResNet depth must be one of {sorted(_BLOCKS_PER_STAGE)}, got {depth}")
    expansion = 4 if depth >= 50 else 1
    return [base_channels * 2**index * expansion for index in range(len(_STAGE_NAMES))]


def resnet_output_shape(
    *, depth: int = 50, base_channels: int = 64, out_features: Sequence[str] = _STAGE_NAMES
) -> Dict[str, ShapeSpec]:
    """
    The output shapes of ``build_resnet(depth=..., base_channels=..., out_features=...)``
    without building it: the neck's ``input_shape`` in a config, read from the backbone's keys.
    """
    unknown = [name for name in out_features if name not in _STAGE_NAMES]
    if unknown:
        raise ValueError(f"ResNet out_features {unknown} are not stages {list(_STAGE_NAMES)}")
    channels = dict(zip(_STAGE_NAMES, _stage_out_channels(depth, base_channels)))
    return {
        name: ShapeSpec(channels=channels[name], stride=2 ** (_STAGE_NAMES.index(name) + 2))
        for name in out_features
    }


def build_resnet(
    *,
    depth: int = 50,
    stem_channels: int = 64,
    base_channels: int = 64,
    out_features: List[str] = ("res2", "res3", "res4", "res5"),
    freeze_at: int = 2,
    norm: str = "FrozenBN",
) -> ResNet:
    """
    A torchvision-style ResNet (stride in the 3x3 conv) as a detectron2 ``ResNet``.

    Args:
        depth: 18, 34, 50 or 101.
        stem_channels: output channels of the stem (64 in the standard ResNets).
        base_channels: channels of the first stage's 3x3 convs (64 standard); stage i has
            ``base_channels * 2**i`` (x4 at the output of bottleneck blocks).
        out_features: stages returned, e.g. ["res2", ..., "res5"].
        freeze_at: detectron2 semantics: 0 none, 1 stem, 2 stem + res2 (the reference's
            ``frozen_stages=1``), ...
        norm: norm of every conv ("FrozenBN" is the reference's frozen, eval-mode BN).
    """
    bottleneck = depth >= 50
    stages = []
    in_channels = stem_channels
    stage_channels = _stage_out_channels(depth, base_channels)
    for index, (num_blocks, out_channels) in enumerate(
        zip(_BLOCKS_PER_STAGE[depth], stage_channels)
    ):
        width = base_channels * 2**index
        kwargs = dict(
            block_class=BottleneckBlock if bottleneck else BasicBlock,
            num_blocks=num_blocks,
            stride_per_block=[1 if index == 0 else 2] + [1] * (num_blocks - 1),
            in_channels=in_channels,
            out_channels=out_channels,
            norm=norm,
        )
        if bottleneck:
            kwargs.update(bottleneck_channels=width, stride_in_1x1=False)
        stages.append(ResNet.make_stage(**kwargs))
        in_channels = out_channels
    stem = BasicStem(in_channels=3, out_channels=stem_channels, norm=norm)
    return ResNet(stem, stages, out_features=list(out_features), freeze_at=freeze_at)
