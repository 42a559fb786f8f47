"""
Toy DINO: a small DINO-Deformable-DETR trained from scratch on the built-in synthetic shapes
dataset (160 x 160 images, 5 classes) in a few minutes on 2 CPU cores. Same model classes as
the full configs; only the sizes and the schedule differ.

    python train_net.py --config-file configs/toy/dino_toy.py
"""

from functools import partial

from detectron2.config import LazyCall as L

from codetr_toy import TOY_THING_CLASSES
from codetr.engine.lr_schedule import step_lr_multiplier
from codetr.engine.optimizer import lr_factor

from ..common.data.toy import dataloader
from ..common.optimizer import optimizer
from ..common.train import train
from ..models.dino_r50 import model

EMBED_DIM = 64

model.backbone.update(depth=18, stem_channels=16, base_channels=16, freeze_at=0, norm="BN")
model.neck.out_channels = EMBED_DIM

head = model.query_head
head.num_classes = len(TOY_THING_CLASSES)
head.num_queries = 100
head.num_candidates = 100
head.max_detections = 100
head.position_embedding.num_pos_feats = EMBED_DIM // 2
head.encoder.update(num_layers=2, ffn_dim=4 * EMBED_DIM)
head.decoder.update(num_layers=2, ffn_dim=4 * EMBED_DIM)
head.denoising.num_dn_queries = 50

# trained from scratch: no reduced backbone learning rate, a higher base rate
optimizer.lr = 1e-3
optimizer.params.lr_factor_func = partial(lr_factor, backbone_multiplier=1.0)

train.max_iter = 240
# x0.1 for the last 15% of training, whatever train.max_iter is
lr_multiplier = L(step_lr_multiplier)(num_updates="${..train.max_iter}", decay_fraction=0.85)
train.output_dir = "./output/toy/dino"
train.checkpointer.update(period=120, max_to_keep=2)
train.eval_period = 240
train.log_period = 20
