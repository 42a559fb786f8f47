"""
The DINO query head (DINO-Deformable-DETR as used by Co-DINO): two-stage proposals ranked by
their best class logit, mixed query selection (learned content, positions from the selected
proposals), contrastive denoising, and quality focal loss on every decoder layer, the encoder
proposals and the denoising groups.
"""

from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from ..transformer import ContrastiveDenoising, DenoisingQueries, MultiLevelSequence
from ..transformer import encoder_proposals
from .base import QueryHeadBase

__all__ = ["DINOHead"]


class DINOHead(QueryHeadBase):
    """
    Args:
        denoising: contrastive denoising of the ground truth in training; None to disable.
        **kwargs: see :class:`QueryHeadBase`.
    """

    def __init__(self, *, denoising: Optional[ContrastiveDenoising], **kwargs):
        super().__init__(**kwargs)
        embed_dim = self.decoder.embed_dim
        self.enc_output = nn.Linear(embed_dim, embed_dim)
        self.enc_output_norm = nn.LayerNorm(embed_dim)
        # content of the matching queries (positions come from the selected proposals)
        self.query_embed = nn.Embedding(self.num_queries, embed_dim)
        self.denoising = denoising

        self._reset_transformer_parameters([self.encoder, self.decoder, self.enc_output])
        nn.init.normal_(self.query_embed.weight)
        self._reset_prediction_heads()

    def select_proposals(self, memory: MultiLevelSequence):
        """
        Scores and refines every encoder token as a proposal and keeps the ``num_queries``
        with the highest best-class logit.

        Returns:
            logits: (B, Q, K) class logits of the kept proposals.
            boxes: (B, Q, 4) their refined boxes, normalised cxcywh (with gradient).
        """
        num_tokens = memory.tokens.shape[1]
        if num_tokens < self.num_queries:
            raise ValueError(
                f"The input has {num_tokens} feature positions over all levels, fewer than "
                f"num_queries={self.num_queries}: use larger images or fewer queries."
            )
        tokens, proposals = encoder_proposals(memory)
        tokens = self.enc_output_norm(self.enc_output(tokens))
        logits = self.class_heads[-1](tokens)
        coords = self.box_heads[-1](tokens) + proposals
        top = logits.max(-1)[0].topk(self.num_queries, dim=1)[1]
        top_logits = logits.gather(1, top[..., None].expand(-1, -1, logits.shape[-1]))
        top_coords = coords.gather(1, top[..., None].expand(-1, -1, 4))
        return top_logits, top_coords.sigmoid()

    def decode(
        self, memory: MultiLevelSequence, denoising: Optional[DenoisingQueries] = None
    ) -> Dict[str, Tensor]:
        """
        Returns a dict with
            "logits" (L, B, Q, K), "boxes" (L, B, Q, 4): every decoder layer's predictions of
                the matching queries;
            "enc_logits" (B, Q, K), "enc_boxes" (B, Q, 4): the selected encoder proposals;
            with ``denoising``: "dn_logits" (L, B, D, K) and "dn_boxes" (L, B, D, 4).
        """
        enc_logits, enc_boxes = self.select_proposals(memory)
        batch_size = enc_logits.shape[0]
        content = self.query_embed.weight[None].expand(batch_size, -1, -1)
        reference = enc_boxes.detach()
        mask = None
        if denoising is not None:
            content = torch.cat([denoising.content, content], 1)
            reference = torch.cat([denoising.reference_boxes, reference], 1)
            mask = denoising.self_attn_mask
        logits, boxes = self._decode_group(memory, content, reference, self_attn_mask=mask)
        num_dn = 0 if denoising is None else denoising.num_queries
        outputs = {
            "logits": logits[:, :, num_dn:],
            "boxes": boxes[:, :, num_dn:],
            "enc_logits": enc_logits,
            "enc_boxes": enc_boxes,
        }
        if denoising is not None:
            outputs["dn_logits"] = logits[:, :, :num_dn]
            outputs["dn_boxes"] = boxes[:, :, :num_dn]
        return outputs

    def losses(
        self, memory: MultiLevelSequence, targets: List[Dict[str, Tensor]]
    ) -> Dict[str, Tensor]:
        """
        Args:
            memory: the encoder memory.
            targets: per image {"labels": (n,) int64, "boxes": (n, 4) normalised cxcywh,
                "query_boxes", "box_normalizer"}: see :meth:`CoDETR.normalized_targets`.
        Returns:
            ``loss_*`` / ``d{i}.loss_*`` (decoder layers), ``enc_loss_*`` (encoder
            proposals), ``dn_loss_*`` / ``d{i}.dn_loss_*`` (denoising groups).
        """
        denoising = None
        if self.denoising is not None:
            denoising = self.denoising(targets, self.num_queries)
        outputs = self.decode(memory, denoising)
        losses = self._matched_losses(outputs, targets, encoder_targets=targets)
        if denoising is not None:
            box_normalizers = torch.stack([t["box_normalizer"] for t in targets])
            per_layer = [
                self._fixed_target_losses(
                    l, b, denoising.target_labels, denoising.target_boxes, box_normalizers
                )
                for l, b in zip(outputs["dn_logits"], outputs["dn_boxes"])
            ]
            losses.update(self._name_layer_losses(per_layer, prefix="dn_"))
        return losses
