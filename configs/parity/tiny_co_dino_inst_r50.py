"""
The tiny Co-DINO-Inst of ``tests/parity/tiny_co_dino_inst_official_*`` (made by
``tools/tiny_parity_official.py`` with the authors' code): the tiny Co-DINO R50 of
``tiny_co_dino_r50.py`` (that of ``shared/reference/official_parity``) with the mask branch of
the authors' ViT-L COCO instance config (as ``co_dino_5scale_vit_large_coco_instance.py`` in
``configs/co_dino_vit``) at the tiny width, so that our mask branch can be checked number for
number against the authors' implementation.

Mask branch: 14 x 14 RoIAlign on the five encoder levels (finest scale 56), the RefineMask-style
head with 1 instance and 2 semantic 3 x 3 LN convs of 64 channels and three fusion stages
(64 -> 32 -> 16 -> 8 channels, dilations 1, 3, 5 with the global average; masks of 14, 28, 56
and 112, the last class-agnostic), and the MaskIoU head (2 LN convs of 64 channels, one FC of
128 instead of 1024); test: the query head's detections (top 30, soft-NMS 0.8, 300 kept) with
their masks, scores rescored by the predicted mask IoU (the query head's kept as
``box_scores``).
"""

from codetr.engine import LazyPartial
from codetr.modeling.mask_heads import build_query_mask_branch

from .tiny_co_dino_r50 import EMBED_DIM, model

model.mask_branch = LazyPartial(build_query_mask_branch)(
    conv_dim=EMBED_DIM, mask_iou_fc_dim=2 * EMBED_DIM, mask_loss_weight=1.33
)
