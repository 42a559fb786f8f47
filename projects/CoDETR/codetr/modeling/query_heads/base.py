"""
What the DETR query heads (Co-DINO, Co-Deformable-DETR) share: the deformable encoder over
the neck levels, per-layer prediction heads, Hungarian set losses, the decoding of extra query
groups (Co-DETR's customized positive queries) against given targets, and the test-time
output.

A subclass decides how the decoder's matching queries are formed (``decode``) and what it adds
to the losses (denoising, encoder proposals).
"""

import math
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.structures import Instances
from torch import Tensor, nn

from codetr.layers import MLP, MultiScaleDeformableAttention, SinePositionEmbedding

from ..distributed import average_across_workers
from ..losses import DetectionLoss
from ..matcher import HungarianMatcher, hungarian_targets
from ..transformer import (
    DeformableDecoder,
    DeformableEncoder,
    MultiLevelSequence,
    flatten_levels,
    level_masks,
)
from .postprocess import detr_detections

__all__ = ["QueryHeadBase", "ExtraQueries"]


class ExtraQueries:
    """
    A group of queries decoded on their own through the shared decoder and prediction heads,
    with fixed targets (no matching): Co-DETR's customized positive queries.

    Attributes:
        content: (B, N, C) query content.
        reference_boxes: (B, N, 4) normalised cxcywh initial reference boxes.
        query_pos: (B, N, C) position embedding, or None when the decoder derives it from
            the reference boxes (DINO).
        target_labels: (B, N) int64, num_classes for background.
        target_boxes: (B, N, 4) normalised cxcywh (ignored for background).
        box_normalizers: (B, 4) per image (w, h, w, h) the boxes are normalised by.
    """

    def __init__(
        self,
        *,
        content: Tensor,
        reference_boxes: Tensor,
        target_labels: Tensor,
        target_boxes: Tensor,
        box_normalizers: Tensor,
        query_pos: Optional[Tensor] = None,
    ):
        self.content = content
        self.reference_boxes = reference_boxes
        self.query_pos = query_pos
        self.target_labels = target_labels
        self.target_boxes = target_boxes
        self.box_normalizers = box_normalizers


