"""Co-Deformable-DETR R50, 12 epochs, DETR augmentation, with a mask branch on the Faster R-CNN
auxiliary head (Mask R-CNN: 14x14 RoIAlign, four 3x3 convs, deconvolution, 28x28 masks, loss
weight 1 x lambda_2 x 6 decoder layers): the authors' ``co_deformable_detr_mask_r50_1x_coco.py``.
Training reads the instance masks of COCO.

The test output is the query head's, as in the authors' file (``eval_module="detr"``: boxes,
evaluated as bbox). With ``model.eval_module=two-stage`` the auxiliary head's detections come
with masks, and the evaluator (tasks read from the predictions) scores bbox and segm.
"""

from .co_deformable_detr_r50_1x_coco import dataloader, lr_multiplier, model, optimizer, train

model.aux_heads[0].mask_on = True
# gt_masks for the mask branch (DetrDatasetMapper's use_instance_mask)
dataloader.train.mapper.use_instance_mask = True
# None: bbox, plus segm when the predictions have masks (eval_module "two-stage")
dataloader.evaluator.tasks = None

train.output_dir = "./output/co_deformable_detr_mask_r50_1x_coco"
