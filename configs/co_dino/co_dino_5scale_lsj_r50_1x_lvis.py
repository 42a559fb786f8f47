"""Co-DINO R50 on LVIS v1, 5 scales, 12 epochs, large-scale jitter at 1024 (box-only, see
``configs/common/data/lvis_lsj.py``); otherwise ``co_dino_5scale_r50_1x_lvis.py``."""

from ..common.data.lvis_lsj import dataloader
from .co_dino_5scale_r50_1x_lvis import lr_multiplier, model, optimizer, train

train.output_dir = "./output/co_dino_5scale_lsj_r50_1x_lvis"
dataloader.evaluator.output_dir = "${...train.output_dir}"
