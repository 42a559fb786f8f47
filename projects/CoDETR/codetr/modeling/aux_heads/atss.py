"""
The ATSS auxiliary head of Co-DETR (:paper:`atss`, "Bridging the Gap Between Anchor-based and
Anchor-free Detection via Adaptive Training Sample Selection").

One anchor per location (a square of 8 x stride centred on the location), a classification
tower and a box tower, a class / box-delta / centerness prediction per anchor. In training the
anchors are labelled by Adaptive Training Sample Selection (:func:`atss_assign`) and every
anchor with its assignment is handed to the positive-query branch as :class:`AssignedCoords`.
At test time (``eval_module = one-stage``) :meth:`ATSSHead.inference` produces detections.

Parameters follow the authors' ``CoATSSHead`` so that their checkpoints map one to one:

=====================================  ======================================
authors' name (mmdet ``CoATSSHead``)   this module
=====================================  ======================================
``cls_convs.{i}.conv.weight``          ``cls_tower.{i}.weight``
``cls_convs.{i}.gn.{weight,bias}``     ``cls_tower.{i}.norm.{weight,bias}``
``reg_convs.{i}.conv.weight``          ``bbox_tower.{i}.weight``
``reg_convs.{i}.gn.{weight,bias}``     ``bbox_tower.{i}.norm.{weight,bias}``
``atss_cls.{weight,bias}``             ``cls_score.{weight,bias}``
``atss_reg.{weight,bias}``             ``bbox_pred.{weight,bias}``
``atss_centerness.{weight,bias}``      ``centerness.{weight,bias}``
``scales.{l}.scale``                   ``scales.{l}.scale``
=====================================  ======================================
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, ShapeSpec, batched_nms, get_norm
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from codetr.layers import batched_soft_nms

from ..distributed import average_across_workers
from .anchors import valid_anchor_mask
from .base import AssignedCoords

__all__ = ["ATSSHead", "Scale", "atss_assign"]

# The assigner requires a positive anchor's centre to lie this far inside its ground-truth box.
_MIN_CENTER_INSIDE_DISTANCE = 0.01


@torch.no_grad()
def atss_assign(
    anchors: Tensor, num_anchors_per_level: Sequence[int], gt_boxes: Tensor, *, topk: int
) -> Tensor:
    """
    Adaptive Training Sample Selection, as mmdet's ``ATSSAssigner``:

    1. on each level, the ``topk`` anchors whose centres are closest (L2) to a ground-truth
       box centre are that box's candidates (all of them if the level has fewer);
    2. a box's IoU threshold is the mean plus the (unbiased) standard deviation of its
       candidates' IoUs; candidates with IoU >= threshold whose centre lies more than 0.01
       inside the box are positive;
    3. an anchor positive for several boxes takes the one it overlaps most.

    Args:
        anchors: (A, 4) XYXY anchors of all levels, concatenated level by level.
        num_anchors_per_level: number of anchors of each level; sums to A.
        gt_boxes: (G, 4) XYXY ground-truth boxes (G may be 0).
        topk: number of candidates per level and box.

    Returns:
        (A,) int64: index of the assigned ground-truth box per anchor, -1 for background.
    """
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
    if sum(num_anchors_per_level) != num_anchors:
        raise ValueError(
            f"num_anchors_per_level {list(num_anchors_per_level)} does not sum to the number "
            f"of anchors {num_anchors}"
        )
    matched_gt_idx = torch.full((num_anchors,), -1, dtype=torch.long, device=anchors.device)
    if num_gt == 0 or num_anchors == 0:
        return matched_gt_idx

    ious = pairwise_iou(Boxes(anchors), Boxes(gt_boxes))  # (A, G)
    anchor_centers = (anchors[:, :2] + anchors[:, 2:]) / 2.0
    gt_centers = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2.0
    distances = (anchor_centers[:, None, :] - gt_centers[None, :, :]).pow(2).sum(-1).sqrt()

    candidate_idxs = []
    start = 0
    for num_level in num_anchors_per_level:
        k = min(topk, num_level)
        _, level_idxs = distances[start : start + num_level].topk(k, dim=0, largest=False)
        candidate_idxs.append(level_idxs + start)
        start += num_level
    candidate_idxs = torch.cat(candidate_idxs, dim=0)  # (K, G), K = sum of per-level k
    gt_idxs = torch.arange(num_gt, device=anchors.device).expand_as(candidate_idxs)

    candidate_ious = ious[candidate_idxs, gt_idxs]  # (K, G)
    iou_thresholds = candidate_ious.mean(0) + candidate_ious.std(0)
    is_pos = candidate_ious >= iou_thresholds[None, :]

    candidate_centers = anchor_centers[candidate_idxs]  # (K, G, 2)
    center_to_sides = torch.cat(
        [candidate_centers - gt_boxes[None, :, :2], gt_boxes[None, :, 2:] - candidate_centers],
        dim=2,
    )  # (K, G, 4): left, top, right, bottom
    is_pos &= center_to_sides.min(dim=2).values > _MIN_CENTER_INSIDE_DISTANCE

    positive_ious = torch.full_like(ious, -math.inf)
    positive_ious[candidate_idxs[is_pos], gt_idxs[is_pos]] = ious[
        candidate_idxs[is_pos], gt_idxs[is_pos]
    ]
    max_ious, best_gt = positive_ious.max(dim=1)
    is_assigned = max_ious != -math.inf
    matched_gt_idx[is_assigned] = best_gt[is_assigned]
    return matched_gt_idx


class Scale(nn.Module):
    """A learnable scalar that multiplies its input (mmcv's ``Scale``)."""

    def __init__(self, init_value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(init_value, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class ATSSHead(nn.Module):
    """
    ATSS dense head used as a Co-DETR auxiliary head (see the module docstring).

    Training: ``losses, assignments = head(features, images, gt_instances)`` (the contract of
    :mod:`codetr.modeling.aux_heads.base`). Test: ``head.inference(features, images)``.
    """

    kind = "one-stage"

    def __init__(
        self,
        *,
        input_shape: Dict[str, ShapeSpec],
        num_classes: int,
        in_features: Optional[List[str]] = None,
        num_convs: int = 1,
        norm: str = "GN",
        anchor_generator: Optional[DefaultAnchorGenerator] = None,
        box2box_transform: Optional[Box2BoxTransform] = None,
        topk: int = 9,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        cls_loss_weight: float = 1.0,
        bbox_loss_weight: float = 2.0,
        centerness_loss_weight: float = 1.0,
        prior_prob: float = 0.01,
        test_topk_candidates: int = 1000,
        test_score_thresh: float = 0.0,
        test_nms_thresh: float = 0.6,
        max_detections_per_image: int = 100,
        test_soft_nms: bool = False,
    ):
        """
        Args:
            input_shape: shape of every feature map the head may read.
            num_classes: number of foreground classes.
            in_features: names of the levels the head uses, finest first; default: all of
                ``input_shape`` by stride (``p2`` ... ``p7``, strides 4..128, for Co-DINO).
            num_convs: number of 3x3 conv + norm + ReLU layers in each tower.
            norm: normalisation of the tower convs (detectron2 ``get_norm``; "GN" is
                GroupNorm with 32 groups, "" none).
            anchor_generator: one anchor per location per level; default: squares of
                8 x stride centred on the locations (offset 0.0), as the authors'.
            box2box_transform: box delta coder; default weights (10, 10, 5, 5), i.e. the
                authors' target stds (0.1, 0.1, 0.2, 0.2).
            topk: ATSS candidates per level and ground-truth box.
            focal_alpha, focal_gamma: sigmoid focal loss parameters.
            cls_loss_weight, bbox_loss_weight, centerness_loss_weight: weights of the focal,
                GIoU and centerness losses (the authors' 1, 2, 1; the meta-architecture's
                lambda_2 multiplies all the head's losses).
            prior_prob: initial foreground probability of the classifier.
            test_topk_candidates: candidates kept per level before NMS at test time.
            test_score_thresh: classification probability a candidate must exceed.
            test_nms_thresh: IoU threshold of the class-aware NMS.
            max_detections_per_image: detections kept per image.
            test_soft_nms: class-aware linear soft-NMS at ``test_nms_thresh`` in place of NMS
                (the authors' ViT-L model).
        """
        super().__init__()
        if in_features is None:
            in_features = sorted(input_shape, key=lambda name: input_shape[name].stride)
        missing = [name for name in in_features if name not in input_shape]
        if not in_features or missing:
            raise ValueError(
                f"in_features {in_features} must be non-empty names of input_shape "
                f"{sorted(input_shape)}"
            )
        shapes = [input_shape[name] for name in in_features]
        channels = {shape.channels for shape in shapes}
        if len(channels) != 1:
            raise ValueError(f"all in_features must have the same channels, got {channels}")
        in_channels = channels.pop()
        strides = [shape.stride for shape in shapes]
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if num_convs < 0:
            raise ValueError(f"num_convs must be >= 0, got {num_convs}")

        if anchor_generator is None:
            anchor_generator = DefaultAnchorGenerator(
                sizes=[[8 * stride] for stride in strides],
                aspect_ratios=[1.0],
                strides=strides,
                offset=0.0,
            )
        if list(anchor_generator.strides) != strides:
            raise ValueError(
                f"anchor_generator strides {anchor_generator.strides} differ from the "
                f"in_features strides {strides}"
            )
        if any(n != 1 for n in anchor_generator.num_cell_anchors):
            raise ValueError(
                "ATSSHead needs one anchor per location, anchor_generator has "
                f"{anchor_generator.num_cell_anchors}"
            )
        if box2box_transform is None:
            box2box_transform = Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0))

        self.in_features = list(in_features)
        self.strides = strides
        self.num_classes = num_classes
        self.anchor_generator = anchor_generator
        self.box2box_transform = box2box_transform
        self.topk = topk
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.cls_loss_weight = cls_loss_weight
        self.bbox_loss_weight = bbox_loss_weight
        self.centerness_loss_weight = centerness_loss_weight
        self.test_topk_candidates = test_topk_candidates
        self.test_score_thresh = test_score_thresh
        self.test_nms_thresh = test_nms_thresh
        self.max_detections_per_image = max_detections_per_image
        self.test_soft_nms = test_soft_nms

        self.cls_tower = self._make_tower(in_channels, num_convs, norm)
        self.bbox_tower = self._make_tower(in_channels, num_convs, norm)
        self.cls_score = nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, 4, kernel_size=3, padding=1)
        self.centerness = nn.Conv2d(in_channels, 1, kernel_size=3, padding=1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in strides])

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, mean=0.0, std=0.01)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0.0)
        nn.init.constant_(self.cls_score.bias, -math.log((1.0 - prior_prob) / prior_prob))

    @staticmethod
    def _make_tower(channels: int, num_convs: int, norm: str) -> nn.Sequential:
        return nn.Sequential(
            *[
                Conv2d(
                    channels,
                    channels,
                    kernel_size=3,
                    padding=1,
                    bias=not norm,
                    norm=get_norm(norm, channels),
                    activation=nn.ReLU(inplace=True),
                )
                for _ in range(num_convs)
            ]
        )

    def _predict(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """
        Returns, per level l with H_l x W_l locations (row-major, as the anchors):
            class logits (B, H_l*W_l, num_classes), box deltas (B, H_l*W_l, 4) in float32,
            centerness logits (B, H_l*W_l).
        """
        logits, deltas, centerness = [], [], []
        for feature, scale in zip(features, self.scales):
            cls_feature = self.cls_tower(feature)
            bbox_feature = self.bbox_tower(feature)
            logits.append(self.cls_score(cls_feature).flatten(2).transpose(1, 2))
            level_deltas = scale(self.bbox_pred(bbox_feature)).float()
            deltas.append(level_deltas.flatten(2).transpose(1, 2))
            centerness.append(self.centerness(bbox_feature).flatten(1))
        return logits, deltas, centerness

    def _decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """
        Decode (N, 4) deltas against (N, 4) anchors. Like the authors' coder, the size deltas
        are clamped from below as well (detectron2 clamps them only from above).
        """
        transform = self.box2box_transform
        lower = deltas.new_tensor(
            [-math.inf, -math.inf]
            + [-transform.scale_clamp * weight for weight in transform.weights[2:]]
        )
        return transform.apply_deltas(torch.maximum(deltas, lower), anchors)

    @torch.no_grad()
    def label_anchors(
        self,
        anchors: Tensor,
        num_anchors_per_level: List[int],
        valid_masks: List[Tensor],
        gt_instances: List[Instances],
    ) -> Tuple[Tensor, Tensor]:
        """
        Args:
            anchors: (A, 4) anchors of all levels.
            num_anchors_per_level: anchors of each level.
            valid_masks: per image, (A,) bool of the anchors that take part in the assignment;
                the others are background with no classification loss.
            gt_instances: per image, ``gt_boxes`` and ``gt_classes``.

        Returns:
            labels (B, A) int64, the class per anchor, ``num_classes`` for background;
            target_boxes (B, A, 4), the assigned ground-truth box, zeros for background.
        """
        labels, target_boxes = [], []
        for valid, instances in zip(valid_masks, gt_instances):
            gt_boxes = instances.gt_boxes.tensor
            valid_per_level = [int(m.sum()) for m in valid.split(num_anchors_per_level)]
            matched_gt_idx = torch.full_like(valid, -1, dtype=torch.long)
            matched_gt_idx[valid] = atss_assign(
                anchors[valid], valid_per_level, gt_boxes, topk=self.topk
            )
            positive = matched_gt_idx >= 0
            image_labels = torch.full_like(matched_gt_idx, self.num_classes)
            image_labels[positive] = instances.gt_classes[matched_gt_idx[positive]]
            image_targets = torch.zeros_like(anchors)
            image_targets[positive] = gt_boxes[matched_gt_idx[positive]].to(anchors.dtype)
            labels.append(image_labels)
            target_boxes.append(image_targets)
        return torch.stack(labels), torch.stack(target_boxes)

    def forward(
        self, features: Dict[str, Tensor], images: ImageList, gt_instances: List[Instances]
    ) -> Tuple[Dict[str, Tensor], List[AssignedCoords]]:
        """
        Training step.

        Args:
            features: level name -> (B, C, H_l, W_l).
            images: the padded batch; ``image_sizes`` bound the anchors that are assigned.
            gt_instances: per image, ``gt_boxes`` (XYXY input pixels) and ``gt_classes``.

        Returns:
            losses: "loss_cls", "loss_bbox", "loss_centerness" (scalars, already weighted).
            assignments: per image, all anchors with their assigned labels and boxes.
        """
        if len(gt_instances) != len(images):
            raise ValueError(
                f"got {len(gt_instances)} gt_instances for a batch of {len(images)} images"
            )
        level_features = [features[name] for name in self.in_features]
        logits, deltas, centerness = self._predict(level_features)
        anchors_per_level = self.anchor_generator(level_features)
        num_anchors_per_level = [len(a) for a in anchors_per_level]
        anchors = Boxes.cat(anchors_per_level).tensor

        valid_masks = list(
            valid_anchor_mask(
                anchors_per_level, self.strides, self.anchor_generator.offset, images.image_sizes
            )
        )
        labels, target_boxes = self.label_anchors(
            anchors, num_anchors_per_level, valid_masks, gt_instances
        )
        losses = self.losses(
            anchors,
            torch.stack(valid_masks),
            labels,
            target_boxes,
            torch.cat(logits, dim=1),
            torch.cat(deltas, dim=1),
            torch.cat(centerness, dim=1),
        )
        assignments = [
            # As in the authors' code, anchors outside the image's valid region are reported
            # as zero boxes (they take no part in the assignment).
            AssignedCoords(
                boxes=anchors * valid[:, None], labels=image_labels, target_boxes=image_targets
            )
            for valid, image_labels, image_targets in zip(valid_masks, labels, target_boxes)
        ]
        return losses, assignments

    def losses(
        self,
        anchors: Tensor,
        valid: Tensor,
        labels: Tensor,
        target_boxes: Tensor,
        pred_logits: Tensor,
        pred_deltas: Tensor,
        pred_centerness: Tensor,
    ) -> Dict[str, Tensor]:
        """
        The authors' ATSS losses:

        - focal loss over the valid anchors and all classes, divided by the number of
          positives (each image counting at least 1) averaged over workers, clamped >= 1;
        - GIoU loss of the decoded positive boxes weighted by their centerness targets,
          divided by the sum of those targets averaged over workers, clamped >= 1;
        - centerness BCE of the positives divided by the same number as the focal loss.

        (torchvision's GIoU adds 1e-7 to the union and enclosing areas where the authors bound
        them below by 1e-6: no difference for boxes in pixels.)

        Args:
            anchors: (A, 4). valid: (B, A) bool. labels: (B, A). target_boxes: (B, A, 4).
            pred_logits: (B, A, num_classes). pred_deltas: (B, A, 4).
            pred_centerness: (B, A).
        """
        pred_logits = pred_logits.float()
        pred_centerness = pred_centerness.float()
        positive = labels != self.num_classes  # (B, A)
        num_pos_per_image = positive.sum(dim=1).clamp(min=1)
        normalizer = average_across_workers(num_pos_per_image.sum().item(), anchors.device)

        cls_targets = F.one_hot(labels, num_classes=self.num_classes + 1)[..., :-1]
        loss_cls = sigmoid_focal_loss(
            pred_logits,
            cls_targets.to(pred_logits.dtype),
            alpha=self.focal_alpha,
            gamma=self.focal_gamma,
            reduction="none",
        )
        loss_cls = (loss_cls * valid[..., None]).sum() / normalizer

        pos_anchors = anchors.expand_as(target_boxes)[positive]  # (P, 4)
        pos_targets = target_boxes[positive]
        centerness_targets = self.centerness_targets(pos_anchors, pos_targets)
        bbox_normalizer = average_across_workers(centerness_targets.sum().item(), anchors.device)
        if positive.any():
            pred_boxes = self._decode(pred_deltas[positive], pos_anchors)
            giou = generalized_box_iou_loss(pred_boxes, pos_targets, reduction="none")
            loss_bbox = (giou * centerness_targets).sum() / bbox_normalizer
            loss_centerness = (
                F.binary_cross_entropy_with_logits(
                    pred_centerness[positive], centerness_targets, reduction="sum"
                )
                / normalizer
            )
        else:
            # Zero losses that keep every prediction in the graph.
            loss_bbox = pred_deltas.sum() * 0.0
            loss_centerness = pred_centerness.sum() * 0.0
        return {
            "loss_cls": loss_cls * self.cls_loss_weight,
            "loss_bbox": loss_bbox * self.bbox_loss_weight,
            "loss_centerness": loss_centerness * self.centerness_loss_weight,
        }

    @staticmethod
    def centerness_targets(anchors: Tensor, boxes: Tensor) -> Tensor:
        """
        FCOS centerness of each anchor centre in its (N, 4) assigned box:
        sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)); centres must lie inside.
        """
        centers = (anchors[:, :2] + anchors[:, 2:]) / 2
        left_top = centers - boxes[:, :2]
        right_bottom = boxes[:, 2:] - centers
        ratios = torch.minimum(left_top, right_bottom) / torch.maximum(left_top, right_bottom)
        return torch.sqrt(ratios[:, 0] * ratios[:, 1])

    def inference(self, features: Dict[str, Tensor], images: ImageList) -> List[Instances]:
        """
        The authors' ATSS test: per level, the ``test_topk_candidates`` highest classification
        probabilities above ``test_score_thresh`` (over anchor x class pairs); their score is
        then multiplied by the centerness probability; boxes are decoded and clipped to the
        image, and a class-aware NMS (or soft-NMS, ``test_soft_nms``) keeps
        ``max_detections_per_image``.

        Returns:
            per image, ``Instances`` of ``images.image_sizes[i]`` with ``pred_boxes``,
            ``scores`` and ``pred_classes`` in input-image coordinates; float32 also when the
            head ran under autocast (its outputs are cast before the ranking).
        """
        level_features = [features[name] for name in self.in_features]
        logits, deltas, centerness = (
            [level.float() for level in outputs] for outputs in self._predict(level_features)
        )
        anchors_per_level = self.anchor_generator(level_features)

        results = []
        # not DenseDetector._decode_per_level_predictions: it does not return the anchor
        # indices that the centerness factor needs, and it decodes without the lower clamp
        for img_idx, image_size in enumerate(images.image_sizes):
            boxes, scores, classes = [], [], []
            for level_logits, level_deltas, level_centerness, level_anchors in zip(
                logits, deltas, centerness, anchors_per_level
            ):
                probs = level_logits[img_idx].sigmoid()  # (HW, num_classes)
                keep = probs > self.test_score_thresh
                candidate_scores = probs[keep]
                candidate_idxs = keep.nonzero()
                num_topk = min(self.test_topk_candidates, candidate_scores.numel())
                candidate_scores, order = candidate_scores.topk(num_topk)
                anchor_idxs, class_idxs = candidate_idxs[order].unbind(dim=1)
                scores.append(candidate_scores * level_centerness[img_idx, anchor_idxs].sigmoid())
                boxes.append(
                    self._decode(
                        level_deltas[img_idx, anchor_idxs], level_anchors.tensor[anchor_idxs]
                    )
                )
                classes.append(class_idxs)
            pred_boxes = Boxes(torch.cat(boxes))
            pred_boxes.clip(image_size)
            scores = torch.cat(scores)
            classes = torch.cat(classes)
            if self.test_soft_nms:
                keep, scores = batched_soft_nms(
                    pred_boxes.tensor,
                    scores,
                    classes,
                    iou_threshold=self.test_nms_thresh,
                    max_keep=self.max_detections_per_image,
                )
            else:
                keep = batched_nms(pred_boxes.tensor, scores, classes, self.test_nms_thresh)
                keep = keep[: self.max_detections_per_image]
                scores = scores[keep]
            results.append(
                Instances(
                    image_size,
                    pred_boxes=pred_boxes[keep],
                    scores=scores,
                    pred_classes=classes[keep],
                )
            )
        return results
