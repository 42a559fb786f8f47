"""ChannelMapper: brings backbone levels to the transformer width and adds coarser levels."""

import math
from typing import Dict, List

from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import Backbone
from torch import Tensor, nn

__all__ = ["ChannelMapper"]


class ChannelMapper(Backbone):
    """
    One 1x1 conv + norm (no activation) per backbone level, then ``num_extra_levels`` 3x3
    stride-2 conv + norm levels: the first on the raw last backbone level, the next ones on
    the previous extra level. A detectron2 ``Backbone`` on the backbone's outputs: its levels
    are named ``p{log2(stride)}``, finest first, and described by ``output_shape()``.
    """

    def __init__(
        self,
        *,
        input_shape: Dict[str, ShapeSpec],
        in_features: List[str],
        out_channels: int = 256,
        num_extra_levels: int = 1,
        norm: str = "GN",
    ):
        """
        Args:
            input_shape: shapes of the backbone outputs.
            in_features: backbone outputs used, finest first (e.g. ["res2", ..., "res5"]).
            out_channels: channels of every output level.
            num_extra_levels: stride-2 levels added after the last backbone level.
            norm: detectron2 norm name (``get_norm``), "GN" is GroupNorm(32).
        """
        super().__init__()
        missing = [f for f in in_features if f not in input_shape]
        if missing:
            raise ValueError(
                f"ChannelMapper in_features {missing} are not backbone outputs "
                f"{sorted(input_shape)}"
            )
        self.in_features = list(in_features)
        self.convs = nn.ModuleList(
            Conv2d(
                input_shape[f].channels,
                out_channels,
                kernel_size=1,
                bias=False,
                norm=get_norm(norm, out_channels),
            )
            for f in in_features
        )
        last_channels = input_shape[in_features[-1]].channels
        self.extra_convs = nn.ModuleList(
            Conv2d(
                last_channels if i == 0 else out_channels,
                out_channels,
                kernel_size=3,
                stride=2,
                padding=1,
                bias=False,
                norm=get_norm(norm, out_channels),
            )
            for i in range(num_extra_levels)
        )
        strides = [input_shape[f].stride for f in in_features]
        strides += [strides[-1] * 2 ** (i + 1) for i in range(num_extra_levels)]
        self._out_features = [f"p{int(math.log2(s))}" for s in strides]
        self._out_feature_strides = dict(zip(self._out_features, strides))
        self._out_feature_channels = {name: out_channels for name in self._out_features}
        for conv in [*self.convs, *self.extra_convs]:
            nn.init.xavier_uniform_(conv.weight)

    def forward(self, features: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """
        Args:
            features: backbone outputs, (B, C_in, H, W) each.
        Returns:
            the output levels by name, finest first, (B, out_channels, H_l, W_l) each.
        """
        inputs = [features[f] for f in self.in_features]
        outputs = [conv(x) for conv, x in zip(self.convs, inputs)]
        for index, conv in enumerate(self.extra_convs):
            outputs.append(conv(inputs[-1] if index == 0 else outputs[-1]))
        return dict(zip(self._out_features, outputs))
