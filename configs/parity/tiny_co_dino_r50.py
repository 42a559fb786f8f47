"""
The tiny Co-DINO of ``shared/reference/official_parity`` (``tiny_co_dino_5scale_r50_1x_coco``):
the R50 Co-DINO of ``configs/models/co_dino_r50.py`` with every width and depth shrunk, so that
our model can be checked number for number against the authors' implementation.

ResNet-18 at base width 16 (stem 16, stages 16/32/64/128) with frozen stem and res2,
ChannelMapper to 64 channels (GN 32), 64-dim transformer with 8 heads, 2 encoder + 2 decoder
layers, FFN 128, 30 queries, 10 denoising queries, 80 classes; test output: top 30 over
query x class, soft-NMS 0.8, 300 kept. Auxiliary heads as the R50 model (RoI head FC 128),
positive queries capped at 20.

The DINO-only variant: ``model.aux_heads=[]`` and ``model.positive_queries=null``.
"""

from ..models.co_dino_r50 import model

EMBED_DIM = 64
NUM_QUERIES = 30

model.backbone.update(depth=18, stem_channels=16, base_channels=16, freeze_at=2)
model.neck.out_channels = EMBED_DIM

model.query_head.update(
    num_classes=80, num_queries=NUM_QUERIES, num_candidates=NUM_QUERIES, max_detections=300
)
model.query_head.position_embedding.num_pos_feats = EMBED_DIM // 2
model.query_head.encoder.update(num_layers=2, num_heads=8, ffn_dim=2 * EMBED_DIM)
model.query_head.decoder.update(num_layers=2, num_heads=8, ffn_dim=2 * EMBED_DIM)
model.query_head.denoising.num_dn_queries = 10
model.aux_heads[0].fc_dim = 128
model.positive_queries.max_queries = 20
# the authors' tiny model keeps the R50 model's auxiliary weight 12 with 2 decoder layers
model.lambda_2 = 6.0
