"""
The MaskIoU head of Co-DINO-Inst (mmdet's ``MaskIoUHead`` of Mask Scoring R-CNN, as the
authors configure it): from a RoI's features and its predicted mask, the IoU of that mask with
the object's whole ground-truth mask, per class; at test time it rescales the detection's
score.

Layout, for the authors' settings: [RoI features (R, 256, 14, 14), the 28x28 mask's sigmoid
max-pooled to 14x14] -> 3x3 conv 257 -> 256 + LN + ReLU -> 3x3 stride-2 conv + LN + ReLU
(7x7) -> FC 12544 -> 1024 + ReLU -> FC 1024 -> K -> sigmoid.

Parameter names: authors' key (``mask_iou_head.`` prefix; ``mask_branch.mask_iou_head.`` here)
-> ours::

    convs.{i}.conv.weight    -> convs.{i}.weight
    convs.{i}.norm_layer.*   -> convs.{i}.norm.*
    fcs.{i}.*                -> fcs.{i}.*
    fc_mask_iou.*            -> fc_mask_iou.*
"""

from typing import Tuple, Union

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, get_norm
from detectron2.structures import BitMasks, Boxes, PolygonMasks
from torch import Tensor, nn

__all__ = ["MaskIoUHead", "gt_area_ratios", "mask_iou_targets"]


