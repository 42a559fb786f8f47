"""
Co-Deformable-DETR R50 (spec §3): 4 levels (strides 8..64), 300 queries, two-stage with
binary encoder labels, box refinement, mixed query selection, look-forward-twice, sigmoid
focal loss; a Faster R-CNN and an ATSS auxiliary head on the encoder memory (5 levels,
strides 8..128) and their positives as customized positive queries.

The number of classes is set once, at ``model.query_head.num_classes``. Ablations: see
``co_dino_r50.py`` (the same switches).
"""

from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

from codetr.layers import SinePositionEmbedding
from codetr.modeling import ChannelMapper, CoDETR, DeformableDETRHead
from codetr.modeling import DeformablePositiveQueryBuilder
from codetr.modeling.aux_heads import ATSSHead, build_rcnn_aux_head
from codetr.modeling.backbone import build_resnet
from codetr.modeling.losses import DetectionLoss
from codetr.modeling.matcher import HungarianMatcher
from codetr.modeling.transformer import DeformableDecoder, DeformableEncoder

NUM_CLASSES = "${model.query_head.num_classes}"
EMBED_DIM = 256
NUM_LEVELS = 4
AUX_FEATURES = [f"p{i}" for i in range(3, 8)]
AUX_INPUT_SHAPE = {f"p{i}": L(ShapeSpec)(channels=EMBED_DIM, stride=2**i) for i in range(3, 8)}

model = L(CoDETR)(
    backbone=L(build_resnet)(depth=50, out_features=["res3", "res4", "res5"], freeze_at=2),
    neck=L(ChannelMapper)(
        input_shape={
            f"res{i}": L(ShapeSpec)(channels=256 * 2 ** (i - 2), stride=2**i) for i in range(3, 6)
        },
        in_features=["res3", "res4", "res5"],
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
            embed_dim=EMBED_DIM,
            num_heads=8,
            num_levels=NUM_LEVELS,
            num_points=4,
            ffn_dim=2048,
            dropout=0.0,
        ),
        decoder=L(DeformableDecoder)(
            num_layers=6,
            embed_dim=EMBED_DIM,
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
        L(build_rcnn_aux_head)(
            input_shape=AUX_INPUT_SHAPE,
            in_features=AUX_FEATURES,
            roi_in_features=AUX_FEATURES[:4],
            finest_scale=112,
            num_classes=NUM_CLASSES,
            # the heads' own weights; model.aux_loss_weight scales them by 12
            rpn_loss_weight=1.0,
            cls_loss_weight=1.0,
            giou_loss_weight=10.0,
            # matching, sampling and normalisers as the authors' code ("detectron2": detectron2's)
            training_conventions="authors",
        ),
        L(ATSSHead)(
            input_shape=AUX_INPUT_SHAPE,
            in_features=AUX_FEATURES,
            num_classes=NUM_CLASSES,
            num_convs=1,
            cls_loss_weight=1.0,
            bbox_loss_weight=2.0,
            centerness_loss_weight=1.0,
        ),
    ],
    aux_loss_weight=12.0,
    positive_queries=L(DeformablePositiveQueryBuilder)(
        num_heads=2,
        embed_dim=EMBED_DIM,
        num_classes=NUM_CLASSES,
        min_queries=9,
        max_queries=300,
        loss_weight=1.0,
        head_embed_dim=1,
    ),
    eval_module="detr",
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
    input_format="RGB",
)
