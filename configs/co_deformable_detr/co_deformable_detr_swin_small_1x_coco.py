"""Co-Deformable-DETR Swin-S (ImageNet-1k 224 pretraining: window 7), 12 epochs, DETR
augmentation (53.4 AP in the authors' zoo). AdamW weight decay 0.05 as in the authors' Swin
configs; otherwise the R50 recipe (x0.1 lr on the backbone, sampling offsets and reference
points)."""

from ..models.co_deformable_detr_swin import model
from .co_deformable_detr_r50_1x_coco import dataloader, lr_multiplier, optimizer, train

model.backbone.update(size="S", window_size=7, drop_path_rate=0.2)
optimizer.weight_decay = 0.05

train.output_dir = "./output/co_deformable_detr_swin_small_1x_coco"
