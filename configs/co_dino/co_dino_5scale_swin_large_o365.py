"""Co-DINO Swin-L pre-training on Objects365 v2 (365 classes), the model that
``co_dino_5scale_swin_large_16e_o365tococo.py`` and ``..._16e_o365tolvis.py`` start from. The
authors published no config for it: the 22 epochs come from the name of their released
checkpoint (``co_dino_5scale_swin_large_22e_o365.pth``), with the lr step 2 epochs before the
end as in their 12 / 24 / 36-epoch recipes; the model, augmentation and optimizer are those of
the COCO fine-tuning config. Objects365 layout: ``configs/common/data/objects365.py``."""

from ..common.data.objects365 import dataloader
from ..common.schedule import default_coco_scheduler
from .co_dino_5scale_swin_large_16e_o365tococo import model, optimizer, train

# Objects365 v2 train images as commonly reported; set your own count if your json differs
OBJECTS365_TRAIN_IMAGES = 1742292
ITERS_PER_EPOCH = -(-OBJECTS365_TRAIN_IMAGES // 16)

model.query_head.num_classes = 365
dataloader.train.mapper.augmentation.update(min_sizes=list(range(480, 1537, 32)), max_size=2048)
dataloader.train.mapper.augmentation_with_crop.update(
    min_sizes=list(range(480, 1537, 32)), max_size=2048
)
dataloader.test.mapper.augmentation.update(min_size=1280, max_size=2048)

lr_multiplier = default_coco_scheduler(epochs=22, decay_epochs=20, iters_per_epoch=ITERS_PER_EPOCH)
train.max_iter = 22 * ITERS_PER_EPOCH
train.checkpointer.period = ITERS_PER_EPOCH
train.eval_period = ITERS_PER_EPOCH
train.output_dir = "./output/co_dino_5scale_swin_large_o365"
dataloader.evaluator.output_dir = "${...train.output_dir}"
