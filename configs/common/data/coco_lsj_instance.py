"""COCO 2017 instance segmentation data: the large-scale jitter of ``coco_lsj.py`` (a 1024
square) with instance masks and copy-paste, the authors' Co-DINO LSJ recipe
(``co_dino_5scale_lsj_r50_1x_coco.py``: ``LoadAnnotations(with_mask=True)``, LSJ with
``RandomCrop(recompute_bbox=True)``, then ``CopyPaste(max_num_pasted=100)``).

Training instances carry "gt_masks" as ``BitMasks`` (copy-paste works on bitmaps), and their
boxes are recomputed from the masks after the LSJ crop and the paste. Every non-crowd training
annotation must have a "segmentation" (checked when the dataset is loaded). The test side is
``coco_lsj.py``'s; the evaluator scores "segm" too when the model predicts masks.
"""

from detectron2.config import LazyCall as L

from codetr.data.copy_paste import CopyPaste

from .coco_lsj import dataloader

dataloader.train.dataset.require_masks = "${..mapper.use_instance_mask}"
dataloader.train.mapper.use_instance_mask = True
dataloader.train.mapper.instance_mask_format = "bitmask"
dataloader.train.mapper.copy_paste = L(CopyPaste)(
    max_num_pasted=100, bbox_occluded_thr=10, mask_occluded_thr=300, selected=True
)
