"""
The Faster R-CNN auxiliary head of Co-DETR, assembled from detectron2's RPN and RoI heads.

In training the head runs an RPN and a Fast R-CNN box branch on the encoder's per-level maps and
returns their losses together with its one-to-many assignment: the RoIs it sampled, their
assigned class and ground-truth box, and their RoI features averaged over the 7x7 grid. At test
time (``eval_module="two-stage"``) it returns the box branch's detections.

:func:`build_rcnn_aux_head` configures the parts as the authors' Co-DETR configs (mmdet 2.x
``RPNHead`` + ``CoStandardRoIHead`` with ``Shared2FCBBoxHead``). Inference follows the authors'
computation; training follows detectron2's matching, sampling and loss normalisation, which
differs from mmdet's in details listed in :class:`RCNNAuxHead`.
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.proposal_generator.rpn import RPN, StandardRPNHead
from detectron2.modeling.roi_heads import FastRCNNConvFCHead, FastRCNNOutputLayers, StandardROIHeads
from detectron2.structures import ImageList, Instances
from torch import Tensor, nn

from codetr.modeling.aux_heads.base import AssignedCoords

__all__ = ["RCNNAuxROIHeads", "RCNNAuxHead", "build_rcnn_aux_head"]


class RCNNAuxROIHeads(StandardROIHeads):
    """
    detectron2's :class:`StandardROIHeads` (box branch only) whose training pass also stores, on
    every sampled proposal, its pooled RoI feature averaged over the pooler's output grid.

    In training, ``forward`` returns the sampled proposals, each ``Instances`` carrying
    ``proposal_boxes``, ``gt_classes`` (``num_classes`` for background), ``gt_boxes`` (only when
    the image has ground truth; detectron2 leaves the field out otherwise) and
    ``pooled_features`` (R, C); the features are the ones the box head consumed, so the RoIs are
    pooled once. Mask and keypoint branches and ``train_on_pred_boxes`` are not supported.
    """

    def _forward_box(self, features: Dict[str, Tensor], proposals: List[Instances]):
        box_features = self.box_pooler(
            [features[f] for f in self.box_in_features], [p.proposal_boxes for p in proposals]
        )  # (R, C, output_size, output_size) over all images
        predictions = self.box_predictor(self.box_head(box_features))
        if not self.training:
            pred_instances, _ = self.box_predictor.inference(predictions, proposals)
            return pred_instances
        losses = self.box_predictor.losses(predictions, proposals)
        mean_features = box_features.mean(dim=(2, 3)).split([len(p) for p in proposals])
        for proposals_per_image, features_per_image in zip(proposals, mean_features):
            proposals_per_image.pooled_features = features_per_image
        return losses


class RCNNAuxHead(nn.Module):
    """
    RPN + Fast R-CNN box branch used as a Co-DETR auxiliary head.

    Training: ``losses, assignments = head(features, images, gt_instances)`` with losses
    ``loss_rpn_cls``, ``loss_rpn_loc`` (RPN) and ``loss_cls``, ``loss_box_reg`` (RoI head), and one
    :class:`AssignedCoords` per image holding the sampled RoIs (positives first). As in the
    authors' ``CoStandardRoIHead``, every image keeps only its first ``n`` sampled RoIs, ``n``
    being the smallest number of RoIs sampled for an image of the batch.

    Test: :meth:`inference` returns per image ``Instances`` with ``pred_boxes`` (XYXY in the
    input-image frame, clipped to ``images.image_sizes``), ``scores`` and ``pred_classes``.
    Proposals are clipped to ``images.image_sizes`` too; for LSJ-style inputs the authors clip to
    the padded batch size, so pass an ``ImageList`` whose ``image_sizes`` are the padded size.

    Differences from the authors' mmdet implementation (inference is unaffected except for
    ties in NMS ordering and the numerical edge cases noted):

    * Anchor order within a location: mmdet enumerates ratio-major, scale-minor (index
      ``r * num_scales + s``); detectron2 size-major, ratio-minor (``s * num_ratios + r``). A
      checkpoint converter must permute the output channels of ``rpn_cls`` and the groups of 4
      output channels of ``rpn_reg`` accordingly. Anchor sizes equal mmdet's up to float rounding.
    * RPN low-quality matches: detectron2 makes each ground truth's highest-IoU anchors positive
      whatever that IoU (mmdet requires ``min_pos_iou`` = 0.3) and leaves them matched to their
      own highest-IoU ground truth (mmdet re-assigns them to the ground truth they are best for).
    * RPN anchors: mmdet ignores anchors at feature locations beyond each image's own padded
      extent (``ceil(pad_h / stride)``); detectron2 uses every anchor of the batch-padded maps.
    * RPN loss normaliser: detectron2 divides both RPN losses by ``256 * num_images``; mmdet by
      the number of sampled anchors summed over images (each image's positive and negative counts
      taken as at least 1). They agree when every image samples 256 anchors with at least one
      positive.
    * Ground truth as proposals: mmdet prepends the boxes and assigns each to its own ground
      truth; detectron2 appends them and matches them by IoU (the same unless two ground-truth
      boxes coincide). mmdet orders sampled RoIs by index, detectron2 randomly within positives
      and within negatives; both put positives first.
    * Box decoding: detectron2 clamps log-size deltas from above only (at ``log(1000 / 16)``),
      mmdet from both sides.
    * RoI level mapping: ``floor(log2(sqrt(area) / finest_scale + eps))`` with ``eps`` 1e-6 in
      mmdet and 1e-8 in detectron2, which moves only boxes within 1e-6 of a level boundary.
    * Initialisation of the two FC layers: detectron2's ``c2_xavier_fill`` versus mmdet's
      uniform Xavier (irrelevant when loading a checkpoint).
    * The RoI losses use the same normalisers as mmdet (the number of sampled RoIs); the GIoU
      loss's eps is 1e-7 (fvcore) instead of 1e-6.
    """

    kind = "two-stage"
    """The ``eval_module`` name under which this head produces the test output."""

    def __init__(self, *, rpn: RPN, roi_heads: RCNNAuxROIHeads):
        """
        Args:
            rpn: detectron2 RPN (``StandardRPNHead``, ``DefaultAnchorGenerator``).
            roi_heads: the box branch.
        """
        super().__init__()
        self.rpn = rpn
        self.roi_heads = roi_heads

    def forward(
        self, features: Dict[str, Tensor], images: ImageList, gt_instances: List[Instances]
    ) -> Tuple[Dict[str, Tensor], List[AssignedCoords]]:
        """
        Args:
            features: per-level maps, each (B, C, H_l, W_l).
            images: the batch; ``image_sizes`` clip the proposals.
            gt_instances: B ``Instances`` with ``gt_boxes`` (absolute XYXY) and ``gt_classes``;
                may be empty.

        Returns:
            losses: ``loss_rpn_cls``, ``loss_rpn_loc``, ``loss_cls``, ``loss_box_reg``.
            assignments: per image, ``boxes`` (N, 4) sampled RoIs, ``labels`` (N,) their class
                (``num_classes`` for background), ``target_boxes`` (N, 4) their ground-truth box
                (zeros for background) and ``features`` (N, C) their mean-pooled RoI features.
        """
        if not self.training:
            raise RuntimeError("RCNNAuxHead.forward computes training losses; use inference()")
        if len(gt_instances) != len(images):
            raise ValueError(
                f"gt_instances has {len(gt_instances)} entries for a batch of {len(images)}"
            )
        proposals, rpn_losses = self.rpn(images, features, gt_instances)
        sampled, roi_losses = self.roi_heads(images, features, proposals, gt_instances)
        num_kept = min(len(p) for p in sampled)
        assignments = [self._assignment(p[:num_kept]) for p in sampled]
        return {**rpn_losses, **roi_losses}, assignments

    def _assignment(self, sampled: Instances) -> AssignedCoords:
        labels = sampled.gt_classes
        boxes = sampled.proposal_boxes.tensor
        if sampled.has("gt_boxes"):
            foreground = (labels < self.roi_heads.num_classes)[:, None]
            target_boxes = torch.where(foreground, sampled.gt_boxes.tensor, 0.0)
        else:  # no ground truth in this image: every sampled RoI is background
            target_boxes = torch.zeros_like(boxes)
        return AssignedCoords(
            boxes=boxes,
            labels=labels,
            target_boxes=target_boxes,
            features=sampled.pooled_features,
        )

    def inference(self, features: Dict[str, Tensor], images: ImageList) -> List[Instances]:
        """
        Two-stage detection (RPN proposals, then the box branch with per-class NMS).

        Args:
            features: per-level maps, each (B, C, H_l, W_l).
            images: the batch; ``image_sizes`` clip proposals and detections.

        Returns:
            B ``Instances`` with ``pred_boxes`` (absolute XYXY), ``scores`` and ``pred_classes``.
            The branch runs in float32 also inside an autocast region (the features are cast):
            it is cheap next to the encoder, and its proposals, NMS and scores stay exact.
        """
        if self.training:
            raise RuntimeError("RCNNAuxHead.inference needs eval mode; call .eval() first")
        features = {name: feature.float() for name, feature in features.items()}
        with torch.autocast(images.tensor.device.type, enabled=False):
            proposals, _ = self.rpn(images, features)
            detections, _ = self.roi_heads(images, features, proposals)
        return detections


def build_rcnn_aux_head(
    *,
    input_shape: Dict[str, ShapeSpec],
    in_features: List[str],
    num_classes: int,
    roi_in_features: Optional[List[str]] = None,
    finest_scale: int = 56,
    anchor_octave_base_scale: float = 4.0,
    anchor_scales_per_octave: int = 3,
    anchor_aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    rpn_loss_weight: float = 12.0,
    rpn_train_pre_nms_topk: int = 4000,
    rpn_train_post_nms_topk: int = 1000,
    rpn_test_pre_nms_topk: int = 1000,
    rpn_test_post_nms_topk: int = 1000,
    rpn_nms_thresh: float = 0.7,
    fc_dim: int = 1024,
    cls_loss_weight: float = 12.0,
    giou_loss_weight: float = 120.0,
    test_score_thresh: float = 0.0,
    test_nms_thresh: float = 0.5,
    test_topk_per_image: int = 100,
) -> RCNNAuxHead:
    """
    Builds the Faster R-CNN auxiliary head with the settings of the authors' configs.

    RPN: one 3x3 conv; per level ``anchor_scales_per_octave`` anchor sizes
    ``stride * anchor_octave_base_scale * 2^(i / anchor_scales_per_octave)`` times each aspect
    ratio, centred on ``stride * (x, y)`` (offset 0); IoU matching 0.3 / 0.7 with low-quality
    matches; 256 anchors sampled at 0.5 positive; L1 on deltas (weights 1, 1, 1, 1); NMS per
    level. RoI head: 7x7 aligned RoIAlign (adaptive sampling) on ``roi_in_features``; two FC
    layers of ``fc_dim``; class-specific regression with weights (10, 10, 5, 5) trained with GIoU
    on the decoded boxes; IoU matching at 0.5 without low-quality matches; 512 RoIs sampled at
    0.25 positive, ground-truth boxes added as proposals.

    Args:
        input_shape: channels and stride of every level; all levels share the channel count.
        in_features: levels used by the RPN, finest first (Co-DINO: strides 4..128).
        num_classes: number of foreground classes.
        roi_in_features: levels the RoIs are pooled from, consecutive powers of two finest
            first; defaults to the first five of ``in_features`` (Co-Deformable-DETR uses four).
        finest_scale: RoIs with ``sqrt(area) < 2 * finest_scale`` go to the first RoI level, and
            each doubling moves one level up (mmdet's ``SingleRoIExtractor``).
        anchor_octave_base_scale, anchor_scales_per_octave, anchor_aspect_ratios: anchors as
            mmdet's ``AnchorGenerator``; ratios are height / width.
        rpn_loss_weight: weight of both RPN losses.
        rpn_train_pre_nms_topk, rpn_test_pre_nms_topk: proposals kept per level before NMS.
        rpn_train_post_nms_topk, rpn_test_post_nms_topk: proposals kept per image after NMS.
        rpn_nms_thresh: IoU threshold of the proposal NMS.
        fc_dim: width of the two shared FC layers.
        cls_loss_weight, giou_loss_weight: weights of the RoI classification and GIoU losses.
        test_score_thresh, test_nms_thresh, test_topk_per_image: detection post-processing
            (per-class NMS).
    """
    missing = [f for f in in_features if f not in input_shape]
    if missing:
        raise ValueError(f"in_features {missing} are not in input_shape {sorted(input_shape)}")
    if roi_in_features is None:
        roi_in_features = in_features[:5]
    missing = [f for f in roi_in_features if f not in input_shape]
    if missing:
        raise ValueError(f"roi_in_features {missing} are not in input_shape {sorted(input_shape)}")
    channels = {input_shape[f].channels for f in in_features + roi_in_features}
    if len(channels) != 1:
        raise ValueError(f"all levels must have the same channel count, got {sorted(channels)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    (in_channels,) = channels

    strides = [input_shape[f].stride for f in in_features]
    anchor_generator = DefaultAnchorGenerator(
        sizes=[
            [
                stride * anchor_octave_base_scale * 2 ** (i / anchor_scales_per_octave)
                for i in range(anchor_scales_per_octave)
            ]
            for stride in strides
        ],
        aspect_ratios=[list(anchor_aspect_ratios)],
        strides=strides,
        offset=0.0,
    )
    rpn = RPN(
        in_features=in_features,
        head=StandardRPNHead(in_channels=in_channels, num_anchors=anchor_generator.num_anchors[0]),
        anchor_generator=anchor_generator,
        anchor_matcher=Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True),
        box2box_transform=Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0)),
        batch_size_per_image=256,
        positive_fraction=0.5,
        pre_nms_topk=(rpn_train_pre_nms_topk, rpn_test_pre_nms_topk),
        post_nms_topk=(rpn_train_post_nms_topk, rpn_test_post_nms_topk),
        nms_thresh=rpn_nms_thresh,
        loss_weight=rpn_loss_weight,
        box_reg_loss_type="smooth_l1",
        smooth_l1_beta=0.0,
    )

    pooler_resolution = 7
    roi_strides = [input_shape[f].stride for f in roi_in_features]
    # detectron2 maps a box to level floor(canonical_level + log2(sqrt(area) / canonical_size));
    # with canonical_size = finest_scale placed on the first RoI level this is mmdet's mapping
    # floor(log2(sqrt(area) / finest_scale)) counted from the first RoI level.
    box_pooler = ROIPooler(
        output_size=pooler_resolution,
        scales=[1.0 / s for s in roi_strides],
        sampling_ratio=0,
        pooler_type="ROIAlignV2",
        canonical_box_size=finest_scale,
        canonical_level=round(math.log2(roi_strides[0])),
    )
    box_head = FastRCNNConvFCHead(
        ShapeSpec(channels=in_channels, height=pooler_resolution, width=pooler_resolution),
        conv_dims=[],
        fc_dims=[fc_dim, fc_dim],
    )
    box_predictor = FastRCNNOutputLayers(
        box_head.output_shape,
        box2box_transform=Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0)),
        num_classes=num_classes,
        test_score_thresh=test_score_thresh,
        test_nms_thresh=test_nms_thresh,
        test_topk_per_image=test_topk_per_image,
        cls_agnostic_bbox_reg=False,
        box_reg_loss_type="giou",
        loss_weight={"loss_cls": cls_loss_weight, "loss_box_reg": giou_loss_weight},
    )
    roi_heads = RCNNAuxROIHeads(
        num_classes=num_classes,
        batch_size_per_image=512,
        positive_fraction=0.25,
        proposal_matcher=Matcher([0.5], [0, 1], allow_low_quality_matches=False),
        proposal_append_gt=True,
        box_in_features=roi_in_features,
        box_pooler=box_pooler,
        box_head=box_head,
        box_predictor=box_predictor,
    )
    return RCNNAuxHead(rpn=rpn, roi_heads=roi_heads)
