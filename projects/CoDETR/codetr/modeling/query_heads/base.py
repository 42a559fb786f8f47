"""
What the DETR query heads (Co-DINO, Co-Deformable-DETR) share: the deformable encoder over
the neck levels, two-stage proposals (every encoder token scored and refined; the best ones
place the matching queries, whose content is learned), per-layer prediction heads, Hungarian
set losses, the decoding of query groups with fixed targets (:class:`QueryGroup`: Co-DETR's
customized positive queries, DINO's denoising queries) and their losses, and the test-time
output.

A subclass decides how the proposals are ranked and how they form the decoder's matching
queries (``decode``), and what it adds to the losses (denoising, encoder proposals).
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
from ..query_group import QueryGroup
from ..transformer import (
    DeformableDecoder,
    DeformableEncoder,
    MultiLevelSequence,
    encoder_proposals,
    flatten_levels,
    level_masks,
)
from .postprocess import detr_detections

__all__ = ["QueryHeadBase"]


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
        # two-stage: every encoder token, projected, becomes a proposal that the last class /
        # box head scores and refines
        self.enc_output = nn.Linear(embed_dim, embed_dim)
        self.enc_output_norm = nn.LayerNorm(embed_dim)
        query_pos_modules = self._build_query_pos_modules(embed_dim)
        # content of the matching queries (positions come from the selected proposals)
        self.query_embed = nn.Embedding(num_queries, embed_dim)
        self._reset_parameters([self.encoder, self.decoder, self.enc_output, *query_pos_modules])

    def _build_query_pos_modules(self, embed_dim: int) -> List[nn.Module]:
        """
        Builds the modules that embed the selected proposals as the matching queries' position
        embedding and returns those to initialise with the transformer. The constructor calls
        it between ``enc_output`` and ``query_embed``: the reference's order of random
        initialisation. None here: the decoder derives the position embedding from the
        reference boxes.
        """
        return []

    def _reset_parameters(self, transformer_modules: List[nn.Module]) -> None:
        """Xavier for every matrix of the transformer, then each deformable attention's own
        initialisation (as the reference implementation); the class heads start at the focal
        prior, the box heads with zero deltas."""
        for module in transformer_modules:
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for module in transformer_modules:
            for m in module.modules():
                if isinstance(m, MultiScaleDeformableAttention):
                    m.reset_parameters()
        nn.init.normal_(self.level_embeds)
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

    # ----------------------------------------------------------------------------- two-stage
    def _score_proposals(self, memory: MultiLevelSequence) -> Tuple[Tensor, Tensor]:
        """
        Scores and refines every encoder token as a proposal (:func:`encoder_proposals`).

        Returns:
            logits: (B, S, K) class logits.
            coords: (B, S, 4) refined boxes in logit space (their sigmoid is normalised
                cxcywh), ``inf`` at invalid tokens.
        """
        tokens, proposals = encoder_proposals(memory)
        tokens = self.enc_output_norm(self.enc_output(tokens))
        return self.class_heads[-1](tokens), self.box_heads[-1](tokens) + proposals

    def _top_proposals(self, scores: Tensor, *values: Tensor) -> List[Tensor]:
        """
        Keeps the ``num_queries`` (Q) proposals of the highest scores, best first.

        Args:
            scores: (B, S) a score per encoder token.
            values: each (B, S, D), per encoder token.
        Returns:
            each of ``values`` at the kept proposals, (B, Q, D).
        """
        num_tokens = scores.shape[1]
        if num_tokens < self.num_queries:
            raise ValueError(
                f"The input has {num_tokens} feature positions over all levels, fewer than "
                f"num_queries={self.num_queries}: use larger images or fewer queries."
            )
        top = scores.topk(self.num_queries, dim=1)[1]
        return [v.gather(1, top[..., None].expand(-1, -1, v.shape[-1])) for v in values]

    def _matching_content(self, batch_size: int) -> Tensor:
        """(B, Q, C) the learned content of the matching queries."""
        return self.query_embed.weight[None].expand(batch_size, -1, -1)

    # ----------------------------------------------------------------------------- decoder
    def _decode_queries(
        self,
        memory: MultiLevelSequence,
        content: Tensor,
        reference_boxes: Tensor,
        *,
        query_pos: Optional[Tensor] = None,
        self_attn_mask: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        """
        Args:
            memory: the encoder memory.
            content: (B, N, C) query content.
            reference_boxes: (B, N, 4) normalised cxcywh initial reference boxes.
            query_pos: (B, N, C) position embedding, or None where the decoder derives it
                from the reference boxes.
            self_attn_mask: (N, N) bool, True where attention is NOT allowed, or None.
        Returns:
            logits: (num_layers, B, N, K); boxes: (num_layers, B, N, 4) normalised cxcywh.
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

    def _query_group_losses(
        self,
        logits: Tensor,
        boxes: Tensor,
        group: QueryGroup,
        *,
        weight: float = 1.0,
        prefix: str = "",
        suffix: str = "",
    ) -> Dict[str, Tensor]:
        """
        The detection losses of every decoder layer against the group's fixed targets.

        Args:
            logits: (L, B, N, K), boxes: (L, B, N, 4) normalised cxcywh: every decoder layer's
                predictions of the group's queries.
            group: the queries with their targets.
        Returns:
            ``{prefix}loss_*{suffix}`` for the last layer, ``d{i}.{prefix}loss_*{suffix}`` for
            the others, each multiplied by ``weight``.
        """
        num_positives = int((group.target_labels < self.num_classes).sum())
        num_positives = average_across_workers(num_positives, logits.device)
        per_layer = []
        for layer_logits, layer_boxes in zip(logits, boxes):
            losses = self.loss(
                layer_logits,
                layer_boxes,
                group.target_labels,
                group.target_boxes,
                box_normalizers=group.box_normalizers,
                num_positives=num_positives,
            )
            per_layer.append({k: v * weight for k, v in losses.items()})
        return self._name_layer_losses(per_layer, prefix=prefix, suffix=suffix)

    def extra_query_losses(
        self, memory: MultiLevelSequence, queries: QueryGroup, *, weight: float, suffix: str
    ) -> Dict[str, Tensor]:
        """
        Decodes a group of queries on its own (no matching queries, no attention mask:
        Co-DETR's customized positive queries) and supervises every decoder layer with the
        group's targets.

        Returns:
            ``loss_*{suffix}`` for the last layer, ``d{i}.loss_*{suffix}`` for the others,
            each multiplied by ``weight``.
        """
        logits, boxes = self._decode_queries(
            memory, queries.content, queries.reference_boxes, query_pos=queries.query_pos
        )
        return self._query_group_losses(logits, boxes, queries, weight=weight, suffix=suffix)

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