class QueryHeadBase(nn.Module):
    """
    Args:
        num_classes: K.
        num_queries: matching queries (= two-stage proposals kept).
        position_embedding: sine embedding of the padding mask of each level.
        encoder, decoder: the deformable transformer.
        matcher: one-to-one matcher of the set losses.
        loss: classification / L1 / GIoU losses.
        num_candidates, max_detections, soft_nms_iou_threshold: test-time output
            (:func:`detr_detections`).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        num_queries: int,
        position_embedding: SinePositionEmbedding,
        encoder: DeformableEncoder,
        decoder: DeformableDecoder,
        matcher: HungarianMatcher,
        loss: DetectionLoss,
        num_candidates: int,
        max_detections: int,
        soft_nms_iou_threshold: Optional[float] = None,
    ):
        super().__init__()
        embed_dim = decoder.embed_dim
        num_levels = encoder.layers[0].self_attn.num_levels
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.position_embedding = position_embedding
        self.encoder = encoder
        self.decoder = decoder
        self.matcher = matcher
        self.loss = loss
        self.num_candidates = num_candidates
        self.max_detections = max_detections
        self.soft_nms_iou_threshold = soft_nms_iou_threshold

        self.level_embeds = nn.Parameter(torch.empty(num_levels, embed_dim))
        # one class and one box head per decoder layer, plus one for the encoder proposals
        num_heads = decoder.num_layers + 1
        self.class_heads = nn.ModuleList(
            nn.Linear(embed_dim, num_classes) for _ in range(num_heads)
        )
        self.box_heads = nn.ModuleList(
            MLP(input_dim=embed_dim, hidden_dim=embed_dim, output_dim=4, num_layers=3)
            for _ in range(num_heads)
        )

    def _reset_transformer_parameters(self, transformer_modules: List[nn.Module]) -> None:
        """Xavier for every matrix of the transformer, then each deformable attention's own
        initialisation (as the reference implementation)."""
        for module in transformer_modules:
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for module in transformer_modules:
            for m in module.modules():
                if isinstance(m, MultiScaleDeformableAttention):
                    m.reset_parameters()
        nn.init.normal_(self.level_embeds)

    def _reset_prediction_heads(self) -> None:
        prior_bias = -math.log((1 - 0.01) / 0.01)
        for head in self.class_heads:
            nn.init.constant_(head.bias, prior_bias)
        for head in self.box_heads:
            nn.init.zeros_(head[-1].weight)
            nn.init.zeros_(head[-1].bias)

    # ----------------------------------------------------------------------------- encoder
    def encode(self, features: List[Tensor], padding_mask: Tensor) -> MultiLevelSequence:
        """
        Args:
            features: the neck levels, each (B, C, H_l, W_l).
            padding_mask: (B, H, W) bool, True at padding of the batched input.
        Returns:
            the encoder memory (B, S, C) with its layout.
        """
        masks = level_masks(padding_mask, features)
        sequence = flatten_levels(features, masks)
        pos = torch.cat(
            [
                self.position_embedding(mask).flatten(2).transpose(1, 2) + level_embed
                for mask, level_embed in zip(masks, self.level_embeds)
            ],
            1,
        )
        return sequence.with_tokens(self.encoder(sequence, pos))

    # ----------------------------------------------------------------------------- decoder
    def _decode_group(
        self,
        memory: MultiLevelSequence,
        content: Tensor,
        reference_boxes: Tensor,
        query_pos: Optional[Tensor] = None,
        self_attn_mask: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        """
        Returns:
            logits: (num_layers, B, Q, K); boxes: (num_layers, B, Q, 4) normalised cxcywh.
        """
        hidden, boxes = self.decoder(
            content,
            reference_boxes,
            memory,
            self.box_heads,
            query_pos=query_pos,
            self_attn_mask=self_attn_mask,
        )
        logits = torch.stack([head(h) for head, h in zip(self.class_heads, hidden)])
        return logits, boxes

    # ----------------------------------------------------------------------------- losses
    def _set_losses(
        self, logits: Tensor, boxes: Tensor, targets: List[Dict[str, Tensor]]
    ) -> Dict[str, Tensor]:
        """Hungarian matching then the detection losses, for one group of predictions
        (B, Q, K) / (B, Q, 4)."""
        target_labels, target_boxes, num_matched = hungarian_targets(
            self.matcher, logits.detach(), boxes.detach(), targets, self.num_classes
        )
        num_positives = average_across_workers(num_matched, logits.device)
        return self.loss(
            logits,
            boxes,
            target_labels,
            target_boxes,
            box_normalizers=torch.stack([t["box_normalizer"] for t in targets]),
            num_positives=num_positives,
        )

    def _fixed_target_losses(
        self,
        logits: Tensor,
        boxes: Tensor,
        target_labels: Tensor,
        target_boxes: Tensor,
        box_normalizers: Tensor,
    ) -> Dict[str, Tensor]:
        """Detection losses against given per-query targets (B, Q) / (B, Q, 4); images of
        (B, 4) ``box_normalizers``."""
        num_positives = int((target_labels < self.num_classes).sum())
        num_positives = average_across_workers(num_positives, logits.device)
        return self.loss(
            logits,
            boxes,
            target_labels,
            target_boxes,
            box_normalizers=box_normalizers,
            num_positives=num_positives,
        )

    @staticmethod
    def _name_layer_losses(
        per_layer: List[Dict[str, Tensor]], prefix: str = "", suffix: str = ""
    ) -> Dict[str, Tensor]:
        """The last layer's losses keep their names, earlier layers get ``d{i}.``."""
        named = {}
        for index, losses in enumerate(per_layer):
            layer = "" if index == len(per_layer) - 1 else f"d{index}."
            for name, value in losses.items():
                named[f"{layer}{prefix}{name}{suffix}"] = value
        return named

    def _matched_losses(
        self,
        outputs: Dict[str, Tensor],
        targets: List[Dict[str, Tensor]],
        encoder_targets: List[Dict[str, Tensor]],
    ) -> Dict[str, Tensor]:
        """
        Hungarian losses of every decoder layer (``loss_*``, ``d{i}.loss_*``) and of the
        encoder proposals (``enc_loss_*``, against ``encoder_targets``), from the "logits" /
        "boxes" (L, B, Q, *) and "enc_logits" / "enc_boxes" (B, N, *) of ``outputs``.
        """
        losses = self._name_layer_losses(
            [self._set_losses(l, b, targets) for l, b in zip(outputs["logits"], outputs["boxes"])]
        )
        encoder = self._set_losses(outputs["enc_logits"], outputs["enc_boxes"], encoder_targets)
        losses.update(self._name_layer_losses([encoder], prefix="enc_"))
        return losses

    def extra_query_losses(
        self, memory: MultiLevelSequence, queries: ExtraQueries, *, weight: float, suffix: str
    ) -> Dict[str, Tensor]:
        """
        Decodes a group of extra queries (no denoising, no attention mask) and supervises
        every decoder layer with the group's fixed targets.

        Returns:
            ``loss_*{suffix}`` for the last layer, ``d{i}.loss_*{suffix}`` for the others,
            each multiplied by ``weight``.
        """
        logits, boxes = self._decode_group(
            memory, queries.content, queries.reference_boxes, query_pos=queries.query_pos
        )
        per_layer = []
        for layer_logits, layer_boxes in zip(logits, boxes):
            losses = self._fixed_target_losses(
                layer_logits,
                layer_boxes,
                queries.target_labels,
                queries.target_boxes,
                queries.box_normalizers,
            )
            per_layer.append({k: v * weight for k, v in losses.items()})
        return self._name_layer_losses(per_layer, suffix=suffix)

    # ----------------------------------------------------------------------------- inference
    def detections(
        self,
        logits: Tensor,
        boxes: Tensor,
        box_normalizers: Tensor,
        image_sizes: List[Tuple[int, int]],
    ) -> List[Instances]:
        """Test output from the last layer's (B, Q, K) logits and (B, Q, 4) boxes."""
        return detr_detections(
            logits,
            boxes,
            box_normalizers,
            image_sizes,
            num_candidates=self.num_candidates,
            max_detections=self.max_detections,
            soft_nms_iou_threshold=self.soft_nms_iou_threshold,
        )
