"""Deformable-DETR R50 (two-stage, box refinement, mixed selection), 12 epochs: the base of
the Co-Deformable-DETR ablation (the same model without the collaborative branch)."""
from ..co_deformable_detr.co_deformable_detr_r50_1x_coco import (
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.aux_heads = []
model.positive_queries = None

train.output_dir = "./output/deformable_detr_r50_1x_coco"
