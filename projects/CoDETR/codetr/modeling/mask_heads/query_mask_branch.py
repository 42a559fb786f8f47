"""
Co-DINO-Inst's mask branch: instance masks for the query head's boxes (the authors' ``CoDETR``
with ``mask_head`` / ``mask_iou_head``: ``_mask_forward_train``, ``simple_test_mask``).

Training: the last decoder layer's predictions of every decoded query (the denoising queries
first, then the matching ones), detached, give the image's best ``num_proposals`` (query,
class) pairs as boxes (the query head's test-time top-k, without NMS); the ground-truth boxes
are put before them, each matched to itself, and the others are matched to the ground truth
at IoU >= 0.5 (mmdet's ``MaxIoUAssigner`` without low-quality matches); of 512 samples at most
a quarter are positives, drawn at random when there are more (mmdet's ``RandomSampler``, only
the positives are used). The positives' masks are predicted from the encoder memory (RoIAlign
14x14 on the level of their size, semantic branch on the stride-4 level) by the
:class:`RefineMaskHead` and trained against their matched ground-truth masks, and the
:class:`MaskIoUHead` learns the IoU of their 28x28 masks.

Test: for every detection of the query head (after its soft-NMS), the refined 112x112 mask of
its class (``pred_masks``, (R, 1, 112, 112) probabilities; detectron2's ``detector_postprocess``
pastes them into the image and keeps >= 0.5, the authors' ``mask_thr_binary``) and, with the
MaskIoU head, the score times the predicted IoU of its mask (``scores``; the query head's score
is kept as ``box_scores``). The authors evaluate boxes with the query head's score and masks
with the rescored one; detectron2's evaluators take one score for both, the rescored one here.

Parameter names: the authors' ``mask_head.*`` and ``mask_iou_head.*`` are our
``mask_branch.mask_head.*`` and ``mask_branch.mask_iou_head.*`` (renamed inside as listed in
``refine_mask.py`` and ``mask_iou.py``); their ``mask_roi_extractor`` has no parameters.
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes, Instances, pairwise_iou
from torch import Tensor, nn

from ..aux_heads.sampling import sample_in_order
from ..query_heads.postprocess import detr_detections
from .mask_iou import MaskIoUHead, gt_area_ratios, mask_iou_targets
from .refine_mask import RefineMaskHead, refine_stage_logits, stage_mask_targets

__all__ = ["QueryMaskBranch", "build_query_mask_branch", "last_layer_predictions"]


def last_layer_predictions(outputs: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
    """
    The last decoder layer's predictions of every query the decoder ran in training, as the
    authors' ``get_bboxes`` on the head's raw output: the denoising queries ("dn_logits" /
    "dn_boxes", when present) first, then the matching queries.

    Args:
        outputs: a query head's ``decode`` output ("logits" (L, B, Q, K), "boxes" (L, B, Q, 4)
            normalised cxcywh, optionally "dn_logits" / "dn_boxes" (L, B, D, *)).
    Returns:
        (B, D + Q, K) logits and (B, D + Q, 4) boxes, detached.
    """
    logits, boxes = outputs["logits"][-1], outputs["boxes"][-1]
    if "dn_logits" in outputs:
        logits = torch.cat([outputs["dn_logits"][-1], logits], dim=1)
        boxes = torch.cat([outputs["dn_boxes"][-1], boxes], dim=1)
    return logits.detach(), boxes.detach()


class QueryMaskBranch(nn.Module):
    """
    Masks (and mask scores) for the query head's boxes; see the module docstring.

    Differences from the authors' code:

    * mask targets come from detectron2's ``crop_and_resize`` (:func:`stage_mask_targets`):
      with ``PolygonMasks`` the polygons are rasterised in each RoI where the authors' pipeline
      has bitmaps (the same with ``BitMasks``);
    * the IoU targets of RoIs where neither mask has an area are 0 instead of NaN (both are
      left out of the loss);
    * at test time the batch's images are processed one by one in chunks of
      ``test_chunk_size`` RoIs (the authors: batch 1, chunks of 150).
    """

    def __init__(
        self,
        *,
        in_features: Sequence[str],
        semantic_feature: str,
        mask_pooler: ROIPooler,
        mask_head: RefineMaskHead,
        mask_iou_head: Optional[MaskIoUHead],
        proposal_matcher: Matcher,
        num_proposals: int,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        mask_iou_threshold: float = 0.5,
        test_chunk_size: int = 150,
    ):
        """
        Args:
            in_features: the levels the RoIs are pooled from, finest first.
            semantic_feature: the level of the mask head's semantic branch.
            mask_pooler: pools ``in_features`` to the first stage's side.
            mask_head: predicts the stage masks.
            mask_iou_head: predicts the masks' IoU; None: no mask scoring.
            proposal_matcher: matches the proposals to the ground truth (label 1 positive,
                0 background).
            num_proposals: per image, the top-scoring (query, class) pairs of the last decoder
                layer used as proposals in training (the authors: the query head's test-time
                ``max_per_img``).
            batch_size_per_image, positive_fraction: at most
                ``int(batch_size_per_image * positive_fraction)`` positives per image.
            mask_iou_threshold: the predicted masks are binarised at this probability for the
                IoU targets (the authors' ``mask_thr_binary``).
            test_chunk_size: RoIs per mask head call at test time.
        """
        super().__init__()
        self.in_features = list(in_features)
        self.semantic_feature = semantic_feature
        self.mask_pooler = mask_pooler
        self.mask_head = mask_head
        self.mask_iou_head = mask_iou_head
        self.proposal_matcher = proposal_matcher
        self.num_proposals = num_proposals
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.mask_iou_threshold = mask_iou_threshold
        self.test_chunk_size = test_chunk_size

    @property
    def num_classes(self) -> int:
        return self.mask_head.num_classes

    # ----------------------------------------------------------------------------- training
    @torch.no_grad()
    def proposals(
        self,
        logits: Tensor,
        boxes: Tensor,
        box_normalizers: Tensor,
        image_sizes: List[Tuple[int, int]],
    ) -> List[Boxes]:
        """
        Per image the boxes of the ``num_proposals`` best (query, class) sigmoid scores, XYXY
        input pixels clamped to the image (the query head's test output without NMS).

        Args:
            logits: (B, N, K); boxes: (B, N, 4) normalised cxcywh.
            box_normalizers: (B, 4) each image's (w, h, w, h).
            image_sizes: per image (h, w).
        """
        detections = detr_detections(
            logits,
            boxes,
            box_normalizers,
            image_sizes,
            num_candidates=self.num_proposals,
            max_detections=self.num_proposals,
        )
        return [d.pred_boxes for d in detections]

    @torch.no_grad()
    def label_and_sample(
        self, proposals: List[Boxes], gt_instances: List[Instances]
    ) -> List[Instances]:
        """
        Matches each image's ground-truth boxes (put first, each matched to itself) and
        proposals to the ground truth and samples the positives (:func:`sample_in_order`,
        purpose ``"query_mask"``; the negatives are drawn too, as by the authors' sampler, and
        dropped).

        Returns:
            per image the positive RoIs in sampling order: ``proposal_boxes``,
            ``gt_classes`` and ``gt_indices`` (index of the matched ground truth).
        """
        sampled = []
        for boxes, gt in zip(proposals, gt_instances):
            num_gt = len(gt)
            boxes = Boxes.cat([gt.gt_boxes, boxes])
            matches, match_labels = self.proposal_matcher(pairwise_iou(gt.gt_boxes, boxes))
            matches[:num_gt] = torch.arange(num_gt, device=matches.device)
            match_labels[:num_gt] = 1
            labels = torch.full_like(matches, self.num_classes)
            if num_gt > 0:
                labels = torch.where(match_labels == 1, gt.gt_classes[matches], labels)
            labels[match_labels == -1] = -1
            positive, _ = sample_in_order(
                labels,
                self.batch_size_per_image,
                self.positive_fraction,
                self.num_classes,
                "query_mask",
            )
            rois = Instances(gt.image_size)
            rois.proposal_boxes = boxes[positive]
            rois.gt_classes = labels[positive]
            rois.gt_indices = matches[positive]
            sampled.append(rois)
        return sampled

    def losses(
        self,
        features: Dict[str, Tensor],
        outputs: Dict[str, Tensor],
        box_normalizers: Tensor,
        image_sizes: List[Tuple[int, int]],
        gt_instances: List[Instances],
    ) -> Dict[str, Tensor]:
        """
        Args:
            features: the encoder memory as per-level maps (B, C, H_l, W_l) by level name.
            outputs: the query head's decoder output (see :func:`last_layer_predictions`).
            box_normalizers: (B, 4) per image (w, h, w, h): the pixels normalised boxes are
                relative to.
            image_sizes: per image (h, w).
            gt_instances: per image ``gt_boxes``, ``gt_classes`` and, where there are
                objects, ``gt_masks`` (``BitMasks`` or ``PolygonMasks``).
        Returns:
            "loss_mask" and, with the MaskIoU head, "loss_mask_iou" (0, connected to the
            heads' outputs, when no image has a positive).
        """
        missing = [i for i, gt in enumerate(gt_instances) if len(gt) > 0 and not gt.has("gt_masks")]
        if missing:
            raise ValueError(
                f"The query head's mask branch (model.mask_branch) trains on gt_masks, but the "
                f"training Instances of batch image(s) {missing} have none: build the data "
                f"mapper with masks (in a config dataloader.train.mapper.use_instance_mask=True)"
            )
        logits, boxes = last_layer_predictions(outputs)
        proposals = self.proposals(logits, boxes, box_normalizers, image_sizes)
        sampled = self.label_and_sample(proposals, gt_instances)
        roi_boxes = [rois.proposal_boxes for rois in sampled]
        labels = torch.cat([rois.gt_classes for rois in sampled])
        roi_features, stage_logits = self._forward_masks(features, roi_boxes, labels)

        sizes = self.mask_head.stage_sizes
        per_image = [
            stage_mask_targets(gt.gt_masks[rois.gt_indices], rois.proposal_boxes, size, sizes)
            for rois, gt, size in zip(sampled, gt_instances, image_sizes)
            if len(rois) > 0
        ]
        stage_targets = [
            (
                torch.cat([targets[stage] for targets in per_image])
                if per_image
                else labels.new_zeros((0, side, side), dtype=torch.float32)
            )
            for stage, side in enumerate(sizes)
        ]
        losses = {"loss_mask": self.mask_head.losses(stage_logits, stage_targets)}
        if self.mask_iou_head is not None:
            mask_logits = stage_logits[1][:, 0]
            predicted = self.mask_iou_head(roi_features, mask_logits)
            predicted = predicted[torch.arange(len(labels), device=labels.device), labels]
            ratios = [
                gt_area_ratios(gt.gt_masks, rois.proposal_boxes, rois.gt_indices, size)
                for rois, gt, size in zip(sampled, gt_instances, image_sizes)
                if len(rois) > 0
            ]
            ratios = torch.cat(ratios) if ratios else predicted.new_zeros((0,))
            targets = mask_iou_targets(
                mask_logits, stage_targets[1], ratios, threshold=self.mask_iou_threshold
            )
            losses["loss_mask_iou"] = self.mask_iou_head.loss(predicted, targets)
        return losses

    # ----------------------------------------------------------------------------- test
    def _forward_masks(
        self, features: Dict[str, Tensor], boxes: List[Boxes], labels: Tensor
    ) -> Tuple[Tensor, List[Tensor]]:
        """The RoIs' pooled features (R, C, s0, s0) and the mask head's stage logits."""
        roi_features = self.mask_pooler([features[f] for f in self.in_features], boxes)
        stage_logits = self.mask_head(roi_features, features[self.semantic_feature], boxes, labels)
        return roi_features, stage_logits

    def inference(
        self, features: Dict[str, Tensor], detections: List[Instances]
    ) -> List[Instances]:
        """
        Adds masks (and mask scores) to the query head's detections.

        Args:
            features: the encoder memory as per-level maps by level name.
            detections: per image ``pred_boxes`` (XYXY input pixels), ``scores``,
                ``pred_classes``.
        Returns:
            ``detections``, each with ``pred_masks`` (R, 1, S, S) float32 probabilities (S the
            last stage's side) and, with the MaskIoU head, ``scores`` times the predicted mask
            IoU of the detection's class, the former ``scores`` kept as ``box_scores``.
        """
        side = self.mask_head.stage_sizes[-1]
        for index, result in enumerate(detections):
            image_features = {k: v[index : index + 1] for k, v in features.items()}
            masks, mask_ious = [], []
            for start in range(0, len(result), self.test_chunk_size):
                chunk = result[start : start + self.test_chunk_size]
                labels = chunk.pred_classes
                roi_features, stage_logits = self._forward_masks(
                    image_features, [chunk.pred_boxes], labels
                )
                masks.append(refine_stage_logits(stage_logits).float().sigmoid())
                if self.mask_iou_head is not None:
                    predicted = self.mask_iou_head(roi_features, stage_logits[1][:, 0])
                    rows = torch.arange(len(labels), device=labels.device)
                    mask_ious.append(predicted[rows, labels].float())
            empty = result.scores.new_zeros((0, 1, side, side))
            result.pred_masks = torch.cat(masks) if masks else empty
            if self.mask_iou_head is not None:
                result.box_scores = result.scores
                ious = torch.cat(mask_ious) if mask_ious else result.scores.new_zeros((0,))
                result.scores = result.scores * ious
        return detections


def build_query_mask_branch(
    *,
    input_shape: Dict[str, ShapeSpec],
    num_classes: int,
    num_proposals: int,
    in_features: Optional[Sequence[str]] = None,
    finest_scale: int = 56,
    conv_dim: int = 256,
    num_instance_convs: int = 1,
    num_semantic_convs: int = 2,
    dilations: Sequence[int] = (1, 3, 5),
    stage_sizes: Sequence[int] = (14, 28, 56, 112),
    class_agnostic_last_stage: bool = True,
    stage_loss_weights: Sequence[float] = (0.5, 0.75, 0.75, 1.0),
    boundary_width: int = 2,
    mask_loss_weight: float = 1.0,
    mask_iou_on: bool = True,
    mask_iou_loss_weight: float = 0.5,
    mask_iou_fc_dim: int = 1024,
    iou_threshold: float = 0.5,
    batch_size_per_image: int = 512,
    positive_fraction: float = 0.25,
    test_chunk_size: int = 150,
) -> QueryMaskBranch:
    """
    Builds Co-DINO-Inst's mask branch with the settings of the authors' instance configs
    (``co_dino_5scale_vit_large_coco_instance.py``: ``SimpleRefineMaskHead``, ``MaskIoUHead``,
    ``train_cfg[1]``); ``CoDETR`` gives the first three arguments.

    Args:
        input_shape: the encoder memory's levels (channels and stride; one channel count).
        num_classes: the query head's K.
        num_proposals: per image, training proposals from the last decoder layer (``CoDETR``:
            its query head's ``max_detections``).
        in_features: the levels the RoIs are pooled from, finest first (default: all by
            stride); the mask head's semantic branch reads the first.
        finest_scale: RoIs with ``sqrt(area) < 2 * finest_scale`` are pooled from the first
            level, each doubling one level up (mmdet's ``SingleRoIExtractor``).
        conv_dim, num_instance_convs, num_semantic_convs, dilations, stage_sizes,
            class_agnostic_last_stage, stage_loss_weights, boundary_width: of
            :class:`RefineMaskHead`.
        mask_loss_weight: weight of "loss_mask" (COCO 1.33, LVIS 1.0 in the authors' configs;
            ``CoDETR`` multiplies both losses by lambda_2 x decoder layers, as the authors).
        mask_iou_on: add the MaskIoU head (mask scoring).
        mask_iou_loss_weight: weight of "loss_mask_iou".
        mask_iou_fc_dim: width of the MaskIoU head's FC layer.
        iou_threshold: proposals with IoU >= this with a ground-truth box are positive.
        batch_size_per_image, positive_fraction, test_chunk_size: of
            :class:`QueryMaskBranch`.
    """
    if in_features is None:
        in_features = sorted(input_shape, key=lambda name: input_shape[name].stride)
    in_features = list(in_features)
    missing = [f for f in in_features if f not in input_shape]
    if missing:
        raise ValueError(f"in_features {missing} are not in input_shape {sorted(input_shape)}")
    channels = {input_shape[f].channels for f in in_features}
    if len(channels) != 1:
        raise ValueError(f"all levels must have the same channel count, got {sorted(channels)}")
    (in_channels,) = channels
    strides = [input_shape[f].stride for f in in_features]
    roi_size = stage_sizes[0]
    # detectron2's level mapping floor(canonical_level + log2(sqrt(area) / canonical_size))
    # with canonical_size = finest_scale on the first level is mmdet's
    mask_pooler = ROIPooler(
        output_size=roi_size,
        scales=[1.0 / s for s in strides],
        sampling_ratio=0,
        pooler_type="ROIAlignV2",
        canonical_box_size=finest_scale,
        canonical_level=round(math.log2(strides[0])),
    )
    mask_head = RefineMaskHead(
        in_channels=in_channels,
        num_classes=num_classes,
        semantic_stride=strides[0],
        conv_dim=conv_dim,
        num_instance_convs=num_instance_convs,
        num_semantic_convs=num_semantic_convs,
        dilations=dilations,
        stage_sizes=stage_sizes,
        class_agnostic_last_stage=class_agnostic_last_stage,
        stage_loss_weights=stage_loss_weights,
        boundary_width=boundary_width,
        loss_weight=mask_loss_weight,
    )
    mask_iou_head = (
        MaskIoUHead(
            in_channels=in_channels,
            num_classes=num_classes,
            roi_size=roi_size,
            conv_dim=conv_dim,
            fc_dim=mask_iou_fc_dim,
            loss_weight=mask_iou_loss_weight,
        )
        if mask_iou_on
        else None
    )
    return QueryMaskBranch(
        in_features=in_features,
        semantic_feature=in_features[0],
        mask_pooler=mask_pooler,
        mask_head=mask_head,
        mask_iou_head=mask_iou_head,
        proposal_matcher=Matcher([iou_threshold], [0, 1], allow_low_quality_matches=False),
        num_proposals=num_proposals,
        batch_size_per_image=batch_size_per_image,
        positive_fraction=positive_fraction,
        mask_iou_threshold=0.5,
        test_chunk_size=test_chunk_size,
    )
