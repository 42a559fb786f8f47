"""
Co-Deformable-DETR R50 (spec §3): 4 levels (strides 8..64), 300 queries, two-stage with
binary encoder labels, box refinement, mixed query selection, look-forward-twice, sigmoid
focal loss; a Faster R-CNN and an ATSS auxiliary head on the encoder memory (5 levels,
strides 8..128) and their positives as customized positive queries.

The number of classes is set once, at ``model.query_head.num_classes``. What the model derives
(the heads' input shapes and class count, the positive queries' head count), the loss weights
(lambda_1 = 1, lambda_2 = 2, x 6 decoder layers) and the ablation switches are as in
``co_dino_r50.py``.
"""

from detectron2.config import LazyCall as L

from codetr.engine import LazyPartial
from codetr.layers import SinePositionEmbedding
from codetr.modeling import ChannelMapper, CoDETR, DeformableDETRHead
from codetr.modeling import DeformablePositiveQueryBuilder
from codetr.modeling.aux_heads import ATSSHead, build_rcnn_aux_head
from codetr.modeling.backbone import build_resnet, resnet_output_shape
from codetr.modeling.losses import DetectionLoss
from codetr.modeling.matcher import HungarianMatcher
from codetr.modeling.transformer import DeformableDecoder, DeformableEncoder

NUM_CLASSES = "${model.query_head.num_classes}"
EMBED_DIM = 256
# the transformer width is the neck's, read from it
NECK_CHANNELS = "${model.neck.out_channels}"
NUM_LEVELS = 4

model = L(CoDETR)(
    backbone=L(build_resnet)(
        depth=50, base_channels=64, out_features=["res3", "res4", "res5"], freeze_at=2
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
    query_head=L(DeformableDETRHead)(
        num_classes=80,
        num_queries=300,
        position_embedding=L(SinePositionEmbedding)(
            num_pos_feats=EMBED_DIM // 2, normalize=True, offset=-0.5
        ),
        encoder=L(DeformableEncoder)(
            num_layers=6,
            embed_dim=NECK_CHANNELS,
            num_heads=8,
            num_levels=NUM_LEVELS,
            num_points=4,
            ffn_dim=2048,
            dropout=0.0,
        ),
        decoder=L(DeformableDecoder)(
            num_layers=6,
            embed_dim=NECK_CHANNELS,
            num_heads=8,
            num_levels=NUM_LEVELS,
            num_points=4,
            ffn_dim=2048,
            dropout=0.0,
            query_pos_from_boxes=False,
            output_norm=False,
            look_forward_twice=True,
            inverse_sigmoid_eps=1e-5,
        ),
        matcher=L(HungarianMatcher)(class_weight=2.0, l1_weight=5.0, giou_weight=2.0),
        loss=L(DetectionLoss)(
            num_classes=NUM_CLASSES,
            class_loss="focal",
            class_weight=2.0,
            l1_weight=5.0,
            giou_weight=2.0,
        ),
        num_candidates=100,
        max_detections=100,
        soft_nms_iou_threshold=None,
    ),
    aux_heads=[
        LazyPartial(build_rcnn_aux_head)(
            num_roi_levels=4,
            finest_scale=112,
            # matching, sampling and normalisers as the authors' code ("detectron2": detectron2's)
            training_conventions="authors",
        ),
        LazyPartial(ATSSHead)(num_convs=1),
    ],
    positive_queries=LazyPartial(DeformablePositiveQueryBuilder)(
        min_queries=9, max_queries=300, head_embed_dim=1
    ),
    lambda_1=1.0,
    lambda_2=2.0,
    eval_module="detr",
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
    input_format="RGB",
)
