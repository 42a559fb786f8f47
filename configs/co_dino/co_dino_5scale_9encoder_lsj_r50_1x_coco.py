"""Co-DINO R50 with 9 encoder layers (all checkpointed), 12 epochs, LSJ 1024 (52.6 AP)."""
from .co_dino_5scale_lsj_r50_1x_coco import dataloader, lr_multiplier, model, optimizer, train

model.query_head.encoder.update(num_layers=9, num_checkpointed_layers=9)

train.output_dir = "./output/co_dino_5scale_9encoder_lsj_r50_1x_coco"
dataloader.evaluator.output_dir = "${...train.output_dir}"
