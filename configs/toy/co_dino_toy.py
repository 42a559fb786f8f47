"""
Toy Co-DINO: ``dino_toy.py`` trained with the collaborative auxiliary heads (Faster R-CNN +
ATSS) and customized positive queries. Same data, seed and schedule as the toy DINO, so the
two can be compared directly.

    python train_net.py --config-file configs/toy/co_dino_toy.py
"""

from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

from ..models.co_dino_r50 import model as co_dino_model
from .dino_toy import EMBED_DIM, dataloader, lr_multiplier, model, optimizer, train

AUX_INPUT_SHAPE = {f"p{i}": L(ShapeSpec)(channels=EMBED_DIM, stride=2**i) for i in range(2, 8)}

model.aux_heads = co_dino_model.aux_heads
for head in model.aux_heads:
    head.input_shape = AUX_INPUT_SHAPE
# small images: fewer RPN proposals and a narrower RoI head
model.aux_heads[0].update(fc_dim=256, rpn_train_pre_nms_topk=1000, rpn_train_post_nms_topk=300)
model.aux_loss_weight = co_dino_model.aux_loss_weight
model.positive_queries = co_dino_model.positive_queries
model.positive_queries.update(embed_dim=EMBED_DIM, max_queries=100)

train.output_dir = "./output/toy/co_dino"
