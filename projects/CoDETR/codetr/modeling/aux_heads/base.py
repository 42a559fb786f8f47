"""
The contract between the auxiliary (one-to-many) heads and the rest of Co-DETR.

An auxiliary head is an ``nn.Module`` used only in training (and, optionally, for the
``eval_module`` test output). In training it is called as::

    losses, assignments = head(features, images, gt_instances)

- ``features``: ``Dict[str, Tensor]``, the encoder memory reshaped to per-level maps plus the
  query head's extra downsampled level; each ``(B, C, H_l, W_l)``, described by the head's
  ``input_shape: Dict[str, ShapeSpec]``.
- ``images``: detectron2 ``ImageList`` (padded batch tensor and unpadded ``image_sizes``).
- ``gt_instances``: per image ``Instances`` with ``gt_boxes`` (``Boxes``, absolute XYXY in input
  pixels) and ``gt_classes`` (int64). An image may have no boxes.
- ``losses``: ``Dict[str, Tensor]`` of scalar losses with names unique within the head.
- ``assignments``: one :class:`AssignedCoords` per image: the head's one-to-many assignment,
  from which :mod:`codetr.modeling.positive_queries` builds the customized positive queries.

A head that can also produce the test output (the meta-architecture's ``eval_module``) has a
class attribute ``kind`` ("one-stage" or "two-stage") and a method
``inference(features, images) -> List[Instances]`` giving detections in input-image pixels.

Auxiliary heads know nothing of the query heads; they meet only in the meta-architecture.
"""

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

__all__ = ["AssignedCoords"]


@dataclass
class AssignedCoords:
    """
    One image's one-to-many assignment produced by an auxiliary head.

    Attributes:
        boxes: (N, 4) XYXY absolute input-pixel boxes the head assigned (anchors for ATSS,
            sampled proposals for the RoI head).
        labels: (N,) int64 assigned class per box; ``num_classes`` means background.
        target_boxes: (N, 4) XYXY absolute assigned ground-truth box per entry (any finite
            value, e.g. zeros, for background entries).
        features: optional (N, C) per-box feature (the RoI head's mean-pooled RoI feature).
    """

    boxes: Tensor
    labels: Tensor
    target_boxes: Tensor
    features: Optional[Tensor] = None