class MaskIoUHead(nn.Module):
    """
    mmdet's ``MaskIoUHead`` with ``score_use_sigmoid=True`` (the authors' configs): the
    predicted IoUs are probabilities.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        roi_size: int = 14,
        num_convs: int = 2,
        conv_dim: int = 256,
        conv_norm: str = "LN",
        num_fcs: int = 1,
        fc_dim: int = 1024,
        loss_weight: float = 0.5,
    ):
        """
        Args:
            in_channels: width of the RoI features.
            num_classes: K, one IoU per class.
            roi_size: side of the RoI features; the mask is twice as large. The last conv has
                stride 2.
            num_convs, conv_dim, conv_norm: the 3x3 convs (detectron2 norm; "LN" is the
                authors' channels-first ``LN2d``).
            num_fcs, fc_dim: the FC layers before the per-class output.
            loss_weight: weight of the MSE loss.
        """
        super().__init__()
        if num_convs < 1 or roi_size % 2 != 0:
            raise ValueError(
                f"need num_convs >= 1 and an even roi_size, got {num_convs}, {roi_size}"
            )
        self.num_classes = num_classes
        self.loss_weight = loss_weight
        self.convs = nn.ModuleList(
            Conv2d(
                in_channels + 1 if i == 0 else conv_dim,
                conv_dim,
                kernel_size=3,
                stride=2 if i == num_convs - 1 else 1,
                padding=1,
                bias=not conv_norm,
                norm=get_norm(conv_norm, conv_dim),
                activation=F.relu,
            )
            for i in range(num_convs)
        )
        pooled = conv_dim * (roi_size // 2) ** 2
        self.fcs = nn.ModuleList(
            nn.Linear(pooled if i == 0 else fc_dim, fc_dim) for i in range(num_fcs)
        )
        self.fc_mask_iou = nn.Linear(fc_dim if num_fcs > 0 else pooled, num_classes)
        # mmdet: convs Kaiming normal (fan-out), FCs Caffe2 Xavier, the output normal(0.01)
        for conv in self.convs:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        for fc in self.fcs:
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.fc_mask_iou.weight, std=0.01)
        nn.init.zeros_(self.fc_mask_iou.bias)

    def forward(self, roi_features: Tensor, mask_logits: Tensor) -> Tensor:
        """
        Args:
            roi_features: (R, in_channels, s, s).
            mask_logits: (R, 2s, 2s) the predicted mask of each RoI's class.
        Returns:
            (R, K) the predicted mask IoU of every class, in [0, 1].
        """
        mask = F.max_pool2d(mask_logits.sigmoid()[:, None], kernel_size=2, stride=2)
        x = torch.cat([roi_features, mask], dim=1)
        for conv in self.convs:
            x = conv(x)
        x = x.flatten(1)
        for fc in self.fcs:
            x = F.relu(fc(x))
        return self.fc_mask_iou(x).sigmoid()

    def loss(self, predicted: Tensor, targets: Tensor) -> Tensor:
        """
        mmdet's ``MaskIoUHead.loss``: mean squared error over the RoIs with a positive target
        (0 connected to ``predicted`` when there are none), times ``loss_weight``.

        Args:
            predicted: (R,) the predicted IoU of each RoI's class.
            targets: (R,) from :func:`mask_iou_targets`.
        """
        positive = targets > 0
        if not positive.any():
            return predicted.sum() * 0.0
        return F.mse_loss(predicted[positive], targets[positive]) * self.loss_weight


def mask_iou_targets(
    mask_logits: Tensor, mask_targets: Tensor, area_ratios: Tensor, threshold: float = 0.5
) -> Tensor:
    """
    mmdet's ``MaskIoUHead.get_targets``: the IoU of the binarised predicted mask and the
    object's whole mask, both measured in RoI cells. The intersection is counted in the RoI;
    the object's whole area is its area in the RoI divided by the share of its area that lies
    in the RoI (``area_ratios``).

    Args:
        mask_logits: (R, s, s) predicted masks, kept where ``sigmoid > threshold``.
        mask_targets: (R, s, s) 0/1 ground truth in the RoIs.
        area_ratios: (R,) from :func:`gt_area_ratios`.
    Returns:
        (R,) float32 targets; 0 where neither mask has an area in the RoI (mmdet: NaN, which
        its loss skips as it skips 0).
    """
    predicted = (mask_logits.detach().float().sigmoid() > threshold).float()
    mask_targets = mask_targets.float()
    overlap = (predicted * mask_targets).sum((-1, -2))
    full_areas = mask_targets.sum((-1, -2)) / (area_ratios + 1e-7)
    union = predicted.sum((-1, -2)) + full_areas - overlap
    return torch.where(union > 0, overlap / union.clamp(min=1e-12), torch.zeros_like(union))


def _polygon_area(polygons, height: int, width: int) -> int:
    """Pixel count of the rasterised polygons of one object in a ``height`` x ``width``
    image (pycocotools, as detectron2's ``polygons_to_bitmask``, without decoding)."""
    if height <= 0 or width <= 0:
        return 0
    rles = mask_util.frPyObjects([np.asarray(p, dtype=np.float64) for p in polygons], height, width)
    return int(mask_util.area(mask_util.merge(rles)))


def gt_area_ratios(
    gt_masks: Union[BitMasks, PolygonMasks],
    boxes: Boxes,
    gt_indices: Tensor,
    image_size: Tuple[int, int],
) -> Tensor:
    """
    mmdet's ``MaskIoUHead._get_area_ratio``: for each RoI, the pixels of its matched
    ground-truth mask inside the RoI (corners truncated to integers, clipped to the image, at
    least one pixel wide and high), divided by the mask's pixels (+ 1e-7).

    Bitmaps are counted as they are. Polygons are rasterised (pycocotools) in the image for the
    whole area and inside the integer RoI for the part, which counts the pixels the bitmap of
    the authors' pipeline (``poly2mask``) would hold.

    Args:
        gt_masks: the image's ground-truth masks, G.
        boxes: (R, 4) the RoIs, XYXY input pixels.
        gt_indices: (R,) int64 index of each RoI's ground truth.
        image_size: (h, w) of the image.
    Returns:
        (R,) float32 on the boxes' device.
    """
    height, width = image_size
    corners = boxes.tensor.detach().cpu().numpy().astype(np.int32)
    corners[:, 0::2] = np.clip(corners[:, 0::2], 0, width)
    corners[:, 1::2] = np.clip(corners[:, 1::2], 0, height)
    indices = gt_indices.tolist()
    if isinstance(gt_masks, BitMasks):
        if len(indices) == 0:
            return torch.zeros(0, dtype=torch.float32, device=boxes.device)
        bitmaps = gt_masks.tensor
        # summed on the masks' device: no read-back per RoI
        inside = torch.stack(
            [
                bitmaps[index, y0 : y0 + max(y1 - y0, 1), x0 : x0 + max(x1 - x0, 1)].sum()
                for (x0, y0, x1, y1), index in zip(corners.tolist(), indices)
            ]
        )
        totals = bitmaps.flatten(1).sum(1)[gt_indices.to(bitmaps.device)]
        ratios = inside.double() / (totals.double() + 1e-7)
        return ratios.to(device=boxes.device, dtype=torch.float32)
    if isinstance(gt_masks, PolygonMasks):
        ratios, totals = [], {}
        for (x0, y0, x1, y1), index in zip(corners.tolist(), indices):
            if index not in totals:
                totals[index] = _polygon_area(gt_masks.polygons[index], height, width)
            w, h = max(x1 - x0, 1), max(y1 - y0, 1)
            shifted = [p - np.array([x0, y0] * (len(p) // 2)) for p in gt_masks.polygons[index]]
            # the bitmap crop stops at the image's edge
            inside = _polygon_area(shifted, min(h, height - y0), min(w, width - x0))
            ratios.append(inside / (totals[index] + 1e-7))
    else:
        raise TypeError(f"gt_masks must be BitMasks or PolygonMasks, got {type(gt_masks)}")
    return torch.tensor(ratios, dtype=torch.float32, device=boxes.device)
