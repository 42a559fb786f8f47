"""
The authors' simple feature pyramid (SFP): the neck of their Co-DINO ViT configs.

Every level is computed from the one ViT map (stride 16), in a branch of its own:

    scale 4    (p2): 2x nearest upsample, [3x3 conv C -> C/2], 2x upsample, [3x3 conv -> C/4]
    scale 2    (p3): 2x nearest upsample, [3x3 conv C -> C/2]
    scale 1    (p4): -
    scale 0.5  (p5): 3x3 stride-2 max pool (padding 1)
    scale 0.25 (p6): 3x3 stride-2 max pool (padding 1), [3x3 stride-2 conv C -> C]

then, in every branch, [1x1 conv -> out_channels] and a 3x3 conv, out_channels -> out_channels.
Each conv has no bias and is followed by a channels-first LayerNorm (eps 1e-6); the bracketed
ones and the 1x1 conv also by a GELU, the last 3x3 conv by nothing. This differs from
ViTDet's ``detectron2.modeling.backbone.vit.SimpleFeaturePyramid``: nearest upsampling and
3x3 convs instead of transposed convs, a 3x3 (not 2x2) max pool, a GELU after the 1x1 conv,
and a stride-64 level computed from the ViT map rather than pooled from stride 32.

Parameter names: authors' key (``neck.`` prefix in both) -> ours. The n-th conv of an authors'
branch is our n-th conv, the LayerNorm after it our conv's ``norm``::

    p2.{1,5,8,11}.weight           -> branches.p2.{1,3,4,5}.weight
    p2.{2,6,9,12}.{weight,bias}    -> branches.p2.{1,3,4,5}.norm.{weight,bias}
    p3.{1,4,7}.weight              -> branches.p3.{1,2,3}.weight
    p3.{2,5,8}.{weight,bias}       -> branches.p3.{1,2,3}.norm.{weight,bias}
    p4.{0,3}.weight                -> branches.p4.{0,1}.weight
    p4.{1,4}.{weight,bias}         -> branches.p4.{0,1}.norm.{weight,bias}
    p5.{1,4}.weight                -> branches.p5.{1,2}.weight
    p5.{2,5}.{weight,bias}         -> branches.p5.{1,2}.norm.{weight,bias}
    p6.{1,4,7}.weight              -> branches.p6.{1,2,3}.weight
    p6.{2,5,8}.{weight,bias}       -> branches.p6.{1,2,3}.norm.{weight,bias}
"""

import math
from typing import Dict, List, Sequence, Tuple

from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import Backbone
from torch import Tensor, nn

__all__ = ["SimpleFeaturePyramid"]

_SCALE_FACTORS = (4.0, 2.0, 1.0, 0.5, 0.25)


def _conv(
    in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1, gelu: bool = True
) -> Conv2d:
    """A bias-free conv + channels-first LayerNorm (+ GELU), 'same' padding."""
    return Conv2d(
        in_channels,
        out_channels,
        kernel_size=kernel_size,
        stride=stride,
        padding=kernel_size // 2,
        bias=False,
        norm=get_norm("LN", out_channels),  # channels-first, eps 1e-6
        activation=nn.GELU() if gelu else None,
    )


def _resampling(scale: float, channels: int) -> Tuple[List[nn.Module], int]:
    """The layers taking a ``channels`` map to ``scale`` times its size, and their channels."""
    if scale == 4.0:
        return [
            nn.Upsample(scale_factor=2, mode="nearest"),
            _conv(channels, channels // 2, 3),
            nn.Upsample(scale_factor=2, mode="nearest"),
            _conv(channels // 2, channels // 4, 3),
        ], channels // 4
    if scale == 2.0:
        return [
            nn.Upsample(scale_factor=2, mode="nearest"),
            _conv(channels, channels // 2, 3),
        ], channels // 2
    if scale == 1.0:
        return [], channels
    if scale == 0.5:
        return [nn.MaxPool2d(kernel_size=3, stride=2, padding=1)], channels
    return [
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        _conv(channels, channels, 3, stride=2),
    ], channels


class SimpleFeaturePyramid(Backbone):
    """
    The authors' SFP neck (see the module docstring) as a detectron2 ``Backbone`` on the ViT's
    outputs: levels named ``p{log2(stride)}``, finest first, described by ``output_shape()``.
    """

    def __init__(
        self,
        *,
        input_shape: Dict[str, ShapeSpec],
        in_feature: str,
        out_channels: int = 256,
        scale_factors: Sequence[float] = _SCALE_FACTORS,
    ):
        """
        Args:
            input_shape: shapes of the backbone outputs.
            in_feature: the backbone output the pyramid is built from (a stride-16 ViT map).
            out_channels: channels of every output level.
            scale_factors: output sizes relative to the input, a decreasing subset of
                (4, 2, 1, 0.5, 0.25). The authors use all five (``use_p2=True``): p2 - p6.
        """
        super().__init__()
        if in_feature not in input_shape:
            raise ValueError(
                f"SFP in_feature {in_feature!r} is not a backbone output {sorted(input_shape)}"
            )
        scale_factors = [float(scale) for scale in scale_factors]
        if not scale_factors or any(scale not in _SCALE_FACTORS for scale in scale_factors):
            raise ValueError(f"SFP scale_factors must be among {_SCALE_FACTORS}: {scale_factors}")
        if scale_factors != sorted(set(scale_factors), reverse=True):
            raise ValueError(f"SFP scale_factors must be distinct and decreasing: {scale_factors}")
        in_channels, in_stride = input_shape[in_feature].channels, input_shape[in_feature].stride
        if 4.0 in scale_factors and in_channels % 4:
            raise ValueError(f"SFP scale 4 needs input channels divisible by 4, got {in_channels}")

        self.in_feature = in_feature
        self.branches = nn.ModuleDict()
        strides = [in_stride / scale for scale in scale_factors]
        if not all(stride.is_integer() for stride in strides):
            raise ValueError(f"SFP input stride {in_stride} / scales {scale_factors} is fractional")
        strides = [int(stride) for stride in strides]
        for scale, stride in zip(scale_factors, strides):
            layers, channels = _resampling(scale, in_channels)
            layers += [
                _conv(channels, out_channels, 1),
                _conv(out_channels, out_channels, 3, gelu=False),
            ]
            self.branches[f"p{int(math.log2(stride))}"] = nn.Sequential(*layers)
        self._out_features = list(self.branches)
        self._out_feature_strides = dict(zip(self._out_features, strides))
        self._out_feature_channels = {name: out_channels for name in self._out_features}
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)

    def forward(self, features: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """
        Args:
            features: backbone outputs; ``features[in_feature]`` is (B, C, H, W).
        Returns:
            the levels by name, finest first: (B, out_channels, H * 4, W * 4) for scale 4, ...,
            (B, out_channels, ceil(H / 2), ceil(W / 2)) for 0.5 and
            (B, out_channels, ceil(ceil(H / 2) / 2), ...) for 0.25.
        """
        x = features[self.in_feature]
        return {name: branch(x) for name, branch in self.branches.items()}
