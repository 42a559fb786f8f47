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
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

from ..models.co_dino_r50 import model

EMBED_DIM = 64
NUM_QUERIES = 30

model.backbone.update(depth=18, stem_channels=16, base_channels=16, freeze_at=2)
model.neck.input_shape = {
    f"res{i}": L(ShapeSpec)(channels=16 * 2 ** (i - 2), stride=2**i) for i in range(2, 6)
}
model.neck.out_channels = EMBED_DIM

model.query_head.update(
    num_classes=80, num_queries=NUM_QUERIES, num_candidates=NUM_QUERIES, max_detections=300
)
model.query_head.position_embedding.num_pos_feats = EMBED_DIM // 2
model.query_head.encoder.update(
    num_layers=2, embed_dim=EMBED_DIM, num_heads=8, ffn_dim=2 * EMBED_DIM
)
model.query_head.decoder.update(
    num_layers=2, embed_dim=EMBED_DIM, num_heads=8, ffn_dim=2 * EMBED_DIM
)
model.query_head.denoising.update(embed_dim=EMBED_DIM, num_dn_queries=10)

AUX_INPUT_SHAPE = {f"p{i}": L(ShapeSpec)(channels=EMBED_DIM, stride=2**i) for i in range(2, 8)}
model.aux_heads[0].update(input_shape=AUX_INPUT_SHAPE, fc_dim=128)
model.aux_heads[1].input_shape = AUX_INPUT_SHAPE
model.positive_queries.update(embed_dim=EMBED_DIM, max_queries=20)
