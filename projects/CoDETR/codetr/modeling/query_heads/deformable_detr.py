"""
The Deformable-DETR query head as used by Co-Deformable-DETR: two-stage proposals ranked by
their first class logit and supervised with binary (object / not) labels, mixed query
selection (learned content, position embedding from the selected proposals), iterative box
refinement, sigmoid focal loss; no denoising.
"""

from typing import Dict, List, Tuple, Union

import torch
from torch import Tensor, nn

from codetr.layers import box_sine_embedding

from ..transformer import MultiLevelSequence
from .base import QueryHeadBase

__all__ = ["DeformableDETRHead"]


class DeformableDETRHead(QueryHeadBase):
    """
    Args:
        **kwargs: see :class:`QueryHeadBase`. The decoder must take its position embedding
            from the caller (``query_pos_from_boxes=False``).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.decoder.ref_point_head is not None:
            raise ValueError(
                "DeformableDETRHead gives the decoder its position embedding: build the decoder "
                "with query_pos_from_boxes=False"
            )

    def _build_query_pos_modules(self, embed_dim: int) -> List[nn.Module]:
        # position embedding of the selected proposals (first half of the output)
        self.pos_trans = nn.Linear(2 * embed_dim, 2 * embed_dim)
        self.pos_trans_norm = nn.LayerNorm(2 * embed_dim)
        return [self.pos_trans]

    def encoder_predictions(self, memory: MultiLevelSequence) -> Tuple[Tensor, Tensor]:
        """
        Scores and refines every encoder token as a proposal.

        Returns:
            logits: (B, S, K); boxes: (B, S, 4) normalised cxcywh (1.0 at invalid tokens).
        """
        logits, coords = self._score_proposals(memory)
        return logits, coords.sigmoid()

    def decode(self, memory: MultiLevelSequence) -> Dict[str, Tensor]:
        """
        Returns a dict with
            "logits" (L, B, Q, K), "boxes" (L, B, Q, 4): every decoder layer's predictions;
            "enc_logits" (B, S, K), "enc_boxes" (B, S, 4): every encoder token's proposal.
        """
        enc_logits, enc_boxes = self.encoder_predictions(memory)
        (reference,) = self._top_proposals(enc_logits[..., 0], enc_boxes)
        reference = reference.detach()
        embedding = self.pos_trans_norm(
            self.pos_trans(
                box_sine_embedding(
                    reference, num_pos_feats=self.decoder.embed_dim // 2, yx_first=False
                )
            )
        )
        query_pos = embedding[..., : self.decoder.embed_dim]
        content = self._matching_content(reference.shape[0])
        logits, boxes = self._decode_queries(memory, content, reference, query_pos=query_pos)
        return {"logits": logits, "boxes": boxes, "enc_logits": enc_logits, "enc_boxes": enc_boxes}

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
            ``loss_*`` / ``d{i}.loss_*`` (decoder layers) and ``enc_loss_*`` (every encoder
            proposal, matched to the ground truth as class 0: object / not object); with
            ``return_outputs``, (losses, outputs).
        """
        outputs = self.decode(memory)
        binary_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
        losses = self._matched_losses(outputs, targets, encoder_targets=binary_targets)
        return (losses, outputs) if return_outputs else losses
