"""
Toy Co-DINO ViT: ``co_dino_toy.py`` (same data, seed, schedule style, auxiliary heads and
positive queries) with the ViT-L recipe's parts at toy size, trained from scratch: a tiny
EVA-02 ViT (RoPE, SwiGLU; patch 8, i.e. 20 x 20 tokens on the 160 x 160 images, 96 channels,
4 blocks of 4 heads, 10 x 10 windows with global attention in blocks 1 and 3), the authors'
simple feature pyramid at the toy width (64 channels, strides 4 ... 32: 4 levels, as the
stride-8 map has no 1/8 scale), layer-wise lr decay 0.8 over the 4 blocks and an EMA of the
weights, which is what is evaluated.

    python train_net.py --config-file configs/toy/co_dino_vit_toy.py
"""

from functools import partial

from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

from codetr.engine.optimizer import layer_decay_optimizer_params, lr_factor
from codetr.modeling import SimpleFeaturePyramid
from codetr.modeling.eva_vit import EVA02ViT

from .co_dino_toy import dataloader, lr_multiplier, model, optimizer, train

VIT_DIM = 96
VIT_DEPTH = 4
PATCH_SIZE = 8
NUM_LEVELS = 4

model.backbone = L(EVA02ViT)(
    embed_dim=VIT_DIM,
    depth=VIT_DEPTH,
    num_heads=4,
    window_size=10,
    global_block_indexes=[1, 3],
    patch_size=PATCH_SIZE,
    # from scratch: a position embedding for the 160 x 160 images, no class-token row
    pretrain_img_size=160,
    pretrain_use_cls_token=False,
)
model.neck = L(SimpleFeaturePyramid)(
    input_shape={"last_feat": L(ShapeSpec)(channels=VIT_DIM, stride=PATCH_SIZE)},
    in_feature="last_feat",
    out_channels=64,
    scale_factors=[2.0, 1.0, 0.5, 0.25],
)
model.query_head.encoder.num_levels = NUM_LEVELS
model.query_head.decoder.num_levels = NUM_LEVELS

# the ViT-L recipe's weight decay and its exemptions (1-D parameters, biases)
optimizer.weight_decay = 0.01
optimizer.params = L(layer_decay_optimizer_params)(
    base_lr="${..lr}",
    weight_decay="${..weight_decay}",
    lr_factor_func=partial(
        lr_factor, backbone_multiplier=1.0, layer_decay=0.8, num_layers=VIT_DEPTH
    ),
)

# the ViT-L recipe's EMA averages over ~10000 iterations (decay 0.9999); a 240-iteration run
# from scratch needs a short memory: decay 0.95, a time constant of 20 iterations (at 0.98 the
# average lags the last, x0.1 lr, iterations: 76.6 toy-val AP against 77.5, see README)
train.model_ema.update(enabled=True, decay=0.95, warmup_iters=10)
train.output_dir = "./output/toy/co_dino_vit"
