"""
Losses of the DETR-style query heads (Co-DINO and Co-Deformable-DETR).

:class:`DetectionLoss` takes dense per-query targets, so one class serves every loss of a
query head; only the assignment and the normalisers differ between the loss groups. How the
authors choose them (``num_positives`` normalises the box losses and, as in every official
config, the class loss):

============================  ==============================  ================================
loss group                    assignment (outside the loss)   num_positives (= class normaliser)
============================  ==============================  ================================
(a) decoder layers            Hungarian, per layer and image  matched pairs in the batch
(b) encoder proposals         Hungarian against the ground    matched pairs in the batch
                              truth; Co-DINO: the top-k
                              proposals with real labels;
                              Co-Deformable-DETR: every
                              encoder position, every label
                              replaced by 0 (object / not)
(c) denoising queries         fixed: in each group, the       number of ground truths times
                              positive query j <-> ground     the number of denoising groups,
                              truth j; negative and padding   summed over the batch
                              queries are background
(d) customized positive       given by the auxiliary head     queries with a label < K in the
    queries                   (no matching); padding          batch; the three losses are then
                              negatives are background        multiplied by lambda_1 (1.0)
============================  ==============================  ================================

In every row the count is averaged across workers and clamped to >= 1 with
:func:`codetr.modeling.distributed.average_across_workers` before it is passed in. In the
authors' code the class normaliser is ``num_pos + bg_cls_weight * num_neg`` with
``bg_cls_weight = 0`` for sigmoid classifiers, averaged across workers
(``sync_cls_avg_factor=True`` in every config) and clamped to >= 1, i.e. the same number as
the box normaliser. Every query has classification
weight 1 in every group (the authors' ``use_zero_padding`` option is off), so there are no
per-query weights.

With ``fed_loss_class_weights`` (LVIS; off by default, and in the authors' code) the class
loss is the federated loss (:mod:`codetr.modeling.fed_loss`): each call draws, per image, the
classes whose terms count; the normaliser is unchanged.
"""

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from .fed_loss import fed_loss_classes

__all__ = ["quality_focal_loss", "DetectionLoss"]

# Added to the union and enclosing area of the GIoU loss (boxes in pixels). The authors bound
# those areas from below by 1e-6 instead; the two differ only for boxes of near-zero area.
_GIOU_EPS = 1e-6
# Lower bound of the union in the IoU quality target, as in the authors' code, which computes
# that IoU on normalised boxes.
_QUALITY_IOU_EPS = 1e-6


