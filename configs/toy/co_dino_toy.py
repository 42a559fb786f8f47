"""
Toy Co-DINO: ``dino_toy.py`` trained with the collaborative auxiliary heads (Faster R-CNN +
ATSS) and customized positive queries. Same data, seed and schedule as the toy DINO, so the
two can be compared directly.

    python train_net.py --config-file configs/toy/co_dino_toy.py
"""

from ..models.co_dino_r50 import model as co_dino_model
from .dino_toy import dataloader, lr_multiplier, model, optimizer, train

model.aux_heads = co_dino_model.aux_heads
# small images: fewer RPN proposals and a narrower RoI head
model.aux_heads[0].update(fc_dim=256, rpn_train_pre_nms_topk=1000, rpn_train_post_nms_topk=300)
model.positive_queries = co_dino_model.positive_queries
model.positive_queries.max_queries = 100
model.lambda_1 = co_dino_model.lambda_1
# the auxiliary weight of the R50 model (2.0 x 6 decoder layers = 12) with 2 decoder layers
model.lambda_2 = 6.0

train.output_dir = "./output/toy/co_dino"
