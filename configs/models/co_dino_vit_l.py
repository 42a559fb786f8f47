"""
Co-DINO ViT-L (EVA-02): the authors' ``co_dino_5scale_vit_large_coco.py`` model. An EVA-02
ViT-L backbone (patch 16, 24 blocks, window 24 with global attention in blocks 3, 7, ..., 23,
drop path 0.4, activation checkpointing), their simple feature pyramid to p2 ... p6 at 256
channels, the Co-DINO head with 1500 queries and 300 denoising queries (box noise 0.4),
R-CNN and ATSS auxiliary heads; its RoI box head is 4 GroupNorm convs and 1 FC with
class-agnostic regression (target stds 0.05, 0.05, 0.1, 0.1). Test output: the best 1000 of
query x class after soft-NMS 0.8; the auxiliary heads' (``eval_module``) also use soft-NMS, as
the authors' test settings: RPN 8000 per level, NMS 0.9, 2000 proposals, RoI soft-NMS 0.5 and
1000 detections, ATSS soft-NMS 0.6 and 100 detections. Inputs padded to a multiple of 32.
"""

from detectron2.config import LazyCall as L

from codetr.modeling import SimpleFeaturePyramid, build_eva02_vit
from codetr.modeling.eva_vit import eva02_vit_output_shape

from .co_dino_r50 import model

model.backbone = L(build_eva02_vit)(
    size="L",
    window_size=24,
    global_block_indexes=[3, 7, 11, 15, 19, 23],
    drop_path_rate=0.4,
    use_act_checkpoint=True,
)
model.neck = L(SimpleFeaturePyramid)(
    input_shape=L(eva02_vit_output_shape)(size="${model.backbone.size}"),
    in_feature="last_feat",
    out_channels=256,
    scale_factors=[4.0, 2.0, 1.0, 0.5, 0.25],
)
model.size_divisibility = 32

head = model.query_head
head.update(num_queries=1500, num_candidates=1500, max_detections=1000)
head.denoising.update(num_dn_queries=300, box_noise_scale=0.4)
head.encoder.num_checkpointed_layers = 6

model.aux_heads[0].update(
    num_box_head_convs=4,
    num_box_head_fcs=1,
    box_head_norm="GN",
    cls_agnostic_bbox_reg=True,
    box_reg_weights=[20.0, 20.0, 10.0, 10.0],
    rpn_test_pre_nms_topk=8000,
    rpn_test_post_nms_topk=2000,
    rpn_test_nms_thresh=0.9,
    test_soft_nms=True,
    test_topk_per_image=1000,
)
model.aux_heads[1].test_soft_nms = True
