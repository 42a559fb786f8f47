"""
The tiny ViT Co-DINO of ``tests/parity/tiny_co_dino_vit_official_*`` (made by
``tools/tiny_parity_official.py`` with the authors' code): the ViT-L Co-DINO of
``configs/models/co_dino_vit_l.py`` with every width and depth shrunk and its test settings
kept, so that our model can be checked number for number against the authors' implementation.

EVA-02 ViT of 4 blocks, 128 channels, 2 heads (head dim 64), patch 16, 6 x 6 windows in blocks
0 and 2 and global attention in blocks 1 and 3, position embedding stored for 128 x 128 images
with a class-token row; the simple feature pyramid to p2 ... p6 at 64 channels; 64-dim
transformer with 8 heads, 2 encoder + 2 decoder layers, FFN 128, 30 queries, 10 denoising
queries, 80 classes; the RoI box head of the ViT-L model (4 GN convs, 1 FC of 128,
class-agnostic); positive queries capped at 20. Test output as the ViT-L model: top 30 over
query x class, soft-NMS 0.8, 1000 kept; soft-NMS in the auxiliary heads.

The DINO-only variant: ``model.aux_heads=[]`` and ``model.positive_queries=null``.
"""

from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

from codetr.modeling.eva_vit import EVA02ViT

from ..models.co_dino_vit_l import model

VIT_DIM = 128
PATCH_SIZE = 16
EMBED_DIM = 64
NUM_QUERIES = 30

model.backbone = L(EVA02ViT)(
    embed_dim=VIT_DIM,
    depth=4,
    num_heads=2,
    window_size=6,
    global_block_indexes=[1, 3],
    patch_size=PATCH_SIZE,
    pretrain_img_size=128,
)
model.neck.update(
    input_shape={"last_feat": L(ShapeSpec)(channels=VIT_DIM, stride=PATCH_SIZE)},
    out_channels=EMBED_DIM,
)

model.query_head.update(num_classes=80, num_queries=NUM_QUERIES, num_candidates=NUM_QUERIES)
model.query_head.position_embedding.num_pos_feats = EMBED_DIM // 2
model.query_head.encoder.update(
    num_layers=2, num_heads=8, ffn_dim=2 * EMBED_DIM, num_checkpointed_layers=0
)
model.query_head.decoder.update(num_layers=2, num_heads=8, ffn_dim=2 * EMBED_DIM)
model.query_head.denoising.num_dn_queries = 10
model.aux_heads[0].fc_dim = 2 * EMBED_DIM
model.positive_queries.max_queries = 20
# the authors' tiny model keeps the full model's auxiliary weight 12 with 2 decoder layers
model.lambda_2 = 6.0
