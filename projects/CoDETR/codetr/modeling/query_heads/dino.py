"""
The DINO query head (DINO-Deformable-DETR as used by Co-DINO): two-stage proposals ranked by
their best class logit, mixed query selection (learned content, positions from the selected
proposals), contrastive denoising, and quality focal loss on every decoder layer, the encoder
proposals and the denoising groups.
"""

from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..query_group import QueryGroup
from ..transformer import ContrastiveDenoising, MultiLevelSequence
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
        # as the reference: the matching queries' content is drawn again, after the transformer
        nn.init.normal_(self.query_embed.weight)
        self.denoising = denoising

    def select_proposals(self, memory: MultiLevelSequence) -> Tuple[Tensor, Tensor]:
        """
        Scores and refines every encoder token as a proposal and keeps the ``num_queries``
        with the highest best-class logit.

        Returns:
            logits: (B, Q, K) class logits of the kept proposals.
            boxes: (B, Q, 4) their refined boxes, normalised cxcywh (with gradient).
        """
        logits, coords = self._score_proposals(memory)
        top_logits, top_coords = self._top_proposals(logits.max(-1)[0], logits, coords)
        return top_logits, top_coords.sigmoid()

    def decode(
        self, memory: MultiLevelSequence, denoising: Optional[QueryGroup] = None
    ) -> Dict[str, Tensor]:
        """
        Args:
            memory: the encoder memory.
            denoising: D denoising queries, decoded ahead of the matching queries.
        Returns a dict with
            "logits" (L, B, Q, K), "boxes" (L, B, Q, 4): every decoder layer's predictions of
                the matching queries;
            "enc_logits" (B, Q, K), "enc_boxes" (B, Q, 4): the selected encoder proposals;
            with ``denoising``: "dn_logits" (L, B, D, K) and "dn_boxes" (L, B, D, 4).
        """
        enc_logits, enc_boxes = self.select_proposals(memory)
        content = self._matching_content(enc_logits.shape[0])
        reference = enc_boxes.detach()
        mask = None
        if denoising is not None:
            content = torch.cat([denoising.content, content], 1)
            reference = torch.cat([denoising.reference_boxes, reference], 1)
            mask = denoising.self_attn_mask
        logits, boxes = self._decode_queries(memory, content, reference, self_attn_mask=mask)
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
        self,
        memory: MultiLevelSequence,
        targets: List[Dict[str, Tensor]],
        *,
        return_outputs: bool = False,
    ) -> Union[Dict[str, Tensor], Tuple[Dict[str, Tensor], Dict[str, Tensor]]]:
        """
        Args:
            memory: the encoder memory.
            targets: per image {"labels": (n,) int64, "boxes": (n, 4) normalised cxcywh,
                "query_boxes", "box_normalizer"}: see :meth:`CoDETR.normalized_targets`.
            return_outputs: also return the :meth:`decode` output the losses were computed
                from (the mask branch takes its boxes).
        Returns:
            ``loss_*`` / ``d{i}.loss_*`` (decoder layers), ``enc_loss_*`` (encoder
            proposals), ``dn_loss_*`` / ``d{i}.dn_loss_*`` (denoising groups); with
            ``return_outputs``, (losses, outputs).
        """
        denoising = None
        if self.denoising is not None:
            denoising = self.denoising(targets, self.num_queries)
        outputs = self.decode(memory, denoising)
        losses = self._matched_losses(outputs, targets, encoder_targets=targets)
        if denoising is not None:
            losses.update(
                self._query_group_losses(
                    outputs["dn_logits"], outputs["dn_boxes"], denoising, prefix="dn_"
                )
            )
        return (losses, outputs) if return_outputs else losses
