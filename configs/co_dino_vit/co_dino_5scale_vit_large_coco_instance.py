"""Co-DINO-Inst ViT-L (EVA-02) on COCO: the authors' ``co_dino_5scale_vit_large_coco_instance.py``,
their ViT-L COCO recipe (``co_dino_5scale_vit_large_coco.py``) with a mask branch on the query
head's boxes (RefineMask-style head, 112x112 masks, MaskIoU mask scoring;
``codetr.modeling.mask_heads``; mask loss weight 1.33, MaskIoU 0.5, both x lambda_2 x 6 decoder
layers), trained on COCO's instance masks.

The test output is the query head's 1000 detections with masks; scores are rescored by the
predicted mask IoU, and the evaluator (tasks read from the predictions) scores bbox and segm.
"""

from codetr.engine import LazyPartial
from codetr.modeling.mask_heads import build_query_mask_branch

from .co_dino_5scale_vit_large_coco import dataloader, lr_multiplier, model, optimizer, train

model.mask_branch = LazyPartial(build_query_mask_branch)(mask_loss_weight=1.33)
dataloader.train.mapper.use_instance_mask = True
dataloader.evaluator.tasks = None

train.output_dir = "./output/co_dino_5scale_vit_large_coco_instance"
