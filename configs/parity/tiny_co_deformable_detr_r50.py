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

from ..models.co_deformable_detr_r50 import model

EMBED_DIM = 64

model.backbone.update(depth=18, stem_channels=16, base_channels=16, freeze_at=2)
model.neck.out_channels = EMBED_DIM

model.query_head.update(num_classes=80, num_queries=30)
model.query_head.position_embedding.num_pos_feats = EMBED_DIM // 2
model.query_head.encoder.update(num_layers=2, num_heads=8, ffn_dim=2 * EMBED_DIM)
model.query_head.decoder.update(num_layers=2, num_heads=8, ffn_dim=2 * EMBED_DIM)

model.aux_heads[0].fc_dim = 128
model.positive_queries.max_queries = 20
# the authors' tiny model keeps the R50 model's auxiliary weight 12 with 2 decoder layers
model.lambda_2 = 6.0
