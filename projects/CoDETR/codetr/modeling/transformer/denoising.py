"""
Contrastive denoising (DINO): noised copies of the ground truth are decoded next to the
matching queries and must be reconstructed (positives) or rejected as background
(negatives).
"""

from typing import Dict, List

import torch
from torch import Tensor, nn

from torchvision.ops import box_convert

from codetr.layers import inverse_sigmoid

from ..query_group import QueryGroup
from ..random_draws import random_draws

__all__ = ["ContrastiveDenoising"]


class ContrastiveDenoising(nn.Module):
    """
    Args:
        num_classes, embed_dim: sizes of the label embedding (``label_embedding``).
        num_dn_queries: dynamic groups: num_groups = max(1, num_dn_queries // max_gts).
        label_noise_ratio: a label is replaced by a random class with probability
            ``label_noise_ratio / 2``.
        box_noise_scale: corners of positives move by U(0, 1) * (w/2, h/2) * scale, those of
            negatives by U(1, 2) * (w/2, h/2) * scale, in a random direction.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        embed_dim: int = 256,
        num_dn_queries: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
    ):
        super().__init__()
        if num_dn_queries < 1:
            raise ValueError(f"num_dn_queries must be >= 1, got {num_dn_queries}")
        self.num_classes = num_classes
        self.label_embedding = nn.Embedding(num_classes, embed_dim)
        self.num_dn_queries = num_dn_queries
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale

    def forward(self, targets: List[Dict[str, Tensor]], num_matching_queries: int) -> QueryGroup:
        """
        Args:
            targets: per image {"labels": (n,) int64, "boxes": (n, 4) normalised cxcywh (the
                targets), "query_boxes": (n, 4) the same, rounded as the queries' boxes,
                "box_normalizer": (4,); see :meth:`CoDETR.normalized_targets`}.
            num_matching_queries: Q, the number of queries decoded after the denoising ones.
        Returns:
            D = num_groups * 2 * max_gts queries, laid out per image as ``num_groups`` groups
            of ``2 * max_gts`` slots: ``max_gts`` positives then ``max_gts`` negatives (max_gts
            is the largest number of objects of an image in the batch; slots past an image's
            own count are padding, supervised as background). Content: label embeddings of the
            (possibly flipped) labels; reference boxes: the noised boxes; targets: the true
            class and box of positives, background otherwise (zero boxes); attention mask
            (D + Q, D + Q): matching queries cannot see denoising queries and groups cannot
            see each other.
        """
        device = self.label_embedding.weight.device
        batch_size = len(targets)
        counts = [len(t["labels"]) for t in targets]
        max_gts = max(counts)
        num_groups = max(1, self.num_dn_queries // max_gts) if max_gts > 0 else 1
        group_size = 2 * max_gts
        num_dn = group_size * num_groups

        labels = torch.cat([t["labels"] for t in targets])
        boxes = torch.cat([t["boxes"] for t in targets])
        # every gt appears once as positive and once as negative in each group
        noised_labels = labels.repeat(2 * num_groups)
        noised_boxes = torch.cat([t["query_boxes"] for t in targets]).repeat(2 * num_groups, 1)
        is_negative = torch.arange(2 * num_groups, device=device).repeat_interleave(len(labels))
        is_negative = is_negative % 2 == 1

        draws = random_draws()
        if self.label_noise_ratio > 0:
            p = draws.uniform("denoising.label_flip", noised_labels.shape, device)
            flipped = torch.nonzero(p < self.label_noise_ratio * 0.5).squeeze(1)
            noised_labels = noised_labels.clone()
            noised_labels[flipped] = draws.integers(
                "denoising.label", self.num_classes, flipped.shape, device
            )
        if self.box_noise_scale > 0:
            corners = box_convert(noised_boxes, "cxcywh", "xyxy")
            half_wh = noised_boxes[:, 2:].repeat(1, 2) / 2
            sign = draws.integers("denoising.box_sign", 2, noised_boxes.shape, device) * 2.0 - 1.0
            magnitude = draws.uniform("denoising.box_shift", noised_boxes.shape, device)
            magnitude = magnitude + is_negative[:, None].float()
            corners = corners + sign * magnitude * half_wh * self.box_noise_scale
            noised_boxes = box_convert(corners.clamp(0.0, 1.0), "xyxy", "cxcywh")

        # scatter into the per-image slot layout
        image_index = torch.cat(
            [torch.full((n,), i, dtype=torch.long, device=device) for i, n in enumerate(counts)]
        ).repeat(2 * num_groups)
        within_image = torch.cat([torch.arange(n, device=device) for n in counts])
        slot = (
            within_image.repeat(2 * num_groups)
            + torch.arange(2 * num_groups, device=device).repeat_interleave(len(labels)) * max_gts
        )
        embed_dim = self.label_embedding.embedding_dim
        content = self.label_embedding.weight.new_zeros((batch_size, num_dn, embed_dim))
        reference_logits = content.new_zeros((batch_size, num_dn, 4))
        content[image_index, slot] = self.label_embedding(noised_labels)
        reference_logits[image_index, slot] = inverse_sigmoid(noised_boxes, eps=1e-3)

        target_labels = torch.full(
            (batch_size, num_dn), self.num_classes, dtype=torch.long, device=device
        )
        target_boxes = content.new_zeros((batch_size, num_dn, 4))
        positive = ~is_negative
        target_labels[image_index[positive], slot[positive]] = labels.repeat(num_groups)
        target_boxes[image_index[positive], slot[positive]] = boxes.repeat(num_groups, 1)

        total = num_dn + num_matching_queries
        mask = torch.zeros((total, total), dtype=torch.bool, device=device)
        mask[num_dn:, :num_dn] = True
        group_id = torch.arange(num_dn, device=device) // max(group_size, 1)
        mask[:num_dn, :num_dn] = group_id[:, None] != group_id[None, :]
        return QueryGroup(
            content=content,
            reference_boxes=reference_logits.sigmoid(),
            target_labels=target_labels,
            target_boxes=target_boxes,
            box_normalizers=torch.stack([t["box_normalizer"] for t in targets]),
            self_attn_mask=mask,
        )
