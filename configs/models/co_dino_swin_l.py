"""
Co-DINO Swin-L: ``co_dino_r50.py`` with the Swin-L backbone of the authors' Co-DINO Swin-L
configs (ImageNet-22k 384 pretraining, so window 12; stochastic depth 0.3).

All four Swin stages feed the neck (p0..p3: 192, 384, 768, 1536 channels, strides 4..32),
plus one extra stride-2 level: 5 levels, strides 4..64, as with R50. Initialise the backbone
from ``swin_large_patch4_window12_384_22k.pth`` converted by
``codetr.checkpoint.swin.convert_official_swin``. The authors' Swin-L experiments also
checkpoint all 6 encoder layers (``model.query_head.encoder.num_checkpointed_layers = 6``)
and, for the Objects365 schedule, the Swin blocks (``model.backbone.use_checkpoint = True``).
"""

from detectron2.config import LazyCall as L

from codetr.modeling.swin import build_swin, swin_output_shape

from .co_dino_r50 import model

model.backbone = L(build_swin)(
    size="L",
    window_size=12,
    out_features=["p0", "p1", "p2", "p3"],
    drop_path_rate=0.3,
    use_checkpoint=False,
)
model.neck.input_shape = L(swin_output_shape)(
    size="${model.backbone.size}", out_features="${model.backbone.out_features}"
)
model.neck.in_features = "${model.backbone.out_features}"
