"""Backbone builders for LazyConfig: ResNets of any width on detectron2's own ResNet."""

from typing import List

from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock, ResNet

__all__ = ["build_resnet"]

_BLOCKS_PER_STAGE = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}


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
    if depth not in _BLOCKS_PER_STAGE:
        raise ValueError(f"ResNet depth must be one of {sorted(_BLOCKS_PER_STAGE)}, got {depth}")
    bottleneck = depth >= 50
    expansion = 4 if bottleneck else 1
    stages = []
    in_channels = stem_channels
    for index, num_blocks in enumerate(_BLOCKS_PER_STAGE[depth]):
        width = base_channels * 2**index
        out_channels = width * expansion
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
