"""Co-Deformable-DETR Swin-L with 900 queries, 36 epochs (lr step at 30), drop path 0.6, DETR
augmentation (58.5 AP in the authors' zoo). The test output keeps the top 300 over
query x class (100 with 300 queries)."""

from ..common.schedule import COCO_ITERS_PER_EPOCH, lr_multiplier_3x as lr_multiplier
from .co_deformable_detr_swin_large_1x_coco import dataloader, model, optimizer, train

model.backbone.drop_path_rate = 0.6
model.query_head.update(num_queries=900, num_candidates=300, max_detections=300)

train.max_iter = 36 * COCO_ITERS_PER_EPOCH
train.output_dir = "./output/co_deformable_detr_swin_large_900q_3x_coco"
