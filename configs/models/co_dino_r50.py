"""
Co-DINO R50: the DINO detector of ``dino_r50.py`` trained with collaborative hybrid
assignments (spec §3): a Faster R-CNN and an ATSS auxiliary head on the encoder memory
(6 levels, strides 4..128), and their positives as customized positive queries in the
shared decoder. At inference the auxiliary branch is not run.

Ablation switches:
- auxiliary heads off: ``model.aux_heads=[]`` and ``model.positive_queries=null``;
- positive queries off: ``model.positive_queries=null``;
- lambda_1: ``model.positive_queries.loss_weight`` (1.0);
- lambda_2: ``model.aux_loss_weight`` (= num_decoder_layers x lambda_2 = 6 x 2.0 = 12);
- which heads: edit the ``model.aux_heads`` list (and ``positive_queries.num_heads``).
"""

from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

from codetr.modeling import DINOPositiveQueryBuilder
from codetr.modeling.aux_heads import ATSSHead, build_rcnn_aux_head

from .dino_r50 import EMBED_DIM, NUM_CLASSES, model

AUX_FEATURES = [f"p{i}" for i in range(2, 8)]
AUX_INPUT_SHAPE = {f"p{i}": L(ShapeSpec)(channels=EMBED_DIM, stride=2**i) for i in range(2, 8)}

model.aux_heads = [
    L(build_rcnn_aux_head)(
        input_shape=AUX_INPUT_SHAPE,
        in_features=AUX_FEATURES,
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
]
model.aux_loss_weight = 12.0
model.positive_queries = L(DINOPositiveQueryBuilder)(
    num_heads=2,
    embed_dim=EMBED_DIM,
    num_classes=NUM_CLASSES,
    min_queries=9,
    max_queries=300,
    loss_weight=1.0,
)
