"""
Co-Deformable-DETR with a Swin-V1 backbone: ``co_deformable_detr_r50.py`` with the backbone of
the authors' Co-Deformable-DETR Swin configs. Swin-T here; the experiment files pick the size:

======  ==========================================  ======  ==========================
size    ImageNet checkpoint (the authors' choice)    window  drop path 1x / 3x
======  ==========================================  ======  ==========================
``T``   ``swin_tiny_patch4_window7_224.pth``         7       0.2 / 0.3
``S``   ``swin_small_patch4_window7_224.pth``        7       0.2 / 0.4
``B``   ``swin_base_patch4_window12_384_22k.pth``    12      0.2 / 0.4
``L``   ``swin_large_patch4_window12_384_22k.pth``   12      0.3 / 0.6 (900 queries)
======  ==========================================  ======  ==========================

Stages p1..p3 (strides 8, 16, 32) feed the neck, plus its extra stride-2 level: 4 levels,
strides 8..64, as with R50. Convert the ImageNet checkpoint with
``codetr.checkpoint.convert_official_swin`` for ``train.init_checkpoint``.
"""

from detectron2.config import LazyCall as L

from codetr.modeling.swin import build_swin, swin_output_shape

from .co_deformable_detr_r50 import model

model.backbone = L(build_swin)(
    size="T",
    window_size=7,
    out_features=["p1", "p2", "p3"],
    drop_path_rate=0.2,
    use_checkpoint=False,
)
model.neck.input_shape = L(swin_output_shape)(
    size="${model.backbone.size}", out_features="${model.backbone.out_features}"
)
model.neck.in_features = "${model.backbone.out_features}"
