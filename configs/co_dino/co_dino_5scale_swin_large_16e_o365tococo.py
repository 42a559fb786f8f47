"""Co-DINO Swin-L fine-tuned on COCO from the authors' Objects365 model (64.1 AP in their zoo):
16 epochs, lr 1e-4 (backbone x0.1) with a x0.1 step at epoch 8, weight decay 1e-4; DETR
augmentation with short sides 480 ... 1536 (long side at most 2048), test at 1280 (at most
2048), inputs padded to a multiple of 32; 500 denoising queries with box noise 0.4; the Swin
blocks and all 6 encoder layers checkpointed. ``train.init_checkpoint``: the Objects365 model
(``co_dino_5scale_swin_large_o365.py``, or the authors' converted
``co_dino_5scale_swin_large_22e_o365.pth``)."""

from ..common.schedule import COCO_ITERS_PER_EPOCH, default_coco_scheduler
from .co_dino_5scale_swin_large_1x_coco import dataloader, model, optimizer, train

TRAIN_SIZES = list(range(480, 1537, 32))

model.backbone.update(drop_path_rate=0.3, use_checkpoint=True)
model.query_head.denoising.update(num_dn_queries=500, box_noise_scale=0.4)
model.query_head.encoder.num_checkpointed_layers = 6
model.size_divisibility = 32

dataloader.train.mapper.augmentation.update(min_sizes=TRAIN_SIZES, max_size=2048)
dataloader.train.mapper.augmentation_with_crop.update(min_sizes=TRAIN_SIZES, max_size=2048)
dataloader.test.mapper.augmentation.update(min_size=1280, max_size=2048)

optimizer.lr = 1e-4
lr_multiplier = default_coco_scheduler(epochs=16, decay_epochs=8)
train.max_iter = 16 * COCO_ITERS_PER_EPOCH
train.output_dir = "./output/co_dino_5scale_swin_large_16e_o365tococo"
dataloader.evaluator.output_dir = "${...train.output_dir}"
