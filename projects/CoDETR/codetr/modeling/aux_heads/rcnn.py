"""
The Faster R-CNN auxiliary head of Co-DETR, assembled from detectron2's RPN and RoI heads.

In training the head runs an RPN and a Fast R-CNN box branch on the encoder's per-level maps and
returns their losses together with its one-to-many assignment: the RoIs it sampled, their
assigned class and ground-truth box, and their RoI features averaged over the 7x7 grid. At test
time (``eval_module="two-stage"``) it returns the box branch's detections. With ``mask_on`` a
Mask R-CNN mask branch (detectron2's ``MaskRCNNConvUpsampleHead``) trains on the positive RoIs
and, at test time, gives every detection a mask.

:func:`build_rcnn_aux_head` configures the parts as the authors' Co-DETR configs (mmdet 2.x
``RPNHead`` + ``CoStandardRoIHead`` with ``Shared2FCBBoxHead``, and ``FCNMaskHead`` for the
mask branch). Inference follows the authors' computation; training follows the authors'
matching, sampling and loss normalisation by default, with differences listed in
:class:`RCNNAuxHead` (box branch) and :class:`RCNNAuxROIHeads` (mask branch).
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torchvision
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.proposal_generator.rpn import RPN, StandardRPNHead
from detectron2.modeling.roi_heads import (
    FastRCNNConvFCHead,
    FastRCNNOutputLayers,
    MaskRCNNConvUpsampleHead,
    StandardROIHeads,
    select_foreground_proposals,
)
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn

from codetr.layers import batched_soft_nms
from codetr.modeling.aux_heads.anchors import RatioMajorAnchorGenerator, valid_anchor_mask
from codetr.modeling.aux_heads.base import AssignedCoords
from codetr.modeling.aux_heads.sampling import LowQualityMatcher, sample_in_order

__all__ = [
    "RCNNAuxRPN",
    "RCNNAuxROIHeads",
    "RCNNAuxHead",
    "build_rcnn_aux_head",
    "check_gt_masks",
]

TRAINING_CONVENTIONS = ("authors", "detectron2")


class RCNNAuxRPN(RPN):
    """
    detectron2's :class:`RPN` trained as the authors' mmdet ``RPNHead``:

    * only the anchors of an image's own extent take part in its assignment
      (:func:`valid_anchor_mask`; detectron2 uses every anchor of the padded batch);
    * anchors are sampled by :func:`sample_in_order` (purpose ``"rpn"``);
    * both losses are divided by the number of sampled anchors summed over images, each image's
      positives and negatives counted as at least 1 (detectron2: ``256 * num_images``);
    * proposals are ranked by float32 probability, ties in the authors' order
      (:meth:`predict_proposals`; detectron2 ranks by logit).

    Matching is the ``anchor_matcher`` given (the authors': :class:`LowQualityMatcher`). The
    proposal NMS threshold may differ at test time (``test_nms_thresh``; the authors' ViT-L
    model: 0.7 in training, 0.9 at test).
    """

    def __init__(self, *, test_nms_thresh: float, **kwargs):
        """
        Args:
            test_nms_thresh: IoU threshold of the proposal NMS at test time (``nms_thresh``:
                in training).
            kwargs: as :class:`RPN`.
        """
        super().__init__(**kwargs)
        self.test_nms_thresh = test_nms_thresh

    @torch.no_grad()
    def predict_proposals(
        self,
        anchors: List[Boxes],
        pred_objectness_logits: List[Tensor],
        pred_anchor_deltas: List[Tensor],
        image_sizes: List[Tuple[int, int]],
    ) -> List[Instances]:
        """
        The authors' proposals: per level, the ``pre_nms_topk`` highest probabilities (all
        anchors, in their order, where there are fewer), boxes clipped to the image, empty ones
        dropped, NMS per level, the ``post_nms_topk`` best kept, ties in the order of that list.

        Written here because detectron2's ``find_top_rpn_proposals`` ranks by logit: float32
        probabilities tie where logits differ by ~1e-7, and the order among ties decides which
        proposals the sampler draws.

        Returns:
            per image, ``Instances`` with ``proposal_boxes`` (P, 4) and ``objectness_logits`` (P,)
            (here probabilities), best first.
        """
        proposals = self._decode_proposals(anchors, pred_anchor_deltas)  # per level (B, N_l, 4)
        pre_nms_topk = self.pre_nms_topk[self.training]
        post_nms_topk = self.post_nms_topk[self.training]
        nms_thresh = self.nms_thresh if self.training else self.test_nms_thresh
        # per level (B, K_l) probabilities, float32 (half-precision ones would tie in large
        # numbers), and the (B, K_l, 4) boxes
        level_scores, level_boxes = [], []
        for boxes, logits in zip(proposals, pred_objectness_logits):
            scores = logits.float().sigmoid()
            if scores.shape[1] > pre_nms_topk:
                # a sort, as the authors' code: torch's top-k orders ties otherwise, which
                # changes the proposals kept at the cut
                scores, order = scores.sort(dim=1, descending=True)
                scores, order = scores[:, :pre_nms_topk], order[:, :pre_nms_topk]
                boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))
            level_scores.append(scores)
            level_boxes.append(boxes.float())
        results = []
        for image, image_size in enumerate(image_sizes):
            boxes = Boxes(torch.cat([b[image] for b in level_boxes]))
            scores = torch.cat([s[image] for s in level_scores])
            levels = torch.cat([torch.full_like(s[image], l) for l, s in enumerate(level_scores)])
            boxes.clip(image_size)
            kept = boxes.nonempty(threshold=self.min_box_size)
            boxes, scores, levels = boxes[kept], scores[kept], levels[kept]
            # NMS per level on boxes shifted apart by level, as mmcv's batched_nms (the same
            # coordinates, so the same IoUs), one level at a time (cheaper than all at once),
            # then best first, ties in list order
            shifted = boxes.tensor + (levels * (boxes.tensor.max() + 1))[:, None]
            keep = []
            for level in range(len(level_scores)):
                members = torch.nonzero(levels == level).squeeze(1)
                keep.append(
                    members[torchvision.ops.nms(shifted[members], scores[members], nms_thresh)]
                )
            keep = torch.cat(keep)
            keep = keep[scores[keep].sort(descending=True, stable=True).indices][:post_nms_topk]
            instances = Instances(image_size)
            instances.proposal_boxes = boxes[keep]
            instances.objectness_logits = scores[keep]
            results.append(instances)
        return results

    @torch.no_grad()
    def label_and_sample_anchors(
        self, anchors: List[Boxes], gt_instances: List[Instances]
    ) -> Tuple[List[Tensor], List[Tensor]]:
        """
        Args:
            anchors: per level, (H_l * W_l * A, 4) anchors.
            gt_instances: per image, ``gt_boxes`` and the ``image_size`` that bounds the anchors.

        Returns:
            per image, (R,) labels (1 positive, 0 negative, -1 not sampled or outside the image)
            and (R, 4) matched ground-truth boxes (zeros where no ground truth).
        """
        all_anchors = Boxes.cat(anchors)
        valid_masks = valid_anchor_mask(
            anchors,
            self.anchor_generator.strides,
            self.anchor_generator.offset,
            [instances.image_size for instances in gt_instances],
        )
        gt_labels, matched_gt_boxes = [], []
        for instances, valid in zip(gt_instances, valid_masks):
            gt_boxes = instances.gt_boxes
            matches, match_labels = self.anchor_matcher(pairwise_iou(gt_boxes, all_anchors[valid]))
            positive, negative = sample_in_order(
                match_labels.to(gt_boxes.device),
                self.batch_size_per_image,
                self.positive_fraction,
                0,
                "rpn",
            )
            valid_labels = torch.full_like(matches, -1)
            valid_labels[positive] = 1
            valid_labels[negative] = 0
            labels = torch.full((len(all_anchors),), -1, dtype=torch.long, device=matches.device)
            labels[valid] = valid_labels
            matched = torch.zeros_like(all_anchors.tensor)
            if len(gt_boxes) > 0:
                matched[valid] = gt_boxes.tensor[matches]
            gt_labels.append(labels)
            matched_gt_boxes.append(matched)
        return gt_labels, matched_gt_boxes

    def losses(
        self,
        anchors: List[Boxes],
        pred_objectness_logits: List[Tensor],
        gt_labels: List[Tensor],
        pred_anchor_deltas: List[Tensor],
        gt_boxes: List[Tensor],
    ) -> Dict[str, Tensor]:
        """detectron2's losses, divided by the authors' normaliser instead of its own."""
        losses = super().losses(
            anchors, pred_objectness_logits, gt_labels, pred_anchor_deltas, gt_boxes
        )
        labels = torch.stack(gt_labels)
        sampled = (labels == 1).sum(dim=1).clamp(min=1) + (labels == 0).sum(dim=1).clamp(min=1)
        scale = self.batch_size_per_image * len(gt_labels) / sampled.sum()
        return {name: loss * scale for name, loss in losses.items()}


class RCNNAuxROIHeads(StandardROIHeads):
    """
    detectron2's :class:`StandardROIHeads` (box branch, optional mask branch) whose training pass
    also stores, on every sampled proposal, its pooled RoI feature averaged over the pooler's
    output grid.

    In training, ``forward`` returns the sampled proposals, each ``Instances`` carrying
    ``proposal_boxes``, ``gt_classes`` (``num_classes`` for background), ``gt_boxes`` (only when
    the image has ground truth; detectron2 leaves the field out otherwise) and
    ``pooled_features`` (R, C); the features are the ones the box head consumed, so the RoIs are
    pooled once. The keypoint branch and ``train_on_pred_boxes`` are not supported.

    With ``sample_as_authors`` (mmdet's ``RandomSampler`` with ground truth added as
    proposals), the ground-truth boxes are put before the proposals and each is matched to its
    own ground truth (detectron2: after them, matched by IoU), and the RoIs are sampled by
    :func:`sample_in_order` (purpose ``"roi"``): positives then negatives, each in increasing
    order of that list. The sampled proposals then also carry ``gt_indices`` (the index of the
    matched ground truth in the image's targets, when the image has ground truth), from which
    the mask branch takes the masks of the positives only.

    Mask branch (``mask_in_features`` / ``mask_pooler`` / ``mask_head`` of
    :class:`StandardROIHeads`; :func:`build_rcnn_aux_head` with ``mask_on``): trained on the
    positive sampled RoIs (:func:`select_foreground_proposals`) with detectron2's
    ``mask_rcnn_loss``, at test time run on the detections (``pred_masks``: (R, 1, M, M)
    probabilities of the predicted class). Training needs ``gt_masks`` on every target that has
    instances. Compared with the authors' mmdet ``FCNMaskHead`` (``mask_size=28``):

    * Loss: the same, binary cross-entropy with logits on the ground-truth class's channel,
      averaged over RoIs x 28 x 28 (``loss_mask``); without positive RoIs in the batch it is 0,
      connected to the mask head's output (mmdet: the sum of the empty prediction).
    * Targets: detectron2's ``gt_masks.crop_and_resize(proposal_boxes, 28)``. For ``BitMasks``
      (mapper ``instance_mask_format="bitmask"``) this is mmdet's ``BitmapMasks`` computation:
      aligned RoIAlign (adaptive sampling) of the image-sized bitmap, then ``>= 0.5``. For
      ``PolygonMasks`` (detectron2's default format) the polygons are rasterised inside each RoI
      at 28 x 28, as mmdet's ``PolygonMasks``; the authors' pipeline (``LoadAnnotations`` with
      ``poly2mask=True``) gives bitmaps, so with polygons the targets differ from theirs at the
      mask border. Either way the masks follow the image's resize differently: mmdet resizes the
      bitmap (nearest neighbour), detectron2 transforms the polygons and rasterises them at the
      new size.
    * mmdet clips the RoIs to the mask's extent before computing the targets (not before
      pooling); here they are not clipped, which is the same, since every sampled RoI lies in
      the image (proposals are clipped to it, ground-truth boxes by the data mapper).
    * Initialisation: the 3x3 convs and the deconvolution as mmdet (Kaiming normal, fan-out;
      detectron2's ``c2_msra_fill``); the 1x1 predictor too (:func:`build_rcnn_aux_head`
      re-initialises it; detectron2's default is a normal of std 0.001).
    * Test: detectron2's ``detector_postprocess`` pastes the 28 x 28 probabilities into the
      image (bilinear, as mmdet's ``_do_paste_mask``) and keeps ``>= 0.5`` (the authors'
      ``mask_thr_binary``).
    * detectron2 also logs the mask accuracy and false positive / negative rates to the event
      storage.
    """

    def __init__(self, *, sample_as_authors: bool, test_soft_nms: bool = False, **kwargs):
        """
        Args:
            sample_as_authors: sample as the authors' code (above) or as detectron2.
            test_soft_nms: at test time, class-aware linear soft-NMS (:func:`batched_soft_nms`
                at the box predictor's ``test_nms_thresh``) in place of NMS.
            kwargs: as :class:`StandardROIHeads`.
        """
        super().__init__(**kwargs)
        self.sample_as_authors = sample_as_authors
        self.test_soft_nms = test_soft_nms

    @torch.no_grad()
    def label_and_sample_proposals(
        self, proposals: List[Instances], targets: List[Instances]
    ) -> List[Instances]:
        """
        Returns:
            per image, the sampled RoIs: ``proposal_boxes``, ``gt_classes`` (``num_classes``
            for background) and, when the image has ground truth, ``gt_boxes``.
        """
        if not self.sample_as_authors:
            return super().label_and_sample_proposals(proposals, targets)
        sampled, num_foreground, num_background = [], [], []
        for proposals_per_image, targets_per_image in zip(proposals, targets):
            gt_boxes = targets_per_image.gt_boxes
            num_gt = len(gt_boxes)
            boxes = Boxes.cat([gt_boxes, proposals_per_image.proposal_boxes])
            matches, match_labels = self.proposal_matcher(pairwise_iou(gt_boxes, boxes))
            matches[:num_gt] = torch.arange(num_gt, device=matches.device)
            match_labels[:num_gt] = 1
            labels = torch.full_like(matches, self.num_classes)
            if num_gt > 0:
                labels = torch.where(
                    match_labels == 1, targets_per_image.gt_classes[matches], labels
                )
            labels[match_labels == -1] = -1
            positive, negative = sample_in_order(
                labels, self.batch_size_per_image, self.positive_fraction, self.num_classes, "roi"
            )
            indices = torch.cat([positive, negative])
            rois = Instances(proposals_per_image.image_size)
            rois.proposal_boxes = boxes[indices]
            rois.gt_classes = labels[indices]
            if num_gt > 0:
                rois.gt_boxes = gt_boxes[matches[indices]]
                rois.gt_indices = matches[indices]
            sampled.append(rois)
            num_foreground.append(positive.numel())
            num_background.append(negative.numel())
        storage = get_event_storage()  # the statistics detectron2's sampling logs
        storage.put_scalar("roi_head/num_fg_samples", sum(num_foreground) / len(sampled))
        storage.put_scalar("roi_head/num_bg_samples", sum(num_background) / len(sampled))
        return sampled

    def forward(
        self,
        images: ImageList,
        features: Dict[str, Tensor],
        proposals: List[Instances],
        targets: Optional[List[Instances]] = None,
    ) -> Tuple[List[Instances], Dict[str, Tensor]]:
        """
        As :meth:`StandardROIHeads.forward`; in training, the mask branch (when on) gets the
        positive RoIs with the ground-truth masks of their matches.
        """
        if not self.training:
            return super().forward(images, features, proposals)
        if not targets:
            raise ValueError("RCNNAuxROIHeads needs targets in training")
        if self.mask_on:
            check_gt_masks(targets)
        sampled = self.label_and_sample_proposals(proposals, targets)
        losses = self._forward_box(features, sampled)
        if self.mask_on:
            foreground = self._foreground_with_masks(sampled, targets)
            losses.update(self._forward_mask(features, foreground))
        return sampled, losses

    def _foreground_with_masks(
        self, sampled: List[Instances], targets: List[Instances]
    ) -> List[Instances]:
        """Per image, the positive sampled RoIs with ``gt_masks``: detectron2's sampling copies
        the masks onto every sampled RoI, the authors' sampling (``gt_indices``) here onto the
        positives only."""
        foreground, _ = select_foreground_proposals(sampled, self.num_classes)
        for rois, targets_per_image in zip(foreground, targets):
            if len(rois) > 0 and not rois.has("gt_masks"):
                rois.gt_masks = targets_per_image.gt_masks[rois.gt_indices]
        return foreground

    def _forward_box(self, features: Dict[str, Tensor], proposals: List[Instances]):
        box_features = self.box_pooler(
            [features[f] for f in self.box_in_features], [p.proposal_boxes for p in proposals]
        )  # (R, C, output_size, output_size) over all images
        predictions = self.box_predictor(self.box_head(box_features))
        if not self.training:
            if self.test_soft_nms:
                return self._soft_nms_inference(predictions, proposals)
            pred_instances, _ = self.box_predictor.inference(predictions, proposals)
            return pred_instances
        losses = self.box_predictor.losses(predictions, proposals)
        mean_features = box_features.mean(dim=(2, 3)).split([len(p) for p in proposals])
        for proposals_per_image, features_per_image in zip(proposals, mean_features):
            proposals_per_image.pooled_features = features_per_image
        return losses

    def _soft_nms_inference(
        self, predictions: Tuple[Tensor, Tensor], proposals: List[Instances]
    ) -> List[Instances]:
        """
        detectron2's ``fast_rcnn_inference`` with soft-NMS: per image, the boxes clipped to the
        image, every (proposal, class) pair scoring above ``test_score_thresh`` (in proposal,
        then class order, as mmdet's ``multiclass_nms``), then class-aware linear soft-NMS
        keeping ``test_topk_per_image``, scores decayed. (Written here: detectron2's takes no
        other NMS.)
        """
        predictor = self.box_predictor
        boxes = predictor.predict_boxes(predictions, proposals)
        scores = predictor.predict_probs(predictions, proposals)
        results = []
        for image_boxes, image_scores, image in zip(boxes, scores, proposals):
            image_scores = image_scores[:, :-1]  # (R, num_classes), background dropped
            num_regressions = image_boxes.shape[1] // 4
            clipped = Boxes(image_boxes.reshape(-1, 4))
            clipped.clip(image.image_size)
            image_boxes = clipped.tensor.view(-1, num_regressions, 4)
            selected = image_scores > predictor.test_score_thresh
            pairs = selected.nonzero()  # (K, 2) proposal, class
            if num_regressions == 1:
                candidates = image_boxes[pairs[:, 0], 0]
            else:
                candidates = image_boxes[selected]
            keep, kept_scores = batched_soft_nms(
                candidates,
                image_scores[selected],
                pairs[:, 1],
                iou_threshold=predictor.test_nms_thresh,
                max_keep=predictor.test_topk_per_image,
            )
            results.append(
                Instances(
                    image.image_size,
                    pred_boxes=Boxes(candidates[keep]),
                    scores=kept_scores,
                    pred_classes=pairs[keep, 1],
                )
            )
        return results


def check_gt_masks(gt_instances: List[Instances]) -> None:
    """
    Raises ``ValueError`` if an image with instances has no ``gt_masks`` (images without
    instances need none: detectron2's ``annotations_to_instances`` adds no masks to them).
    """
    missing = [i for i, gt in enumerate(gt_instances) if len(gt) > 0 and not gt.has("gt_masks")]
    if missing:
        raise ValueError(
            f"The Mask R-CNN auxiliary head (mask_on=True) trains on gt_masks, but the training "
            f"Instances of batch image(s) {missing} have none: the data mapper must be built with "
            f"masks (DetrDatasetMapper(use_instance_mask=True); in a config "
            f"dataloader.train.mapper.use_instance_mask=True)"
        )


class RCNNAuxHead(nn.Module):
    """
    RPN + Fast R-CNN box branch used as a Co-DETR auxiliary head.

    Training: ``losses, assignments = head(features, images, gt_instances)`` with losses
    ``loss_rpn_cls``, ``loss_rpn_loc`` (RPN) and ``loss_cls``, ``loss_box_reg`` (RoI head), and one
    :class:`AssignedCoords` per image holding the sampled RoIs (positives first). As in the
    authors' ``CoStandardRoIHead``, every image keeps only its first ``n`` sampled RoIs, ``n``
    being the smallest number of RoIs sampled for an image of the batch.

    With the mask branch (``mask_on`` of :func:`build_rcnn_aux_head`) training also returns
    ``loss_mask`` and needs ``gt_masks`` on the ground truth (see :class:`RCNNAuxROIHeads`).

    Test: :meth:`inference` returns per image ``Instances`` with ``pred_boxes`` (XYXY in the
    input-image frame, clipped to ``images.image_sizes``), ``scores``, ``pred_classes`` and, with
    the mask branch, ``pred_masks``.
    Proposals are clipped to ``images.image_sizes`` too; for LSJ-style inputs the authors clip to
    the padded batch size, so pass an ``ImageList`` whose ``image_sizes`` are the padded size.

    Training follows the authors' mmdet code by default (``training_conventions="authors"`` of
    :func:`build_rcnn_aux_head`): anchors ordered ratio-major (:class:`RatioMajorAnchorGenerator`),
    only an image's own anchors assigned, mmdet's low-quality matching
    (:class:`LowQualityMatcher`), sampling (:func:`sample_in_order`, ground truth prepended to
    the proposals) and RPN loss normaliser (:class:`RCNNAuxRPN`). With
    ``training_conventions="detectron2"`` these are detectron2's. Differences that remain either
    way, none of which the parity tests can see:

    * Box decoding: detectron2 clamps log-size deltas from above only (at ``log(1000 / 16)``),
      mmdet from both sides.
    * RoI level mapping: ``floor(log2(sqrt(area) / finest_scale + eps))`` with ``eps`` 1e-6 in
      mmdet and 1e-8 in detectron2, which moves only boxes within 1e-6 of a level boundary.
    * Box deltas are computed in another order of float operations (differences of 1 ulp).
    * Initialisation of the two FC layers: detectron2's ``c2_xavier_fill`` versus mmdet's
      uniform Xavier (irrelevant when loading a checkpoint).
    * The GIoU loss's eps is 1e-7 (fvcore) instead of 1e-6.
    """

    kind = "two-stage"
    """The ``eval_module`` name under which this head produces the test output."""

    def __init__(self, *, rpn: RPN, roi_heads: RCNNAuxROIHeads):
        """
        Args:
            rpn: detectron2 RPN (``StandardRPNHead``; :class:`RCNNAuxRPN` for the authors'
                training).
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
            gt_instances: B ``Instances`` with ``gt_boxes`` (absolute XYXY) and ``gt_classes``,
                and with the mask branch ``gt_masks`` (detectron2 ``PolygonMasks`` or
                ``BitMasks``; images without instances need none); may be empty.

        Returns:
            losses: ``loss_rpn_cls``, ``loss_rpn_loc``, ``loss_cls``, ``loss_box_reg``, and
                ``loss_mask`` with the mask branch.
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
            B ``Instances`` with ``pred_boxes`` (absolute XYXY), ``scores`` and ``pred_classes``;
            with the mask branch also ``pred_masks`` (R, 1, 28, 28), the probabilities of the
            predicted class inside the box, which detectron2's ``detector_postprocess`` pastes
            into the image and thresholds at 0.5 ((R, H, W) bool).
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
    num_classes: int,
    in_features: Optional[List[str]] = None,
    num_roi_levels: int = 5,
    finest_scale: int = 56,
    anchor_octave_base_scale: float = 4.0,
    anchor_scales_per_octave: int = 3,
    anchor_aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    rpn_loss_weight: float = 1.0,
    rpn_train_pre_nms_topk: int = 4000,
    rpn_train_post_nms_topk: int = 1000,
    rpn_test_pre_nms_topk: int = 1000,
    rpn_test_post_nms_topk: int = 1000,
    rpn_train_nms_thresh: float = 0.7,
    rpn_test_nms_thresh: float = 0.7,
    fc_dim: int = 1024,
    num_box_head_convs: int = 0,
    num_box_head_fcs: int = 2,
    box_head_norm: str = "",
    cls_agnostic_bbox_reg: bool = False,
    box_reg_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
    cls_loss_weight: float = 1.0,
    giou_loss_weight: float = 10.0,
    test_score_thresh: float = 0.0,
    test_nms_thresh: float = 0.5,
    test_topk_per_image: int = 100,
    test_soft_nms: bool = False,
    training_conventions: str = "authors",
    mask_on: bool = False,
    mask_loss_weight: float = 1.0,
) -> RCNNAuxHead:
    """
    Builds the Faster R-CNN auxiliary head with the settings of the authors' configs.

    RPN: one 3x3 conv; per level ``anchor_scales_per_octave`` anchor sizes
    ``stride * anchor_octave_base_scale * 2^(i / anchor_scales_per_octave)`` times each aspect
    ratio (ratio-major), centred on ``stride * (x, y)`` (offset 0); IoU matching 0.3 / 0.7 with
    low-quality matches (IoU >= 0.3); 256 anchors sampled at 0.5 positive; L1 on deltas
    (weights 1, 1, 1, 1); NMS per level. RoI head: 7x7 aligned RoIAlign (adaptive sampling) on the first
    ``num_roi_levels`` levels; two FC layers of ``fc_dim``; class-specific regression with weights (10, 10, 5, 5) trained with GIoU
    on the decoded boxes; IoU matching at 0.5 without low-quality matches; 512 RoIs sampled at
    0.25 positive, ground-truth boxes added as proposals. Mask branch (``mask_on``, the authors'
    ``FCNMaskHead``): 14x14 RoIAlign as the box pooler's (same levels and level mapping), four 3x3
    convs of the input width, a 2x2 stride-2 deconvolution, a 1x1 class-specific predictor:
    28x28 masks.

    Args:
        input_shape: channels and stride of every level; all levels share the channel count.
        num_classes: number of foreground classes.
        in_features: levels used by the RPN, finest first; default: all of ``input_shape`` by
            stride (Co-DINO: strides 4..128).
        num_roi_levels: the RoIs are pooled from the first this many of ``in_features``
            (Co-DINO five, Co-Deformable-DETR four).
        finest_scale: RoIs with ``sqrt(area) < 2 * finest_scale`` go to the first RoI level, and
            each doubling moves one level up (mmdet's ``SingleRoIExtractor``).
        anchor_octave_base_scale, anchor_scales_per_octave, anchor_aspect_ratios: anchors as
            mmdet's ``AnchorGenerator``; ratios are height / width.
        rpn_loss_weight: weight of both RPN losses (the meta-architecture's lambda_2
            multiplies all the head's losses).
        rpn_train_pre_nms_topk, rpn_test_pre_nms_topk: proposals kept per level before NMS.
        rpn_train_post_nms_topk, rpn_test_post_nms_topk: proposals kept per image after NMS.
        rpn_train_nms_thresh, rpn_test_nms_thresh: IoU threshold of the proposal NMS (the
            authors' ViT-L model: 0.7, 0.9; detectron2's training conventions take one).
        fc_dim: width of the shared FC layers.
        num_box_head_convs, num_box_head_fcs, box_head_norm: the RoI box head: 3x3 convs of
            the input width (with detectron2 norm ``box_head_norm``), then FC layers; the
            authors' ViT-L COCO model has 4 convs with GroupNorm and 1 FC, the others 0 and 2.
        cls_agnostic_bbox_reg: one box regression for all classes (the ViT-L COCO model).
        box_reg_weights: the RoI box delta weights, the inverse of the authors' target stds
            ((10, 10, 5, 5); (20, 20, 10, 10) for the ViT-L COCO model).
        cls_loss_weight, giou_loss_weight: weights of the RoI classification and GIoU losses.
        test_score_thresh, test_nms_thresh, test_topk_per_image: detection post-processing
            (per-class NMS).
        test_soft_nms: class-aware linear soft-NMS at ``test_nms_thresh`` in place of NMS
            (the authors' ViT-L model).
        training_conventions: ``"authors"`` trains as the authors' mmdet code (matching,
            sampling, anchors assigned and normalisers of :class:`RCNNAuxHead`), ``"detectron2"``
            as detectron2's ``RPN`` and ``StandardROIHeads``.
        mask_on: add the mask branch (training then needs ``gt_masks``; see
            :class:`RCNNAuxROIHeads` for its differences from the authors' ``FCNMaskHead``).
        mask_loss_weight: weight of ``loss_mask``.
    """
    if training_conventions not in TRAINING_CONVENTIONS:
        raise ValueError(
            f"training_conventions must be one of {TRAINING_CONVENTIONS}, "
            f"got {training_conventions!r}"
        )
    as_authors = training_conventions == "authors"
    if not as_authors and rpn_train_nms_thresh != rpn_test_nms_thresh:
        raise ValueError(
            f"training_conventions='detectron2' takes one proposal NMS threshold (detectron2's "
            f"RPN), got rpn_train_nms_thresh={rpn_train_nms_thresh} and "
            f"rpn_test_nms_thresh={rpn_test_nms_thresh}"
        )
    if in_features is None:
        in_features = sorted(input_shape, key=lambda name: input_shape[name].stride)
    missing = [f for f in in_features if f not in input_shape]
    if missing:
        raise ValueError(f"in_features {missing} are not in input_shape {sorted(input_shape)}")
    if not 0 < num_roi_levels <= len(in_features):
        raise ValueError(
            f"num_roi_levels must be in [1, {len(in_features)}] (the levels of in_features "
            f"{in_features}), got {num_roi_levels}"
        )
    roi_in_features = in_features[:num_roi_levels]
    channels = {input_shape[f].channels for f in in_features + roi_in_features}
    if len(channels) != 1:
        raise ValueError(f"all levels must have the same channel count, got {sorted(channels)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    (in_channels,) = channels

    strides = [input_shape[f].stride for f in in_features]
    anchor_generator = RatioMajorAnchorGenerator(
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
    rpn_conventions = dict(test_nms_thresh=rpn_test_nms_thresh) if as_authors else {}
    rpn = (RCNNAuxRPN if as_authors else RPN)(
        **rpn_conventions,
        in_features=in_features,
        head=StandardRPNHead(in_channels=in_channels, num_anchors=anchor_generator.num_anchors[0]),
        anchor_generator=anchor_generator,
        anchor_matcher=(
            LowQualityMatcher([0.3, 0.7], [0, -1, 1], min_low_quality_iou=0.3)
            if as_authors
            else Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True)
        ),
        box2box_transform=Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0)),
        batch_size_per_image=256,
        positive_fraction=0.5,
        pre_nms_topk=(rpn_train_pre_nms_topk, rpn_test_pre_nms_topk),
        post_nms_topk=(rpn_train_post_nms_topk, rpn_test_post_nms_topk),
        nms_thresh=rpn_train_nms_thresh,
        loss_weight=rpn_loss_weight,
        box_reg_loss_type="smooth_l1",
        smooth_l1_beta=0.0,
    )

    pooler_resolution = 7
    roi_strides = [input_shape[f].stride for f in roi_in_features]
    # detectron2 maps a box to level floor(canonical_level + log2(sqrt(area) / canonical_size));
    # with canonical_size = finest_scale placed on the first RoI level this is mmdet's mapping
    # floor(log2(sqrt(area) / finest_scale)) counted from the first RoI level.
    # (the mask branch pools the same levels with the same mapping, as the authors' configs)
    roi_levels = dict(
        scales=[1.0 / s for s in roi_strides],
        sampling_ratio=0,
        pooler_type="ROIAlignV2",
        canonical_box_size=finest_scale,
        canonical_level=round(math.log2(roi_strides[0])),
    )
    box_pooler = ROIPooler(output_size=pooler_resolution, **roi_levels)
    box_head = FastRCNNConvFCHead(
        ShapeSpec(channels=in_channels, height=pooler_resolution, width=pooler_resolution),
        conv_dims=[in_channels] * num_box_head_convs,
        fc_dims=[fc_dim] * num_box_head_fcs,
        conv_norm=box_head_norm,
    )
    box_predictor = FastRCNNOutputLayers(
        box_head.output_shape,
        box2box_transform=Box2BoxTransform(weights=tuple(box_reg_weights)),
        num_classes=num_classes,
        test_score_thresh=test_score_thresh,
        test_nms_thresh=test_nms_thresh,
        test_topk_per_image=test_topk_per_image,
        cls_agnostic_bbox_reg=cls_agnostic_bbox_reg,
        box_reg_loss_type="giou",
        loss_weight={"loss_cls": cls_loss_weight, "loss_box_reg": giou_loss_weight},
    )
    mask_branch = {}
    if mask_on:
        mask_resolution = 14
        mask_head = MaskRCNNConvUpsampleHead(
            ShapeSpec(channels=in_channels, height=mask_resolution, width=mask_resolution),
            num_classes=num_classes,
            conv_dims=[in_channels] * 5,  # four 3x3 convs, then the deconvolution
            loss_weight=mask_loss_weight,
        )
        # mmdet's initialisation of the predictor (detectron2's: normal, std 0.001)
        nn.init.kaiming_normal_(mask_head.predictor.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(mask_head.predictor.bias)
        mask_branch = dict(
            mask_in_features=roi_in_features,
            mask_pooler=ROIPooler(output_size=mask_resolution, **roi_levels),
            mask_head=mask_head,
        )
    roi_heads = RCNNAuxROIHeads(
        **mask_branch,
        sample_as_authors=as_authors,
        test_soft_nms=test_soft_nms,
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
