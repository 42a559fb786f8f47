"""Co-DINO-Inst R50, 12 epochs, DETR augmentation: Co-DINO R50 (``co_dino_5scale_r50_1x_coco.py``)
with the authors' mask branch on the query head's boxes (RefineMask-style head with boundary-aware
loss, 112x112 masks, MaskIoU mask scoring; ``codetr.modeling.mask_heads``), trained on COCO's
instance masks. The authors published no R50 instance config: the mask branch is their ViT-L
COCO instance config's (mask loss weight 1.33, MaskIoU 0.5, both x lambda_2 x 6 decoder layers;
assignment at IoU 0.5, 512 samples at 0.25 positive, from the best 300 (query, class) pairs of
the last decoder layer, their R50 test-time top-k).

The test output is the query head's detections with masks; scores are rescored by the predicted
mask IoU, and the evaluator (tasks read from the predictions) scores bbox and segm.
"""

from codetr.engine import LazyPartial
from codetr.modeling.mask_heads import build_query_mask_branch

from .co_dino_5scale_r50_1x_coco import dataloader, lr_multiplier, model, optimizer, train

model.mask_branch = LazyPartial(build_query_mask_branch)(mask_loss_weight=1.33)
# gt_masks for the mask branch (DetrDatasetMapper's use_instance_mask)
dataloader.train.mapper.use_instance_mask = True
# None: bbox, plus segm as the predictions have masks
dataloader.evaluator.tasks = None

train.output_dir = "./output/co_dino_5scale_r50_1x_coco_instance"
