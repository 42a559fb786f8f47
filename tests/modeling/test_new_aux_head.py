"""
Adding an auxiliary head as a new contributor would (README "Adding an auxiliary head"): one
module with the contract of ``aux_heads/base.py`` and one config line; the model sizes
everything that depends on it.
"""

from typing import Dict, List

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.layers import ShapeSpec
from detectron2.structures import ImageList, Instances
from detectron2.utils.events import EventStorage
from torch import Tensor, nn

from codetr.engine import LazyPartial
from codetr.modeling.aux_heads.base import AssignedCoords

from ..parity import TINY_CO_DINO_CONFIG
from .tiny_models import synthetic_batch


class GroundTruthBoxHead(nn.Module):
    """A third head kind: assigns every ground-truth box to itself and the whole image to the
    background; its loss is the mean square of a 1x1 projection of the finest level (enough
    to check the wiring)."""

    def __init__(self, *, input_shape: Dict[str, ShapeSpec], num_classes: int, scale: float):
        super().__init__()
        self.finest = min(input_shape, key=lambda name: input_shape[name].stride)
        self.projection = nn.Conv2d(input_shape[self.finest].channels, 1, kernel_size=1)
        self.num_classes = num_classes
        self.scale = scale

    def forward(self, features: Dict[str, Tensor], images: ImageList, gt: List[Instances]):
        loss = self.projection(features[self.finest]).pow(2).mean() * self.scale
        assignments = []
        for image, (height, width) in zip(gt, images.image_sizes):
            # plus the whole image as a background entry (positive queries pad with those)
            background = torch.tensor([[0.0, 0.0, width, height]])
            assignments.append(
                AssignedCoords(
                    boxes=torch.cat([image.gt_boxes.tensor, background]),
                    labels=torch.cat([image.gt_classes, torch.tensor([self.num_classes])]),
                    target_boxes=torch.cat([image.gt_boxes.tensor, torch.zeros(1, 4)]),
                )
            )
        return {"loss_square": loss}, assignments


def test_a_third_head_is_one_config_line():
    cfg = LazyConfig.load(TINY_CO_DINO_CONFIG)
    cfg.model.aux_heads.append(LazyPartial(GroundTruthBoxHead)(scale=3.0))
    torch.manual_seed(0)
    model = instantiate(cfg.model).train()

    head = model.aux_heads[2]
    assert isinstance(head, GroundTruthBoxHead) and head.scale == 3.0
    assert head.finest == "p2" and head.projection.in_channels == 64
    assert head.num_classes == model.query_head.num_classes == 80
    assert model.positive_queries.num_heads == 3 and len(model.positive_queries.projections) == 3

    inputs = synthetic_batch([(64, 64), (48, 56)], [[[4, 4, 30, 40]], []], [[1], []])
    with EventStorage():  # the R-CNN head logs its sampling
        losses = model(inputs)
    own = head.projection(
        model.auxiliary_features(model.encode(model.preprocess_image(inputs)))["p2"]
    )
    # lambda_2 = 6 in the tiny config, x 2 decoder layers
    torch.testing.assert_close(losses["aux2.loss_square"], 12.0 * 3.0 * own.pow(2).mean())
    assert {"loss_class_aux2", "loss_bbox_aux2", "loss_giou_aux2"} <= set(losses)
    sum(losses.values()).backward()
    assert head.projection.weight.grad is not None
    assert model.positive_queries.projections[2].weight.grad is not None
