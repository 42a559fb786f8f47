"""DINO-Deformable-DETR R50, 5 levels, 900 queries: the base detector of Co-DINO (spec §3).

The number of classes is set once, at ``model.query_head.num_classes``; every other module
reads it from there.
"""

from detectron2.config import LazyCall as L

from codetr.layers import SinePositionEmbedding
from codetr.modeling import ChannelMapper, CoDETR, DINOHead
from codetr.modeling.backbone import build_resnet, resnet_output_shape
from codetr.modeling.losses import DetectionLoss
from codetr.modeling.matcher import HungarianMatcher
from codetr.modeling.transformer import (
    ContrastiveDenoising,
    DeformableDecoder,
    DeformableEncoder,
)

NUM_CLASSES = "${model.query_head.num_classes}"
EMBED_DIM = 256
# the transformer width is the neck's, read from it
NECK_CHANNELS = "${model.neck.out_channels}"
NUM_LEVELS = 5

model = L(CoDETR)(
    backbone=L(build_resnet)(
        depth=50, base_channels=64, out_features=["res2", "res3", "res4", "res5"], freeze_at=2
    ),
    neck=L(ChannelMapper)(
        # the backbone's outputs, read from its settings
        input_shape=L(resnet_output_shape)(
            depth="${model.backbone.depth}",
            base_channels="${model.backbone.base_channels}",
            out_features="${model.backbone.out_features}",
        ),
        in_features="${model.backbone.out_features}",
        out_channels=EMBED_DIM,
        num_extra_levels=1,
    ),
    query_head=L(DINOHead)(
        num_classes=80,
        num_queries=900,
        position_embedding=L(SinePositionEmbedding)(
            num_pos_feats=EMBED_DIM // 2, temperature=20, normalize=True
        ),
        encoder=L(DeformableEncoder)(
            num_layers=6,
            embed_dim=NECK_CHANNELS,
            num_heads=8,
            num_levels=NUM_LEVELS,
            num_points=4,
            ffn_dim=2048,
            dropout=0.0,
            num_checkpointed_layers=0,
        ),
        decoder=L(DeformableDecoder)(
            num_layers=6,
            embed_dim=NECK_CHANNELS,
            num_heads=8,
            num_levels=NUM_LEVELS,
            num_points=4,
            ffn_dim=2048,
            dropout=0.0,
            query_pos_from_boxes=True,
            output_norm=True,
            look_forward_twice=True,
            inverse_sigmoid_eps=1e-3,
        ),
        denoising=L(ContrastiveDenoising)(
            num_classes=NUM_CLASSES,
            embed_dim=NECK_CHANNELS,
            num_dn_queries=100,
            label_noise_ratio=0.5,
            box_noise_scale=1.0,
        ),
        matcher=L(HungarianMatcher)(class_weight=2.0, l1_weight=5.0, giou_weight=2.0),
        loss=L(DetectionLoss)(
            num_classes=NUM_CLASSES,
            class_loss="quality_focal",
            class_weight=1.0,
            l1_weight=5.0,
            giou_weight=2.0,
        ),
        num_candidates=900,
        max_detections=300,
        soft_nms_iou_threshold=0.8,
    ),
    aux_heads=[],
    positive_queries=None,
    eval_module="detr",
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
    input_format="RGB",
)
