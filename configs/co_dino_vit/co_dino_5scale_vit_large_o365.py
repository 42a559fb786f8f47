"""Co-DINO ViT-L (EVA-02) pre-training on Objects365 v2 (365 classes), the model that
``co_dino_5scale_vit_large_coco.py`` and ``co_dino_5scale_lsj_vit_large_lvis.py`` are fine-tuned
from (the authors' zoo lists this model, with weights but no config). The model, augmentation,
optimizer (layer-wise lr decay 0.8), EMA and test settings are those of the COCO config; the
schedule is not published: it is set as our Swin-L Objects365 config (22 epochs, lr x0.1 two
epochs before the end, the name of the authors' Swin-L Objects365 checkpoint), with the ViT
recipe's 500 warmup iterations from 0.01. Start from EVA-02 weights (``train.init_checkpoint``,
README "ViT-L"). Objects365 layout: ``configs/common/data/objects365.py``."""

from ..co_dino.co_dino_5scale_swin_large_o365 import ITERS_PER_EPOCH
from ..common.data.objects365 import dataloader
from ..common.schedule import default_coco_scheduler
from .co_dino_5scale_vit_large_coco import model, optimizer, train

EPOCHS = 22

model.query_head.num_classes = 365
TRAIN_SIZES = list(range(480, 1537, 32))
dataloader.train.mapper.augmentation.update(min_sizes=TRAIN_SIZES, max_size=2400)
dataloader.train.mapper.augmentation_with_crop.update(min_sizes=TRAIN_SIZES, max_size=2400)
dataloader.test.mapper.augmentation.update(min_size=1280, max_size=2048)

lr_multiplier = default_coco_scheduler(
    epochs=EPOCHS,
    decay_epochs=EPOCHS - 2,
    warmup_iters=500,
    iters_per_epoch=ITERS_PER_EPOCH,
    warmup_factor=0.01,
)
train.max_iter = EPOCHS * ITERS_PER_EPOCH
train.checkpointer.period = ITERS_PER_EPOCH
train.eval_period = ITERS_PER_EPOCH
train.output_dir = "./output/co_dino_5scale_vit_large_o365"
dataloader.evaluator.output_dir = "${...train.output_dir}"
