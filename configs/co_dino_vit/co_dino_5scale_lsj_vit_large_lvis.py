"""Co-DINO ViT-L (EVA-02) on LVIS v1: window 16 with global attention in blocks 2, 5, ..., 23,
drop path 0.3, 900 queries, the R50 RoI box head (2 FC, class-specific); large-scale jitter at
1536 (box-only, see ``configs/common/data/lvis_lsj.py``), repeat-factor sampling,
``LVISEvaluator`` on the best 1000 detections (soft-NMS 0.8). 16 epochs, lr x0.1 at epochs 9
and 15, 500 iterations of warmup from 0.01. As the authors' file: AdamW lr 5e-5, weight decay
0.05, backbone lr x0.1 and no EMA (its comment says layer-wise decay was used but not
implemented there; ``co_dino_5scale_vit_large_coco.py`` shows how to switch it on). The
authors' zoo: 67.9 box AP on LVIS val after Objects365 pre-training."""

from ..common.data.lvis_lsj import dataloader
from ..common.optimizer import optimizer
from ..common.schedule import LVIS_ITERS_PER_EPOCH, default_coco_scheduler
from ..common.train import train
from ..models.co_dino_vit_l import model

IMAGE_SIZE = 1536

model.backbone.update(
    window_size=16, global_block_indexes=[2, 5, 8, 11, 14, 17, 20, 23], drop_path_rate=0.3
)
model.query_head.update(num_classes=1203, num_queries=900, num_candidates=900)
model.aux_heads[0].update(
    num_box_head_convs=0,
    num_box_head_fcs=2,
    box_head_norm="",
    cls_agnostic_bbox_reg=False,
    box_reg_weights=[10.0, 10.0, 5.0, 5.0],
)
dataloader.train.mapper.augmentation.image_size = IMAGE_SIZE
dataloader.test.mapper.augmentation.image_size = IMAGE_SIZE

optimizer.lr = 5e-5
optimizer.weight_decay = 0.05
lr_multiplier = default_coco_scheduler(
    epochs=16,
    decay_epochs=[9, 15],
    warmup_iters=500,
    iters_per_epoch=LVIS_ITERS_PER_EPOCH,
    warmup_factor=0.01,
)
train.max_iter = 16 * LVIS_ITERS_PER_EPOCH
train.checkpointer.period = LVIS_ITERS_PER_EPOCH
train.eval_period = LVIS_ITERS_PER_EPOCH
train.output_dir = "./output/co_dino_5scale_lsj_vit_large_lvis"
dataloader.evaluator.output_dir = "${...train.output_dir}"
