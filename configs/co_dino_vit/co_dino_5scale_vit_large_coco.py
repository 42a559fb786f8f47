"""Co-DINO ViT-L (EVA-02) on COCO, 12 epochs (lr x0.1 from epoch 7, 500 iterations of linear
warmup from 0.01), DETR augmentation with short sides 480 ... 1536 (long side at most 2400),
test at 1280 (long side at most 2048); AdamW lr 5e-5, weight decay 0.01, layer-wise lr decay
0.8 over the 24 blocks; an EMA of the weights (the authors' momentum 1e-4) is what is evaluated.
The authors' zoo: 65.9 AP on val2017 after Objects365 pre-training.

Start from EVA-02 weights converted to this model (``train.init_checkpoint``), or from the
authors' Objects365 model.
"""

from functools import partial

from detectron2.config import LazyCall as L

from codetr.engine.optimizer import layer_decay_optimizer_params, lr_factor

from ..common.data.coco import dataloader
from ..common.optimizer import optimizer
from ..common.schedule import COCO_ITERS_PER_EPOCH, default_coco_scheduler
from ..common.train import train
from ..models.co_dino_vit_l import model

TRAIN_SIZES = list(range(480, 1537, 32))
dataloader.train.mapper.augmentation.update(min_sizes=TRAIN_SIZES, max_size=2400)
dataloader.train.mapper.augmentation_with_crop.update(min_sizes=TRAIN_SIZES, max_size=2400)
dataloader.test.mapper.augmentation.update(min_size=1280, max_size=2048)

optimizer.lr = 5e-5
optimizer.weight_decay = 0.01
optimizer.params = L(layer_decay_optimizer_params)(
    base_lr="${..lr}",
    weight_decay="${..weight_decay}",
    lr_factor_func=partial(lr_factor, backbone_multiplier=1.0, layer_decay=0.8, num_layers=24),
)
lr_multiplier = default_coco_scheduler(
    epochs=12, decay_epochs=7, warmup_iters=500, warmup_factor=0.01
)
train.max_iter = 12 * COCO_ITERS_PER_EPOCH
train.model_ema.update(enabled=True, decay=0.9999, warmup_iters=2000)
train.output_dir = "./output/co_dino_5scale_vit_large_coco"
dataloader.evaluator.output_dir = "${...train.output_dir}"
