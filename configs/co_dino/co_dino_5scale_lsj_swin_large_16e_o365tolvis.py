"""Co-DINO Swin-L fine-tuned on LVIS v1 from the authors' Objects365 model (64.5 box AP in their
zoo): large-scale jitter at 1536 (box-only), 16 epochs, lr 1e-4 (backbone x0.1) with a x0.1 step
at epoch 8, weight decay 1e-4; 500 denoising queries with box noise 0.4; the best 1000
detections per image after soft-NMS 0.8; otherwise ``co_dino_5scale_lsj_swin_large_3x_lvis.py``
(repeat-factor sampling, ``LVISEvaluator``)."""

from ..common.schedule import LVIS_ITERS_PER_EPOCH, default_coco_scheduler
from .co_dino_5scale_lsj_swin_large_3x_lvis import dataloader, model, optimizer, train

IMAGE_SIZE = 1536

model.query_head.denoising.update(num_dn_queries=500, box_noise_scale=0.4)
model.query_head.max_detections = 1000
dataloader.train.mapper.augmentation.image_size = IMAGE_SIZE
dataloader.test.mapper.augmentation.image_size = IMAGE_SIZE

optimizer.lr = 1e-4
lr_multiplier = default_coco_scheduler(
    epochs=16, decay_epochs=8, iters_per_epoch=LVIS_ITERS_PER_EPOCH
)
train.max_iter = 16 * LVIS_ITERS_PER_EPOCH
train.output_dir = "./output/co_dino_5scale_lsj_swin_large_16e_o365tolvis"
dataloader.evaluator.output_dir = "${...train.output_dir}"