def quality_focal_loss(
    logits: torch.Tensor, labels: torch.Tensor, quality: torch.Tensor, *, beta: float = 2.0
) -> torch.Tensor:
    """
    Quality focal loss (Li et al., "Generalized Focal Loss", 2020) per query.

    Every class is supervised towards 0 with the modulating factor ``sigmoid(x)^beta``,
    except the labelled class of a positive query, which is supervised towards its quality
    target ``q`` with the factor ``|q - sigmoid(x)|^beta``.

    Args:
        logits: (N, K) classification logits.
        labels: (N,) int64 labels in [0, K]; K means background.
        quality: (N,) soft targets of the labelled class (ignored for background).
        beta: exponent of the modulating factor.

    Returns:
        (N,) loss of each query, summed over the K classes.
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1] or quality.shape != labels.shape:
        raise ValueError(
            "expected logits (N, K), labels (N,) and quality (N,), got "
            f"{tuple(logits.shape)}, {tuple(labels.shape)} and {tuple(quality.shape)}"
        )
    return _quality_focal_terms(logits, labels, quality, beta).sum(dim=1)


def _quality_focal_terms(
    logits: torch.Tensor, labels: torch.Tensor, quality: torch.Tensor, beta: float
) -> torch.Tensor:
    """(N, K) quality focal loss of each query and class (see :func:`quality_focal_loss`)."""
    prob = logits.sigmoid()
    loss = F.binary_cross_entropy_with_logits(
        logits, torch.zeros_like(logits), reduction="none"
    ) * prob.pow(beta)

    positive = torch.nonzero(labels < logits.shape[1]).squeeze(1)
    positive_labels = labels[positive]
    positive_logits = logits[positive, positive_labels]
    positive_quality = quality[positive].to(logits.dtype)
    positive_loss = F.binary_cross_entropy_with_logits(
        positive_logits, positive_quality, reduction="none"
    ) * (positive_quality - prob[positive, positive_labels]).abs().pow(beta)
    return loss.index_put((positive, positive_labels), positive_loss)


def _aligned_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float) -> torch.Tensor:
    """IoU of boxes1[i] and boxes2[i], both (N, 4) in (x1, y1, x2, y2); union >= eps."""
    # not detectron2's matched_pairwise_iou: the authors bound the union by eps, which matters
    # here (a one-pixel box normalised by a 1333 x 800 image has an area below 1e-6)
    top_left = torch.max(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    overlap = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    union = (area1 + area2 - overlap).clamp(min=eps)
    return overlap / union


class DetectionLoss(nn.Module):
    """
    Classification, L1 and GIoU losses of DETR-style queries against dense per-query targets.

    * class loss: quality focal loss whose target for a positive query is the IoU (not GIoU)
      of its detached predicted box with its target box, or sigmoid focal loss with one-hot
      targets; summed over queries and classes, divided by the class normaliser.
    * L1 loss on normalised (cx, cy, w, h) and GIoU loss (1 - GIoU) on (x1, y1, x2, y2), both
      over positive queries only, summed and divided by ``num_positives``.
    * optionally (``fed_loss_class_weights``) the federated class loss: the class loss terms of
      image b, query q and class c are summed only where c is in S_b, the classes drawn by
      :func:`~codetr.modeling.fed_loss.fed_loss_classes` for image b in this call.

    Each loss is multiplied by its weight. See the module docstring for the normalisers (the
    authors add float32 eps to each normaliser, a relative change below 1.2e-7 left out here).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        class_loss: str,
        class_weight: float,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        qfl_beta: float = 2.0,
        fed_loss_class_weights: Optional[torch.Tensor] = None,
        fed_loss_num_classes: int = 50,
    ):
        """
        Args:
            num_classes: number of foreground classes K; label K means background.
            class_loss: "quality_focal" (Co-DINO) or "focal" (Co-Deformable-DETR).
            class_weight: weight of the class loss (1.0 for Co-DINO, 2.0 for
                Co-Deformable-DETR).
            l1_weight: weight of the L1 box loss.
            giou_weight: weight of the GIoU box loss.
            focal_alpha, focal_gamma: parameters of the "focal" class loss.
            qfl_beta: beta of the "quality_focal" class loss.
            fed_loss_class_weights: (K,) positive weights of the federated loss's class
                sampling (LVIS: ``get_fed_loss_cls_weights(names, freq_weight_power=0.5)``),
                or None (the default) for the class loss over every class.
            fed_loss_num_classes: the number of classes of the federated loss per image.
        """
        super().__init__()
        if class_loss not in ("quality_focal", "focal"):
            raise ValueError(f"class_loss must be 'quality_focal' or 'focal', got {class_loss!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if fed_loss_class_weights is not None:
            if fed_loss_class_weights.shape != (num_classes,):
                raise ValueError(
                    f"fed_loss_class_weights must have shape ({num_classes},), "
                    f"got {tuple(fed_loss_class_weights.shape)}"
                )
            if not bool(((fed_loss_class_weights > 0) & fed_loss_class_weights.isfinite()).all()):
                raise ValueError("fed_loss_class_weights must be positive and finite")
            fed_loss_class_weights = fed_loss_class_weights.detach().float().clone()
        if fed_loss_num_classes < 1:
            raise ValueError(f"fed_loss_num_classes must be positive, got {fed_loss_num_classes}")
        self.num_classes = num_classes
        self.class_loss = class_loss
        self.class_weight = class_weight
        self.l1_weight = l1_weight
        self.giou_weight = giou_weight
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.qfl_beta = qfl_beta
        # not in the state dict: checkpoints are the same with and without the federated loss
        self.register_buffer("fed_loss_class_weights", fed_loss_class_weights, persistent=False)
        self.fed_loss_num_classes = fed_loss_num_classes

    def forward(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        target_labels: torch.Tensor,
        target_boxes: torch.Tensor,
        *,
        box_normalizers: torch.Tensor,
        num_positives: float,
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            logits: (B, Q, K) classification logits.
            boxes: (B, Q, 4) predicted boxes, normalised (cx, cy, w, h).
            target_labels: (B, Q) int64 labels in [0, K]; K means background.
            target_boxes: (B, Q, 4) target boxes, normalised (cx, cy, w, h); ignored where
                the label is background.
            box_normalizers: (B, 4) per image (w, h, w, h) that ``boxes`` are normalised by:
                the GIoU loss is computed on boxes scaled back to pixels, as in the authors'
                code (the same value; scaling moves where rounding makes coordinates tie, and
                a tie decides which side of a min / max gets the gradient).
            num_positives: normaliser of the class and box losses, already averaged across
                workers and clamped (:func:`average_across_workers`).

        Returns:
            dict with scalar tensors "loss_class", "loss_bbox" (L1) and "loss_giou".
        """
        if logits.dim() != 3 or logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"logits must have shape (B, Q, {self.num_classes}), got {tuple(logits.shape)}"
            )
        batch_queries = logits.shape[:2]
        if boxes.shape != (*batch_queries, 4) or target_boxes.shape != (*batch_queries, 4):
            raise ValueError(
                f"boxes and target_boxes must have shape ({batch_queries[0]}, "
                f"{batch_queries[1]}, 4), got {tuple(boxes.shape)} and "
                f"{tuple(target_boxes.shape)}"
            )
        if box_normalizers.shape != (batch_queries[0], 4):
            raise ValueError(
                f"box_normalizers must have shape ({batch_queries[0]}, 4), "
                f"got {tuple(box_normalizers.shape)}"
            )
        if target_labels.shape != batch_queries:
            raise ValueError(
                f"target_labels must have shape {tuple(batch_queries)}, "
                f"got {tuple(target_labels.shape)}"
            )
        logits = logits.flatten(0, 1).float()
        boxes = boxes.flatten(0, 1).float()
        labels = target_labels.flatten()
        target_boxes = target_boxes.flatten(0, 1).float()

        positive = labels < self.num_classes
        positive_boxes = box_convert(boxes[positive], "cxcywh", "xyxy")
        positive_target_boxes = box_convert(target_boxes[positive], "cxcywh", "xyxy")

        if self.class_loss == "quality_focal":
            quality = torch.zeros_like(labels, dtype=logits.dtype)
            quality[positive] = _aligned_iou(
                positive_boxes.detach(), positive_target_boxes, _QUALITY_IOU_EPS
            )
            class_terms = _quality_focal_terms(logits, labels, quality, self.qfl_beta)
        else:
            one_hot = F.one_hot(labels, self.num_classes + 1)[:, : self.num_classes]
            class_terms = sigmoid_focal_loss(
                logits,
                one_hot.to(logits.dtype),
                alpha=self.focal_alpha,
                gamma=self.focal_gamma,
                reduction="none",
            )
        if self.fed_loss_class_weights is not None:
            counted = fed_loss_classes(
                target_labels, self.fed_loss_class_weights, self.fed_loss_num_classes
            )
            counted = counted[:, None].expand(*batch_queries, -1).flatten(0, 1)
            class_terms = class_terms.masked_fill(~counted, 0.0)
        # reduced as quality_focal_loss (per query first) / sigmoid_focal_loss(reduction="sum")
        if self.class_loss == "quality_focal":
            class_loss = class_terms.sum(dim=1).sum()
        else:
            class_loss = class_terms.sum()

        l1_loss = (boxes[positive] - target_boxes[positive]).abs().sum()
        pixels = box_normalizers.float()[:, None].expand(*batch_queries, 4).flatten(0, 1)
        pixels = pixels[positive]
        giou_loss = generalized_box_iou_loss(
            positive_boxes * pixels, positive_target_boxes * pixels, reduction="sum", eps=_GIOU_EPS
        )
        return {
            "loss_class": class_loss / num_positives * self.class_weight,
            "loss_bbox": l1_loss / num_positives * self.l1_weight,
            "loss_giou": giou_loss / num_positives * self.giou_weight,
        }
