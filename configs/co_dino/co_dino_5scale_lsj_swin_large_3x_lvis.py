"""Co-DINO Swin-L on LVIS v1, large-scale jitter at 1280, the Swin-L model of
``co_dino_5scale_lsj_swin_large_1x_coco.py`` (window 12, drop path 0.3, 6 checkpointed encoder
layers) on the LVIS data of ``co_dino_5scale_lsj_r50_1x_lvis.py``. Despite its name, the
authors' file keeps the 12-epoch schedule of the R50 LVIS config it inherits (lr step at
epoch 11), and so does this one; they start it from their Objects365 model
(``co_dino_5scale_lsj_swin_large_16e_o365tolvis.py`` is that fine-tuning)."""

from ..common.data.lvis_lsj import dataloader
from .co_dino_5scale_lsj_r50_1x_lvis import lr_multiplier, optimizer, train
from .co_dino_5scale_lsj_swin_large_1x_coco import model

IMAGE_SIZE = 1280

model.query_head.num_classes = 1203
dataloader.train.mapper.augmentation.image_size = IMAGE_SIZE
dataloader.test.mapper.augmentation.image_size = IMAGE_SIZE

train.output_dir = "./output/co_dino_5scale_lsj_swin_large_3x_lvis"
dataloader.evaluator.output_dir = "${...train.output_dir}"
