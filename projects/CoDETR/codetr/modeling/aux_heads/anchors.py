"""
Anchors of the auxiliary dense heads as the authors' mmdet code lays them out: the order of a
location's anchors, and which anchors of a padded batch take part in an image's assignment.
"""

import math
from typing import List, Sequence, Tuple

import torch
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.structures import Boxes
from torch import Tensor

__all__ = ["RatioMajorAnchorGenerator", "valid_anchor_mask"]


class RatioMajorAnchorGenerator(DefaultAnchorGenerator):
    """
    detectron2's :class:`DefaultAnchorGenerator` with a location's anchors enumerated aspect
    ratio first, then size (index ``r * num_sizes + s``), as mmdet's ``AnchorGenerator``;
    detectron2 enumerates size first. The anchors are the same, only their order differs: it
    decides which anchor a random draw of the sampler picks, and the layout of an RPN's output
    channels (the converter reads it from the cell anchors).
    """

    def generate_cell_anchors(
        self,
        sizes: Sequence[float] = (32, 64, 128, 256, 512),
        aspect_ratios: Sequence[float] = (0.5, 1, 2),
    ) -> Tensor:
        """(len(aspect_ratios) * len(sizes), 4) XYXY anchors centred at 0, ratio-major."""
        anchors = []
        for aspect_ratio in aspect_ratios:
            for size in sizes:
                width = math.sqrt(size**2 / aspect_ratio)
                height = aspect_ratio * width
                anchors.append([-width / 2.0, -height / 2.0, width / 2.0, height / 2.0])
        return torch.tensor(anchors)


def valid_anchor_mask(
    anchors_per_level: List[Boxes],
    strides: Sequence[int],
    offset: float,
    image_sizes: Sequence[Tuple[int, int]],
) -> Tensor:
    """
    The anchors whose location lies within each image's ``ceil(size / stride)`` cells on its
    level: mmdet's valid flags, which leave out the locations that exist only because the batch
    is padded to a larger image (an image's size plays their per-image ``pad_shape``).

    Args:
        anchors_per_level: per level, (H_l * W_l * A, 4) anchors of a generator with this
            ``offset`` (centres at ``stride * (x + offset, y + offset)``).
        strides: each level's stride.
        image_sizes: (height, width) of each of the B images.

    Returns:
        (B, sum_l H_l * W_l * A) bool.
    """
    centres = torch.cat([anchors.get_centers() for anchors in anchors_per_level])  # (A, 2) x, y
    anchor_strides = torch.cat(
        [centres.new_full((len(a),), float(s)) for a, s in zip(anchors_per_level, strides)]
    )[:, None]
    # the location of an anchor, from its centre (exact up to rounding, hence round())
    locations = torch.round(centres / anchor_strides - offset)
    sizes = centres.new_tensor([[width, height] for height, width in image_sizes])  # (B, 2)
    limits = torch.ceil(sizes[:, None, :] / anchor_strides[None])  # (B, A, 2)
    return (locations[None] < limits).all(dim=2)
