"""
The authors' optimizer: AdamW, lr 2e-4, betas (0.9, 0.999), weight decay 1e-4 on every
parameter (norms and biases included), backbone learning rate x0.1. Gradient clipping (global
norm 0.1) is set in ``train.clip_grad`` (``configs/common/train.py``).

Co-Deformable-DETR also trains ``sampling_offsets`` at x0.1 (the authors' recipe names
``reference_points`` too, a layer of their one-stage Deformable DETR that the two-stage model
does not have)::

    optimizer.params.lr_factor_func = partial(
        lr_factor, backbone_multiplier=0.1, linear_projection_multiplier=0.1
    )

A ViT backbone (the authors' Co-DINO ViT-L: AdamW lr 5e-5, weight decay 0.01, layer-wise lr
decay 0.8 over 24 blocks, no backbone multiplier, and their weight-decay exemptions: 1-D
parameters, biases, relative position tables)::

    from codetr.engine.optimizer import layer_decay_optimizer_params

    optimizer.params = L(layer_decay_optimizer_params)(
        base_lr="${..lr}",
        weight_decay="${..weight_decay}",
        lr_factor_func=partial(lr_factor, backbone_multiplier=1.0, layer_decay=0.8, num_layers=24),
    )
    optimizer.lr = 5e-5
    optimizer.weight_decay = 0.01

``optimizer.params.model`` is set by the trainer before instantiation.
"""

from functools import partial

import torch
from detectron2.config import LazyCall as L
from detectron2.solver import get_default_optimizer_params

from codetr.engine.optimizer import lr_factor

optimizer = L(torch.optim.AdamW)(
    params=L(get_default_optimizer_params)(
        base_lr="${..lr}",
        lr_factor_func=partial(lr_factor, backbone_multiplier=0.1),
    ),
    lr=2e-4,
    betas=(0.9, 0.999),
    weight_decay=1e-4,
)
