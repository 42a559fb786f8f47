"""
Co-DINO-Inst: instance masks for the query head's boxes (``CoDETR(mask_branch=...)``).

refine_mask.py: the RefineMask-style mask head and its boundary-aware loss; mask_iou.py: the
MaskIoU head (mask scoring); query_mask_branch.py: the branch that assigns the query head's
boxes to the ground truth, trains both heads and gives the detections their masks.
"""

from .mask_iou import MaskIoUHead, gt_area_ratios, mask_iou_targets
from .query_mask_branch import QueryMaskBranch, build_query_mask_branch, last_layer_predictions
from .refine_mask import (
    RefineMaskHead,
    boundary_aware_mask_loss,
    boundary_block_targets,
    refine_stage_logits,
    stage_mask_targets,
)

__all__ = [k for k in globals().keys() if not k.startswith("_")]
