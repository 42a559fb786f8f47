"""
The tiny Co-Deformable-DETR of ``shared/reference/official_parity``
(``tiny_co_deformable_detr_r50_1x_coco``): the R50 Co-Deformable-DETR of
``configs/models/co_deformable_detr_r50.py`` with every width and depth shrunk, so that our
model can be checked number for number against the authors' implementation.

ResNet-18 at base width 16 (stem 16, stages 16/32/64/128, res3-res5 used) with frozen stem and
res2, ChannelMapper to 64 channels (GN 32) plus one extra level, 64-dim transformer with 8
heads, 2 encoder + 2 decoder layers, FFN 128, 30 queries, 80 classes; test output: top 100
over query x class, no NMS. Auxiliary heads as the R50 model (RoI head FC 128), positive
queries capped at 20.

The Deformable-DETR-only variant: ``model.aux_heads=[]`` and ``model.positive_queries=null``.
"""
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

from ..models.co_deformable_detr_r50 import AUX_FEATURES, model

EMBED_DIM = 64

model.backbone.update(depth=18, stem_channels=16, base_channels=16, freeze_at=2)
model.neck.input_shape = {
    f"res{i}": L(ShapeSpec)(channels=16 * 2 ** (i - 2), stride=2**i) for i in range(3, 6)
}
model.neck.out_channels = EMBED_DIM

model.query_head.update(num_classes=80, num_queries=30)
model.query_head.position_embedding.num_pos_feats = EMBED_DIM // 2
model.query_head.encoder.update(
    num_layers=2, embed_dim=EMBED_DIM, num_heads=8, ffn_dim=2 * EMBED_DIM
)
model.query_head.decoder.update(
    num_layers=2, embed_dim=EMBED_DIM, num_heads=8, ffn_dim=2 * EMBED_DIM
)

AUX_INPUT_SHAPE = {
    name: L(ShapeSpec)(channels=EMBED_DIM, stride=2 ** int(name[1:])) for name in AUX_FEATURES
}
model.aux_heads[0].update(input_shape=AUX_INPUT_SHAPE, fc_dim=128)
model.aux_heads[1].input_shape = AUX_INPUT_SHAPE
model.positive_queries.update(embed_dim=EMBED_DIM, max_queries=20)
