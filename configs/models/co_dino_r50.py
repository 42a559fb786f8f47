"""
Co-DINO R50: the DINO detector of ``dino_r50.py`` trained with collaborative hybrid
assignments (spec §3): a Faster R-CNN and an ATSS auxiliary head on the encoder memory
(the neck's 5 levels plus one downsampled level: strides 4..128), and their positives as
customized positive queries in the shared decoder. At inference the auxiliary branch is not
run.

The model derives what follows from its parts, so this file does not state it: the heads'
input shapes (from the neck), their class count (from the query head), the number of
positive-query projections (one per auxiliary head).

Loss weights, as the paper's table: lambda_1 = 1.0 on the positive queries' losses,
lambda_2 = 2.0 on the auxiliary heads' losses, which are added once per decoder layer
(x 6 = 12) on top of each head's own weights (RPN 1, 1; RoI 1 and GIoU 10; ATSS 1, 2, 1).

Ablation switches:
- auxiliary heads (and so positive queries) off: ``model.aux_heads=[]``;
- positive queries off: ``model.positive_queries=null``;
- lambda_1, lambda_2: ``model.lambda_1``, ``model.lambda_2``;
- which heads: edit the ``model.aux_heads`` list.
"""

from codetr.engine import LazyPartial
from codetr.modeling import DINOPositiveQueryBuilder
from codetr.modeling.aux_heads import ATSSHead, build_rcnn_aux_head

from .dino_r50 import model

model.aux_heads = [
    LazyPartial(build_rcnn_aux_head)(
        # matching, sampling and normalisers as the authors' code ("detectron2": detectron2's)
        training_conventions="authors",
    ),
    LazyPartial(ATSSHead)(num_convs=1),
]
model.positive_queries = LazyPartial(DINOPositiveQueryBuilder)(min_queries=9, max_queries=300)
model.lambda_1 = 1.0
model.lambda_2 = 2.0
